"""Limits and settings of one server, chosen on the command line (`klein-agent serve --help`)."""

from __future__ import annotations

from dataclasses import dataclass

from klein_agent.rules.limits import MAX_PIXELS_PER_CALL

# Presentation limits of the server's results; the limits of requests live in klein_agent.rules.limits.
PREVIEW_MAX_EDGE = 1024  # long edge of an inline preview
VIEW_MAX_EDGE = 1568  # the most the Anthropic vision models use; view_image may ask for up to this
PREVIEW_BUDGET_B64 = 700_000  # base64 characters for all inline images of one result (Claude Desktop: 1 MB)
MAX_VIEW_IMAGES = 16


@dataclass(frozen=True)
class ServerConfig:
    # width x height x num_images of one call. 2048x2048 (or 4 images of 1024x1024) takes a few seconds on a
    # data-centre GPU with distilled klein; lower it on small GPUs so a call stays well under the ~60 s a
    # client such as Claude Desktop waits.
    max_pixels_per_call: int = MAX_PIXELS_PER_CALL
    preview_max_edge: int = PREVIEW_MAX_EDGE
    preview_budget_b64: int = PREVIEW_BUDGET_B64
