"""Every answer fits one message: resource reads whose image is over `limits.MAX_MESSAGE_BLOB_BYTES` are sent as
lossless WebP when that fits, else refused with an error that says to use export_image.

Why: the TypeScript SDK's stdio transport drops the whole connection on a line of 10 MiB, and `image://` of a
2048x2048 picture with fine detail is a 16 MiB line. Tool results carry previews within `PREVIEW_BUDGET_B64`, so
only resource reads need this; the stdio boundary (`server.stdio`) still refuses any line over the limit as a last
resort. This runs after the SDK has built the answer, so it sees exactly the blob that would go out.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import anyio.to_thread
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR

from klein_agent.rules import limits
from klein_agent.rules.image_refs import ImageRefError, parse_image_ref
from klein_agent.service.message_images import Fitted, fit_png

log = logging.getLogger("klein_agent.serve")


class MessageBudget(ServerMiddleware[Any]):
    """Keeps `resources/read` answers under `limits.MAX_MESSAGE_BYTES` (see the module docstring)."""

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """Pass the request on; shrink or refuse a resource read whose blob would not fit one message."""
        result = await call_next(ctx)
        if ctx.method != "resources/read" or not isinstance(result, dict):
            return result
        contents = result.get("contents")
        if not isinstance(contents, list):
            return result
        fitted_contents = [await _fitted(item) for item in contents]
        return {**result, "contents": fitted_contents}


async def _fitted(item: Any) -> Any:
    blob = item.get("blob") if isinstance(item, dict) else None
    budget = limits.MAX_MESSAGE_BLOB_BYTES
    if not isinstance(blob, str) or len(blob) <= budget // 3 * 4:
        return item
    uri = str(item.get("uri"))
    data = base64.b64decode(blob)
    fitted = (
        await anyio.to_thread.run_sync(fit_png, data, budget)
        if item.get("mimeType") == "image/png"
        else Fitted(None, str(item.get("mimeType")), len(data), None)
    )
    if fitted.data is None:
        log.info("%s is %d bytes, over the %d a message may carry: refused", uri, len(data), budget)
        raise MCPError(code=INTERNAL_ERROR, message=too_large_message(uri, fitted), data={"uri": uri})
    log.info("%s sent as lossless WebP (%d bytes instead of a %d-byte PNG)", uri, len(fitted.data), len(data))
    return {**item, "blob": base64.b64encode(fitted.data).decode("ascii"), "mimeType": fitted.mime_type}


def too_large_message(uri: str, fitted: Fitted) -> str:
    """The error for a resource that fits no message: its size, the limit, and what to call instead."""
    mib = 2**20
    webp = f"; as lossless WebP {fitted.webp_bytes / mib:.1f} MiB" if fitted.webp_bytes is not None else ""
    try:
        image_id: str | None = parse_image_ref(uri)
    except ImageRefError:  # not an image's URI (a template this check does not know): name no id
        image_id = None
    call = f"with image_id {image_id!r} and " if image_id else "with the image's id and "
    return (
        f"{uri} is {fitted.png_bytes / mib:.1f} MiB as PNG{webp}: over the {limits.MAX_MESSAGE_BLOB_BYTES / mib:.1f} "
        f"MiB of image data one message may carry ({limits.MAX_MESSAGE_BYTES // mib} MiB with its base64 and "
        f"framing; clients drop larger messages). Call export_image {call}a path to write "
        "the full-resolution PNG to a file, or view_image to look at it."
    )
