"""The MCP server: `klein-agent serve`, a thin layer over the torch-free `klein_agent.service.studio.Studio`.

Modules, one job each:
- `options`     the command-line options of `serve` (store, inputs, limits, transport);
- `serve`       the command: build the studio, start the engine, run stdio or HTTP, close everything;
- `stdio`       the stdio transport boundary (malformed lines answered, Ctrl-C and signals stop it);
- `http`        `serve --http`: the bound socket, who may connect, the MCP endpoint and the gallery beside it;
- `app`         `build_server`: one MCPServer with the tools, resources and prompts below;
- `tools/`      the tools, each with its description and annotations: `generation` (generate, edit, compose, inpaint)
                and `library` (list_images, view_image, export_image, server_status);
- `arguments`   checks on a call's arguments before the SDK validates them, in our words;
- `models`      the structured results the tools publish (their outputSchema);
- `results`     building CallToolResults: preview, summary, resource links, structured content;
- `errors`      the service layer's expected errors as ToolError;
- `texts`       sentences the tool descriptions share;
- `resources`   the `image://{image_id}` and `image://{image_id}/meta` templates;
- `prompts`     MCP prompts loaded from the `prompts/` folder.
"""
