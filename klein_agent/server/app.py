"""`build_server`: one MCPServer over a `Studio`, with the tools, resources and prompts in a fixed order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mcp.server import MCPServer
from mcp_types import Tool

from klein_agent import __version__
from klein_agent.rules import families
from klein_agent.rules.families import Family
from klein_agent.server.apps import AppsForApps, build_apps
from klein_agent.server.arguments import ArgumentChecks
from klein_agent.server.messages import MessageBudget
from klein_agent.server.prompts import register_prompts
from klein_agent.server.resources import register_resources
from klein_agent.server.schemas import optional_scalars_as_their_type
from klein_agent.server.tools import critique, generation, library
from klein_agent.service.studio import Studio

INSTRUCTIONS = """\
Local {title} image tools for try -> critique -> retry loops. generate makes images from text, edit \
changes one image, compose combines up to {references} ("image 1", "image 2", ... in the prompt), {inpaint}. Each of them takes loras=[{{name, scale}}] to apply the LoRA adapters (styles, \
subjects) that server_status lists. Every image is stored and \
referenced by its id (img_...); results carry a preview, the ids and seeds, and image://<id> links \
(image://<id>/meta is the recipe). Describe what the picture should show, positively. If you cannot see a \
preview, call view_image. Critique before retrying: after every edit call compare_images(a=input, b=result) \
and read its verdict (changed boxes on the 16-px grid go straight into inpaint when an edit leaked); zoom with \
view_image(region=[x, y, w, h]) before judging faces, hands or text; record_verdict pick, reject or note with a \
reason (list_images and the gallery show them). The iterate_image prompt walks the whole loop. Calls run one at \
a time; server_status shows the model and the queue."""


def instructions(family: Family) -> str:
    """The server's instructions for a model of `family`: its title, reference limit and whether inpaint runs."""
    inpaint = (
        "inpaint repaints one region (boxes or a mask) and keeps the rest"
        if family.no_masked_edits is None
        else f"inpaint is refused on {family.no_masked_edits} (no reference pipeline): use edit"
    )
    return INSTRUCTIONS.format(title=family.title, references=family.max_references, inpaint=inpaint)


class KleinServer(MCPServer[Studio]):
    """The SDK's server, publishing every tool's input schema the way older clients read it
    (`klein_agent.server.schemas`)."""

    async def list_tools(self) -> list[Tool]:
        """The tools, in registration order, with their input schemas as published."""
        return [
            tool.model_copy(update={"input_schema": optional_scalars_as_their_type(tool.input_schema)})
            for tool in await super().list_tools()
        ]


def build_server(studio: Studio, gallery_command: str | None = None) -> MCPServer[Studio]:
    """An MCPServer over `studio`. Its lifespan starts loading the model in the background and returns at once,
    so `initialize` is answered while the weights load; the first image call waits for them. `gallery_command`:
    what `server_status` tells the person to run for the gallery (`gallery.command.command_line`; default: the
    gallery of the store's folder)."""

    @asynccontextmanager
    async def lifespan(server: MCPServer[Studio]) -> AsyncIterator[Studio]:
        studio.engine.start()  # idempotent: several in-process clients may share one engine
        yield studio

    checks = ArgumentChecks(reference_limit=studio.reference_limit)  # the model's own, as the CLI says it
    family = families.family(studio.config.family)
    mcp: MCPServer[Studio] = KleinServer(
        "klein-agent",
        title="klein-agent",
        # what klein-agent does; the instructions say what this server's model (`family`) takes
        description=f"{families.ALL_TITLES} image generation and editing for agents, with a persistent image store.",
        instructions=instructions(family),
        version=__version__,
        lifespan=lifespan,
        middleware=[AppsForApps(), checks, MessageBudget()],  # Apps first: a hidden tool is never checked
        extensions=[build_apps(studio)],  # the MCP App: its view and the tools only it calls
    )
    checks.bind(mcp)
    generation.register(mcp, studio)
    library.register(mcp, studio, gallery_command)
    critique.register(mcp, studio)
    register_resources(mcp, studio)
    register_prompts(mcp, studio)
    return mcp
