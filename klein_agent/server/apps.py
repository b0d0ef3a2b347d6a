"""The MCP App (issue 22 point 4): the `ui://` view hosts render beside the image tools' results, the two tools only
that view calls, and the rule that keeps all of it away from clients that did not ask for Apps.

- The view is plain HTML, CSS and JavaScript shipped in `app_view/` and inlined here into one document, served as
  `VIEW_URI` with the Apps MIME type and no CSP domains: the spec's default sandbox (pictures as `data:` URIs, no
  network) is all it needs. The image tools name it with `VIEW_META` as their `_meta`.
- `app_image` and `app_verdict` are `visibility: ["app"]`: the host keeps them from the model, and `AppsForApps`
  keeps them (and every `_meta.ui`, and the `ui://` resource) from clients without the Apps extension, so those
  clients list, read and call exactly what they did before the view existed.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Annotated, Any, Literal

from mcp.server.apps import Apps, ResourceCsp, client_supports_apps
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from klein_agent.rules.limits import (
    MIN_SIDE,
    PREVIEW_MAX_EDGE,
    SIZE_MULTIPLE,
    VERDICT_REASON_MAX_CHARS,
    VIEW_MAX_EDGE,
)
from klein_agent.rules.recipes import rerun_call
from klein_agent.server.errors import tool_errors
from klein_agent.server.results import image_block
from klein_agent.service.critique.critic import Critic
from klein_agent.service.store import StoredImage
from klein_agent.service.studio import Studio

VIEW_URI = "ui://klein-agent/view.html"
VIEW_META: dict[str, Any] = {"ui": {"resourceUri": VIEW_URI}}
# export_image writes a file on the server's machine at a path the model chose: never a button in the view
MODEL_ONLY_META: dict[str, Any] = {"ui": {"visibility": ["model"]}}
APP_ONLY = ("app_image", "app_verdict")  # the tools only the view calls, in registration order
MAX_VIEW_BYTES = 200_000  # the view document, inlined: small enough to send with every result a host renders


@cache
def view_html() -> str:
    """The view as one HTML document: `app_view/view.html` with its stylesheet and script inlined (a `ui://`
    resource is one document; the spec's CSP allows inline script and style but no other origin)."""
    folder = resources.files("klein_agent.server") / "app_view"
    html = (folder / "view.html").read_text(encoding="utf-8")
    css = (folder / "view.css").read_text(encoding="utf-8")
    js = (folder / "view.js").read_text(encoding="utf-8")
    page = html.replace("/*VIEW_CSS*/", css).replace("/*VIEW_JS*/", js)
    return page.replace("{{SIZE_MULTIPLE}}", str(SIZE_MULTIPLE))  # the brush's unit, from the one rule


class AppImage(BaseModel):
    """What the view shows of one stored image beside its picture: size, lineage, how it was made, its verdicts."""

    image_id: str
    width: int
    height: int
    parents: list[str] = Field(description="ids it was made from, in 'image 1, image 2' order")
    tool: str | None = Field(description="the tool that made it; null for an imported picture")
    prompt: str | None
    seed: int | None
    standing: Literal["pick", "reject"] | None
    standing_reason: str | None
    notes: list[str]
    rerun: dict[str, Any] | None = Field(description="the tools/call that remakes it ({name, arguments})")


class AppVerdict(BaseModel):
    """A verdict the person gave in the view, as stored, and the image's standing after it."""

    image_id: str
    verdict: str
    reason: str
    standing: Literal["pick", "reject"] | None


AppImageId = Annotated[str, Field(min_length=1, max_length=200, description="An image id (img_...).")]


def build_apps(studio: Studio) -> Apps:
    """The Apps extension for `MCPServer(extensions=[...])`: the view resource and the app-only tools over
    `studio` (extensions are fixed when the server is built, so this runs before it)."""
    apps = Apps()
    critic = Critic(studio.store)

    async def shown(image: StoredImage) -> AppImage:
        verdicts = (await critic.verdicts([image.image_id])).get(image.image_id)
        recipe = image.recipe or {}
        standing = verdicts.standing if verdicts else None
        return AppImage(
            image_id=image.image_id,
            width=image.width,
            height=image.height,
            parents=list(image.parents),
            tool=recipe.get("tool"),
            prompt=recipe.get("prompt"),
            seed=recipe.get("seed"),
            standing=standing.verdict if standing else None,  # type: ignore[arg-type]
            standing_reason=standing.reason if standing else None,
            notes=[n.reason for n in verdicts.notes] if verdicts else [],
            rerun=rerun_call(recipe, image.parents) if recipe.get("tool") else None,
        )

    @apps.tool(
        resource_uri=VIEW_URI,
        visibility=["app"],
        name="app_image",
        title="Image for the view",
        description="One stored image for the view: its preview, size, lineage, recipe and verdicts.",
        annotations=ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False),
    )
    async def app_image(
        image_id: AppImageId,
        max_edge: Annotated[int, Field(ge=MIN_SIDE, le=VIEW_MAX_EDGE)] = PREVIEW_MAX_EDGE,
    ) -> Annotated[CallToolResult, AppImage]:
        with tool_errors():
            sheet = await studio.contact_sheet([image_id], max_edge=max_edge)
            about = await shown(sheet.images[0])
        text = f"{about.image_id}: {about.width}x{about.height}, made by {about.tool or 'import'}."
        return CallToolResult(
            content=[image_block(sheet.preview), TextContent(type="text", text=text)],
            structured_content=about.model_dump(mode="json"),
        )

    @apps.tool(
        resource_uri=VIEW_URI,
        visibility=["app"],
        name="app_verdict",
        title="The person's verdict",
        description="Store the pick, reject or note the person gave an image in the view.",
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False),
    )
    async def app_verdict(
        image_id: AppImageId,
        verdict: Literal["pick", "reject", "note"],
        reason: Annotated[str, Field(max_length=4 * VERDICT_REASON_MAX_CHARS)] = "",
    ) -> Annotated[CallToolResult, AppVerdict]:
        with tool_errors():
            record = await critic.record_verdict(image_id, verdict, reason)
            after = (await critic.verdicts([record.image_id])).get(record.image_id)
        standing = after.standing.verdict if after and after.standing else None
        result = AppVerdict(
            image_id=record.image_id,
            verdict=record.verdict,
            reason=record.reason,
            standing=standing,  # type: ignore[arg-type]
        )
        said = f": {record.reason}" if record.reason else ""
        return CallToolResult(
            content=[
                TextContent(
                    type="text", text=f"The person chose {record.verdict} on {record.image_id}{said}."
                )
            ],
            structured_content=result.model_dump(mode="json"),
        )

    apps.add_html_resource(
        VIEW_URI,
        view_html(),
        name="klein-agent-view",
        title="klein-agent images",
        description="The pictures of a result, their lineage, A/B compare, pick/reject, vary and mask painting.",
        csp=ResourceCsp(connect_domains=[], resource_domains=[]),  # no network: pictures arrive as data: URIs
        prefers_border=True,
    )
    return apps


def _app_only(tool: dict[str, Any]) -> bool:
    visibility = ((tool.get("_meta") or {}).get("ui") or {}).get("visibility")
    return isinstance(visibility, list) and "model" not in visibility


def _without_ui(item: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in (item.get("_meta") or {}).items() if k != "ui"}
    plain = {k: v for k, v in item.items() if k != "_meta"}
    return {**plain, "_meta": meta} if meta else plain


class AppsForApps(ServerMiddleware[Any]):
    """Keeps the App to clients that advertised the Apps extension. For any other client: `tools/list` leaves out
    the app-only tools and every tool's `_meta.ui`, `resources/list` leaves out `ui://` resources, and calling an
    app-only tool answers as for a tool that does not exist. What such a client sees is then what it saw before."""

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """Refuse an app-only call from a client without Apps; otherwise pass on and trim the listings."""
        if ctx.method == "tools/call" and not client_supports_apps(ctx):
            name = (ctx.params or {}).get("name")
            if name in APP_ONLY:  # the SDK's own answer for a name it does not know
                return CallToolResult(
                    content=[TextContent(type="text", text=f"Unknown tool: {name}")], is_error=True
                )
        result = await call_next(ctx)
        if not isinstance(result, dict) or client_supports_apps(ctx):
            return result
        if ctx.method == "tools/list" and isinstance(result.get("tools"), list):
            tools = [_without_ui(t) for t in result["tools"] if not _app_only(t)]
            return {**result, "tools": tools}
        if ctx.method == "resources/list" and isinstance(result.get("resources"), list):
            kept = [r for r in result["resources"] if not str(r.get("uri", "")).startswith("ui://")]
            return {**result, "resources": kept}
        return result
