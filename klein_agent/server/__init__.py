"""The MCP server: `klein-agent serve`.

Modules, one job each:
- `config`     limits and settings the command line chooses;
- `models`     the structured results the tools publish (their outputSchema);
- `state`      what the tools share: engine, store, input policy, config, and the image-argument resolver;
- `results`    building CallToolResults: preview, summary, resource links, structured content;
- `generation` the image-making tools: generate, edit, compose, inpaint;
- `library`    the store tools: list_images, view_image, export_image, server_status;
- `resources`  the `image://{image_id}` and `image://{image_id}/meta` templates;
- `prompts`    MCP prompts loaded from the `prompts/` folder;
- `app`        `build_server`: one MCPServer with all of the above;
- `serve`      the command: arguments, logging to stderr, stdio or streamable HTTP.
"""
