"""The critique tools: compare_images (what changed between two stored images) and record_verdict (pick, reject
or note). Thin layers over `klein_agent.service.critique`; view_image's region lives with view_image
(tools/library.py)."""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from mcp.server import MCPServer
from mcp_types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import Field

from klein_agent.rules.limits import CHANGE_DELTA_E, SIZE_MULTIPLE, VERDICT_REASON_MAX_CHARS
from klein_agent.rules.masks import box_from_values
from klein_agent.server.apps import VIEW_META
from klein_agent.server.critique_models import ChangedRegion, CompareResult, VerdictResult
from klein_agent.server.errors import tool_errors
from klein_agent.service.critique.compare import DELTA_E
from klein_agent.service.critique.critic import Critic
from klein_agent.service.studio import Studio, now_iso

ImageIdArg = Annotated[
    str, Field(min_length=1, max_length=200, description="An image id (img_...) or image://<id>.")
]
BoxArg = Annotated[
    list[float] | None,
    Field(
        description="The box you meant to change, [x, y, width, height] in px of b, or fractions of b when all "
        "four are at most 1 (as inpaint's boxes). The verdict then says whether the change stayed inside it."
    ),
]
VerdictArg = Annotated[
    Literal["pick", "reject", "note"],
    Field(description="pick: keep this one; reject: do not use it; note: a remark that changes neither."),
]
ReasonArg = Annotated[
    str,
    Field(
        max_length=4 * VERDICT_REASON_MAX_CHARS,  # the rule's own check names the real limit, after trimming
        description=f"Why, in a sentence (at most {VERDICT_REASON_MAX_CHARS} characters; a note needs one).",
    ),
]


def register(mcp: MCPServer, studio: Studio) -> Critic:
    """Add compare_images and record_verdict to `mcp`, in that order; returns the Critic they share."""
    critic = Critic(studio.store)

    @mcp.tool(
        name="compare_images",
        meta=VIEW_META,  # hosts with MCP Apps show the result in the view; others never see it
        title="Compare two images",
        description="What changed from image a (before, e.g. an edit's input) to image b (after): the changed "
        f"regions as boxes in px of b and as fractions, on the {SIZE_MULTIPLE}-px token grid so they can go "
        "straight into inpaint's boxes; the changed area in %; SSIM and the mean colour difference (CIE76 ΔE); "
        "an overlay picture (b in grey, changes in red, boxes in yellow) and a one-line verdict. Pictures of "
        "different sizes are aligned as an edit maps its input to its output. Give expected_box (the region "
        "you asked to change) to learn whether the edit leaked outside it. Call it after every edit.",
        annotations=ToolAnnotations(
            title="Compare two images",
            read_only_hint=True,
            destructive_hint=False,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    async def compare_images(
        a: ImageIdArg, b: ImageIdArg, expected_box: BoxArg = None
    ) -> Annotated[CallToolResult, CompareResult]:
        with tool_errors():
            expected = None if expected_box is None else box_from_values(expected_box, name="expected_box")
            compared = await critic.compare(a, b, expected=expected)
        c = compared.comparison
        result = CompareResult(
            a=compared.a.image_id,
            b=compared.b.image_id,
            a_size=list(c.a_size),
            b_size=list(c.b_size),
            alignment=c.alignment,
            verdict=c.verdict,
            changed_pct=c.changed_pct,
            ssim=c.ssim,
            mean_delta_e=c.mean_delta_e,
            delta_e=DELTA_E,
            threshold=CHANGE_DELTA_E,
            regions=[
                ChangedRegion(
                    box_px=list(r.box_px),
                    box_frac=list(r.box_frac),
                    area_pct=r.area_pct,
                    mean_delta_e=r.mean_delta_e,
                )
                for r in c.regions
            ],
            region_count=c.region_count,
            expected_box=None if c.expected_box is None else list(c.expected_box),
            outside_pct=c.outside_pct,
        )
        lines = [c.verdict, f"{result.a} -> {result.b}: {c.alignment}."]
        for k, r in enumerate(c.regions, start=1):
            lines.append(
                f"region {k}: box {list(r.box_px)} px = {list(r.box_frac)} of b, {r.area_pct} % of the picture, "
                f"mean ΔE {r.mean_delta_e}"
            )
        if c.region_count > len(c.regions):
            lines.append(f"... and {c.region_count - len(c.regions)} smaller region(s).")
        lines.append(
            f"Overlay: b in grey, changed tokens red (ΔE over {CHANGE_DELTA_E:g}), regions yellow"
            + (", your box cyan." if c.expected_box is not None else ".")
        )
        overlay = ImageContent(
            type="image", data=base64.b64encode(c.overlay).decode("ascii"), mime_type=c.overlay_mime_type
        )
        return CallToolResult(
            content=[overlay, TextContent(type="text", text="\n".join(lines))],
            structured_content=result.model_dump(mode="json"),
        )

    @mcp.tool(
        name="record_verdict",
        title="Record a verdict on an image",
        description="Record what you decided about a stored image: pick (keep it), reject (do not use it) or a "
        "note, with a short reason. The latest pick or reject is the image's standing; notes add up. "
        "list_images shows them (and filters by standing), and so does the gallery the person sees.",
        annotations=ToolAnnotations(
            title="Record a verdict on an image",
            read_only_hint=False,
            destructive_hint=False,  # it adds a record; a later pick or reject supersedes, nothing is lost
            idempotent_hint=False,
            open_world_hint=False,
        ),
    )
    async def record_verdict(
        image_id: ImageIdArg, verdict: VerdictArg, reason: ReasonArg = ""
    ) -> Annotated[CallToolResult, VerdictResult]:
        with tool_errors():
            record = await critic.record_verdict(image_id, verdict, reason)
            shown = await critic.verdicts([record.image_id])
        standing = shown[record.image_id].standing if record.image_id in shown else None
        result = VerdictResult(
            image_id=record.image_id,
            verdict=record.verdict,
            reason=record.reason,
            recorded_at=now_iso(record.at),
            standing=standing.verdict if standing else None,
        )
        said = f": {record.reason}" if record.reason else ""
        text = f"Recorded {record.verdict} on {record.image_id}{said}. Standing: {result.standing or 'none'}."
        return CallToolResult(
            content=[TextContent(type="text", text=text)], structured_content=result.model_dump(mode="json")
        )

    return critic
