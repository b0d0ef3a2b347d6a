"""The provenance every picture carries, in the store and in CLI-written PNGs alike. No torch.

`provenance` is what decides the pixels plus how the picture was asked for (tool, parents); it is written into
the PNG's `klein-agent` text chunk by `pngfile.encode_png`, so it must be the same on every re-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from klein_agent.rules.requests import GenerationResult

RERUNNABLE = ("generate", "edit", "compose", "inpaint")


def provenance(result: GenerationResult, k: int, *, tool: str, parents: Sequence[str]) -> dict[str, Any]:
    """Picture k's recipe (prompt, seed, size, steps, guidance, model, variant) with its tool and parents: store
    image ids from the server, the input files as given from the CLI, in "image 1, image 2" order."""
    return {"tool": tool, **result.recipe(k), "parents": list(parents)}


def rerun_call(recipe: dict[str, Any], parents: Sequence[str]) -> dict[str, Any] | None:
    """The MCP tool call that makes a stored picture again, pixel for pixel: {"name", "arguments"}, spelt as MCP's
    `tools/call` params are (the recipe itself keeps its "tool" field), or None for an imported picture (or a
    recipe from another tool). `parents` are the stored image's parent ids, used when the recipe does not list
    them."""
    tool = recipe.get("tool")
    if tool not in RERUNNABLE:
        return None
    keys: tuple[str, ...] = (
        ("prompt", "seed", "steps", "guidance", "strength")
        if tool == "inpaint"
        else ("prompt", "width", "height", "seed", "steps", "guidance")
    )
    if recipe.get("reference_crop"):
        # FLUX 3 made it on its reference's canvas and cropped it back: a size given would turn the crop-back off
        keys = tuple(key for key in keys if key not in ("width", "height"))
    arguments: dict[str, Any] = {key: recipe[key] for key in keys if key in recipe}
    # FLUX 3: the stored caption, verbatim, so a server with another upsampler (or none) makes the same pixels
    if recipe.get("caption") is not None:
        arguments["caption"] = recipe["caption"]
    if recipe.get("layout"):  # already in the caption's table; reconciling it again changes nothing
        arguments["layout"] = [dict(box) for box in recipe["layout"]]
    if recipe.get("loras"):
        arguments["loras"] = [dict(choice) for choice in recipe["loras"]]
    if recipe.get("cache"):
        arguments["cache"] = dict(recipe["cache"])
    named = list(recipe.get("parents", parents))
    if tool == "inpaint":
        mask = recipe.get("mask") or {}
        region = {"mask": mask["image"]} if "image" in mask else {"boxes": mask.get("boxes", [])}
        arguments = {"image": named[0], **region, **arguments}
        if named[1:]:
            arguments["references"] = named[1:]
    elif tool == "edit":
        arguments = {"image": named[0], **arguments}
    elif tool == "compose":
        arguments = {"images": named, **arguments}
    return {"name": tool, "arguments": arguments}


def rerun_command(recipe: dict[str, Any], parents: Sequence[str], out: str) -> list[str] | None:
    """The `klein-agent generate` argv that makes a stored picture again (None for an imported one): the recipe's
    model, prompt, seed, size, steps and guidance (when the model took one), its step cache, each parent as `--image <id>.png`
    (the name the gallery's download gives it), and `--out out`."""
    call = rerun_call(recipe, parents)
    if call is None:
        return None
    args = call["arguments"]
    argv = [
        "klein-agent",
        "generate",
        "--model",
        str(recipe.get("model", "MODEL")),
        "--prompt",
        str(args["prompt"]),
    ]
    if args.get("caption") is not None:
        argv += ["--caption", str(args["caption"])]
    for box in args.get("layout", []):  # repr-exact floats: the same grid rows
        argv += ["--layout", ",".join(repr(float(v)) for v in box["box"]) + f":{box['label']}"]
    for key in ("seed", "width", "height", "steps", "guidance", "strength"):
        if args.get(key) is not None:
            argv += [f"--{key}", str(args[key])]
    named = [args["image"]] if "image" in args else list(args.get("images", []))
    named += list(args.get("references", []))
    for parent in named:
        argv += ["--image", f"{parent}.png"]
    for choice in args.get("loras", []):  # adapters are named by their file's stem
        argv += ["--lora", f"{choice['name']}.safetensors:{choice['scale']}"]
    if args.get("cache"):
        argv += ["--step-cache", f"{args['cache']['kind']}:{args['cache']['threshold']!r}"]
    if "mask" in args:
        argv += ["--mask", f"{args['mask']}.png"]
    for box in args.get("boxes", []):
        argv += ["--box", ",".join(str(v) for v in box)]
    return [*argv, "--out", out]
