"""The gallery: a read-only web page over the image store, for the person behind the agent.

Sessions newest first, every image as a card (thumbnail, prompt, seed, size, model, steps, time, tool), the lineage
(what each image was made from and what was made from it), the full picture, two pictures compared, the recipe
with the CLI command and the MCP call that remake it, and new images as they are stored.

Modules, one job each:
- `catalog`  what the page shows of one stored image (the JSON of a card);
- `thumbs`   WebP thumbnails, made once and cached beside the store's images;
- `app`      the Starlette app: the page, its JSON, the pictures, the live feed, 404s;
- `command`  `klein-agent gallery`: its options, the guard in front, serving.
The page itself is plain HTML, CSS and JavaScript in `static/`. No torch, no MCP; `serve --http` mounts the same
app at /gallery.
"""
