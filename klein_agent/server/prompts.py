"""MCP prompts from the markdown files in `prompts/`.

A file is a small front matter and a body:

    ---
    name: iterate_image
    title: Iterate on an image toward a goal
    description: One line for the client's prompt picker.
    argument goal: required | What the finished picture must show.
    argument image_id: optional | A stored image to start from.
    attach: image_id
    ---
    Body text with {{goal}} and {{image_id|text used when the argument is missing}}.

`attach` names an argument holding one or more stored image ids; the prompt then carries a preview of them
(a labelled contact sheet for several) as an image message after the text.

Installed from a wheel, the folder is `klein_agent/prompts` (pyproject force-includes it there); in a source
checkout it is the repository's top-level `prompts/`.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver.prompts.base import Message, Prompt, PromptArgument, UserMessage
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, ImageContent

from klein_agent.rules import limits, upsampling
from klein_agent.rules.image_refs import split_image_refs
from klein_agent.rules.layout import LayoutBox, check_layout, layout_box, layout_request
from klein_agent.server.results import image_block
from klein_agent.service.studio import EXPECTED_ERRORS, Studio

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\|([^}]*))?\}\}")
_ARGUMENT = re.compile(r"argument\s+([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(required|optional)\s*\|\s*(.*)")


@dataclass(frozen=True)
class PromptFile:
    """One parsed prompt file: its front matter fields and its body, still with `{{placeholders}}`."""

    name: str
    title: str | None
    description: str
    arguments: list[PromptArgument]
    attach: str | None
    body: str


def prompts_dir() -> Traversable:
    """The prompt folder: `klein_agent/prompts` in an installed wheel, else the checkout's `prompts/`."""
    packaged = importlib.resources.files("klein_agent") / "prompts"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "prompts"


def parse_prompt_file(text: str, source: str) -> PromptFile:
    """Parse one prompt file (format in the module docstring).

    Raises ValueError naming `source` for a missing or unclosed front matter, an unreadable line, a missing
    name or description, or an `attach` that names no argument.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    if not lines or lines[0].strip() != "---":
        raise ValueError(f"{source}: a prompt file starts with a '---' front matter line")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise ValueError(f"{source}: the front matter has no closing '---' line") from None
    fields: dict[str, str] = {}
    arguments: list[PromptArgument] = []
    for line in lines[1:end]:
        if not line.strip():
            continue
        if m := _ARGUMENT.fullmatch(line.strip()):
            name, need, description = m.groups()
            arguments.append(
                PromptArgument(name=name, description=description.strip(), required=need == "required")
            )
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"{source}: cannot read front matter line {line!r}")
        fields[key.strip()] = value.strip()
    if "name" not in fields or "description" not in fields:
        raise ValueError(f"{source}: the front matter needs name and description")
    attach = fields.get("attach") or None
    if attach is not None and attach not in {a.name for a in arguments}:
        raise ValueError(f"{source}: attach names {attach!r}, which is not an argument")
    return PromptFile(
        name=fields["name"],
        title=fields.get("title"),
        description=fields["description"],
        arguments=arguments,
        attach=attach,
        body="\n".join(lines[end + 1 :]).strip() + "\n",
    )


def load_prompt_files(folder: Traversable | None = None) -> list[PromptFile]:
    """Every `*.md` file of `folder` (default: `prompts_dir()`), parsed, in file-name order."""
    folder = prompts_dir() if folder is None else folder
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".md")), key=lambda f: f.name)
    return [parse_prompt_file(f.read_text(encoding="utf-8"), f.name) for f in files]


def render_body(body: str, values: dict[str, str]) -> str:
    """Fill `{{name}}` and `{{name|fallback}}`; a missing or blank value gives the fallback, else nothing."""

    def substitute(m: re.Match[str]) -> str:
        value = values.get(m.group(1), "").strip()
        return value if value else (m.group(2) or "").strip()

    return _PLACEHOLDER.sub(substitute, body)


def register_prompts(mcp: MCPServer[Any], studio: Studio, files: list[PromptFile] | None = None) -> None:
    """Add one MCP prompt per prompt file (default: `load_prompt_files()`) to `mcp`, and `flux3_caption`."""
    for spec in load_prompt_files() if files is None else files:
        mcp.add_prompt(_prompt(spec, studio))
    mcp.add_prompt(caption_prompt(studio))


def caption_prompt(studio: Studio) -> Prompt:
    """`flux3_caption`: BFL's upsampler instructions for the calling agent, so it writes the caption a FLUX 3 call
    encodes. Built from the upsampler's own system prompts and user-turn layout (`rules.upsampling`), the mode
    following the inputs as the upsampler's does (t2i without images, i2i with them); the images are attached as
    one contact sheet labelled 1, 2, ... (the upsampler sees them one by one: the sheet keeps the message small).
    With `layout` (the tools' JSON list of {"box", "label"}) the box mode: its system prompt, the request wrapped
    around the locked rows as the upsampler gets it, and the same layout to pass with the caption."""

    async def render(request: str, image_ids: str = "", layout: str = "") -> list[Message]:
        try:
            ids = split_image_refs(image_ids) if image_ids.strip() else []
            boxes = _layout_argument(layout)
        except ValueError as exc:  # RequestError is a ValueError
            raise MCPError(code=INVALID_PARAMS, message=str(exc)) from exc
        if len(ids) > limits.UPSAMPLER_MAX_REFERENCES:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"image_ids: the upsampler takes at most {limits.UPSAMPLER_MAX_REFERENCES} images, got "
                f"{len(ids)}",
            )
        mode = upsampling.mode(len(ids), bool(boxes))
        tool = "generate" if not ids else "edit" if len(ids) == 1 else "compose"
        rows = upsampling.layout_rows(boxes, len(ids)) if boxes else None
        asked = layout_request(request, rows) if rows else request
        turn = upsampling.edit_scaffold(asked, bool(rows)) if ids else asked
        seen = " (attached below as one contact sheet, labelled 1, 2, ...)" if ids else ""
        also = (
            " and `layout` set to the same boxes (the server checks your table and puts the locked boxes back "
            "exactly, as it does the upsampler's)"
            if rows
            else ""
        )
        text = (
            "Write the caption a FLUX 3 [klein] model will encode, as BFL's prompt upsampler would: the model was "
            f"trained on such captions. Follow these instructions exactly (BFL's upsampler, mode {mode}):\n\n"
            f"{upsampling.system_prompt(mode)}\n\n---\n\nThe request{seen}:\n\n{turn}\n\n---\n\n"
            f"Then call `{tool}` with `prompt` set to the request as given, `caption` set to exactly what you "
            f"wrote (no quotes or commentary){also}; the recipe keeps them, and a rerun uses your caption verbatim."
        )
        messages: list[Message] = [UserMessage(text)]
        if ids:
            messages.append(UserMessage(await _sheet(studio, image_ids)))
        return messages

    return Prompt(
        name="flux3_caption",
        title="Write a FLUX 3 caption",
        description="BFL's prompt-upsampler instructions for a FLUX 3 [klein] request: write the long caption "
        "the model was trained on, then pass it as `caption` to generate, edit or compose.",
        arguments=[
            PromptArgument(
                name="request", description="The short request, as the user said it.", required=True
            ),
            PromptArgument(
                name="image_ids",
                description="For an edit or a composition: the stored image ids, in order (comma or space "
                "separated); omit for a new picture.",
                required=False,
            ),
            PromptArgument(
                name="layout",
                description="Boxes placing objects, as the tools' `layout` takes them: a JSON list of "
                '{"box": [y_min, x_min, y_max, x_max] in 0-1, "label": "..."}; omit for no layout.',
                required=False,
            ),
        ],
        fn=render,
        context_kwarg=None,
    )


def _layout_argument(text: str) -> tuple[LayoutBox, ...]:
    """The flux3_caption prompt's `layout` (JSON text, bounded by the client's message), checked as the tools
    check it. Raises ValueError naming the argument, or RequestError naming the box."""
    if not text.strip():
        return ()
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f'layout is not JSON ({exc.msg} at character {exc.pos}): give a list of {{"box": [y_min, x_min, '
            'y_max, x_max], "label": "..."}'
        ) from exc
    if not isinstance(values, list):
        raise ValueError(
            'layout is not a JSON list: give [{"box": [y_min, x_min, y_max, x_max], "label": "..."}]'
        )
    boxes = tuple(layout_box(value, k) for k, value in enumerate(values, start=1))
    check_layout(boxes)
    return boxes


def _prompt(spec: PromptFile, studio: Studio) -> Prompt:
    async def render(**values: str) -> list[Message]:
        messages: list[Message] = [UserMessage(render_body(spec.body, values))]
        attached = values.get(spec.attach, "") if spec.attach else ""
        if attached.strip():
            messages.append(UserMessage(await _sheet(studio, attached)))
        return messages

    return Prompt(
        name=spec.name,
        title=spec.title,
        description=spec.description,
        arguments=spec.arguments,
        fn=render,
        context_kwarg=None,
    )


async def _sheet(studio: Studio, attached: str) -> ImageContent:
    """The preview or contact sheet of the ids in one prompt argument (`rules.image_refs.split_image_refs`)."""
    try:
        ids = split_image_refs(attached)
        sheet = await studio.contact_sheet(ids, max_edge=studio.config.preview_max_edge)
    except (
        EXPECTED_ERRORS
    ) as exc:  # a protocol error carries its message to the client; other errors would not
        raise MCPError(code=INVALID_PARAMS, message=str(exc)) from exc
    return image_block(sheet.preview)
