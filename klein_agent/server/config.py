"""Limits and settings of one server, chosen on the command line (`klein-agent serve --help`)."""

from __future__ import annotations

from dataclasses import dataclass

MIN_SIDE = 64
MAX_SIDE = 2048
MULTIPLE = 16
MAX_IMAGES_PER_CALL = 4
MAX_REFERENCES = 4  # the BFL API limit for klein; the model's own limit (GeneratorInfo) may be lower
MAX_STEPS = 100
MAX_PROMPT_CHARS = 2000  # the text encoder keeps 512 tokens after templating; more text is ignored anyway
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1
MAX_SESSION_CHARS = 64
PREVIEW_MAX_EDGE = 1024  # long edge of an inline preview
VIEW_MAX_EDGE = 1568  # the most the Anthropic vision models use; view_image may ask for up to this
PREVIEW_BUDGET_B64 = 700_000  # base64 characters for all inline images of one result (Claude Desktop: 1 MB)
MAX_VIEW_IMAGES = 16


@dataclass(frozen=True)
class ServerConfig:
    # width x height x num_images of one call. 2048x2048 (or 4 images of 1024x1024) takes a few seconds on a
    # data-centre GPU with distilled klein; lower it on small GPUs so a call stays well under the ~60 s a
    # client such as Claude Desktop waits.
    max_pixels_per_call: int = 2048 * 2048
    preview_max_edge: int = PREVIEW_MAX_EDGE
    preview_budget_b64: int = PREVIEW_BUDGET_B64
