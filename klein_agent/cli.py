"""`klein-agent`: one console script with four commands.

    klein-agent generate --model MODEL --prompt TEXT [--image PATH ...] --out FILE.png
    klein-agent serve --model MODEL [--store DIR] [--http] ...
    klein-agent gallery [--store DIR] [--host 127.0.0.1] [--port P] [--open]
    klein-agent store copy SRC DST [--blobs s3://BUCKET/PREFIX]   (store_command.py)

stdout belongs to the MCP wire under `serve`, so everything human-readable goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from klein_agent import __version__
from klein_agent.logs import configure_logging, parse_level
from klein_agent.model_options import add_model_arguments, generator_factory
from klein_agent.option_types import positive_float
from klein_agent.rules import families, limits
from klein_agent.rules.limits import MAX_PIXELS_PER_CALL
from klein_agent.rules.step_caches import DESCRIPTION as STEP_CACHE_DESCRIPTION

if TYPE_CHECKING:
    from klein_agent.rules.calls import Decoded, ImageCall, Prepare
    from klein_agent.service.inputs import InputPolicy

log = logging.getLogger("klein_agent")


def main(argv: list[str] | None = None) -> int:
    """Run the command `argv` names (default: sys.argv); returns the exit status.

    0 on success, 2 with a one-line message on stderr for bad input, a missing file or a failed generation
    (ValueError, OSError, RuntimeError), 130 on Ctrl-C. Run as the program (`argv` None), `serve` and `generate`
    end the process as soon as they have closed everything (`exit_now`): tearing down torch and transformers
    would take seconds more.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging("DEBUG" if args.verbose else args.log_level)
    try:
        result: int = args.run(args)
    except KeyboardInterrupt:
        ProgressBar.end_line()  # Ctrl-C in the middle of a bar: the shell's prompt starts on a line of its own
        result = 130
    except (ValueError, OSError, RuntimeError) as err:  # bad input, a missing file, NaN output: a message
        ProgressBar.end_line()
        print(f"klein-agent: error: {err}", file=sys.stderr)
        result = 2
    if argv is None and args.command in ("serve", "generate"):
        exit_now(result)
    return result


def exit_now(status: int) -> None:
    """End the process with `status` once the output is flushed, skipping the interpreter's teardown.

    Called only after a command has closed what it opened (engine, store, files written and closed): what is
    left is Python unloading torch and transformers module by module, 2-3 s after Ctrl-C for nothing."""
    logging.shutdown()  # flushes the handlers (stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach it
            stream.flush()
    os._exit(status)


# Shown by `--help`: a first command that runs anywhere (the tiny model needs no weights), then real ones.
GENERATE_EXAMPLES = """examples:
  klein-agent generate --model tiny --prompt "a red fox in the snow" --out fox.png
  klein-agent generate --model black-forest-labs/FLUX.2-klein-4B --prompt "a red fox" --seed 7 --out fox.png
  klein-agent generate --model black-forest-labs/FLUX.2-klein-4B --prompt "make it night" --image fox.png \\
      --out night.png
  klein-agent generate --model black-forest-labs/FLUX.2-klein-4B --prompt "a round window" --image fox.png \\
      --box 0.5,0,0.5,0.5 --out window.png"""
EXAMPLES = f"""{GENERATE_EXAMPLES}
  klein-agent serve --model black-forest-labs/FLUX.2-klein-4B    (started by an MCP client, not typed)
  klein-agent gallery

'klein-agent COMMAND --help' lists each command's options."""


def build_parser() -> argparse.ArgumentParser:
    """The `klein-agent` parser with its `generate`, `serve` and `gallery` commands; each sets `run` to its handler.

    Building it imports neither MCP nor torch: each command's handler imports what it needs when it runs.
    """
    parser = argparse.ArgumentParser(
        prog="klein-agent",
        description=f"{families.ALL_TITLES} for agents that iterate on pictures",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"klein-agent {__version__}")
    add_logging_arguments(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate",
        help="make one or more pictures and write PNG files",
        epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_logging_arguments(gen)
    add_model_arguments(gen)
    gen.add_argument(
        "--prompt",
        required=True,
        help='what to make, or with --image what to change ("make it night"); name references as "image 1", '
        '"image 2"',
    )
    gen.add_argument(
        "--caption",
        default=None,
        help="FLUX 3 [klein]: the caption the model encodes, used verbatim instead of upsampling --prompt (which "
        "the recipe still records); a rerun of a FLUX 3 picture passes its stored caption",
    )
    gen.add_argument(
        "--layout",
        action="append",
        default=[],
        metavar="Y0,X0,Y1,X1:LABEL",
        help="FLUX 3 [klein]: place LABEL in this box (repeatable, at most "
        f"{limits.MAX_LAYOUT_BOXES}): y_min,x_min,y_max,x_max in fractions of the picture, top-left origin, as "
        "diffusers takes them (--layout '0.1,0.05,0.9,0.45:a red umbrella' is a tall box on the left). The boxes "
        "go into the caption's box table: the upsampler's box mode, or put back into --caption",
    )
    gen.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help='a reference picture; one is an edit, several a composition ("image 1", "image 2", ...)',
    )
    gen.add_argument(
        "--width",
        type=int,
        default=None,
        help=f"multiple of {limits.SIZE_MULTIPLE} (default: the first image's size as the model prepares it, at "
        f"most ~1 Mpx, else {limits.DEFAULT_TOKENS_PER_SIDE * limits.SIZE_MULTIPLE}; with only --width or --height "
        "the other keeps that default's aspect ratio)",
    )
    gen.add_argument(
        "--height", type=int, default=None, help=f"multiple of {limits.SIZE_MULTIPLE} (see --width)"
    )
    gen.add_argument(
        "--seed", type=int, default=None, help="0 to 4294967295 (default: a random one, reported on stderr)"
    )
    gen.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"default: the model's ({limits.DISTILLED_STEPS} distilled, {limits.BASE_STEPS} Base; FLUX 3: "
        f"{limits.FLUX3_DISTILLED_STEPS} distilled, {limits.FLUX3_BASE_STEPS} Base)",
    )
    gen.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"CFG scale for Base models (default {limits.BASE_GUIDANCE}; FLUX 3 Base: "
        f"{limits.FLUX3_BASE_GUIDANCE}, diffusers' default, where BFL's README says CFG 4)",
    )
    gen.add_argument(
        "--num-images",
        type=int,
        default=1,
        metavar="N",
        help=f"pictures to make, 1 to {limits.MAX_IMAGES_PER_CALL} (default: 1): seeds seed, seed+1, ...; files "
        "FILE-1.png, ...",
    )
    gen.add_argument(
        "--mask",
        default=None,
        metavar="PATH",
        help="repaint only where this picture is white (black keeps); with --image: the first --image is "
        "repainted, further ones guide the repainted area. Any size with the image's aspect ratio",
    )
    gen.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="X,Y,W,H",
        help="repaint this rectangle of the first --image instead of a mask (repeatable): pixels, or all four at "
        "most 1 for fractions (--box 0.5,0,0.5,0.5 is the top-right quarter)",
    )
    gen.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --mask/--box: how much of the region changes, above 0 to 1 "
        f"(default {limits.DEFAULT_STRENGTH})",
    )
    gen.add_argument(
        "--step-cache",
        default=None,
        metavar="KIND[:THRESHOLD]",
        # lower case like every other help text; argparse formats help with %
        help=(STEP_CACHE_DESCRIPTION[0].lower() + STEP_CACHE_DESCRIPTION[1:]).replace("%", "%%"),
    )
    gen.add_argument("--out", required=True, type=Path, help="the PNG to write")
    gen.add_argument(
        "--max-megapixels",
        type=positive_float,
        default=MAX_PIXELS_PER_CALL / 1e6,
        help="refuse calls over width x height x num-images megapixels (default %(default).2f, as the limit's error rounds it; the server's "
        "default depends on the device, as no client waits here)",
    )
    gen.set_defaults(run=run_generate)

    serve = commands.add_parser("serve", help="run the MCP server (stdio by default)")
    add_logging_arguments(serve)
    add_model_arguments(serve, serve=True, model_required=False)  # --generator ray: the application's model
    from klein_agent.server.options import add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(run=run_serve)

    gallery = commands.add_parser(
        "gallery",
        help="a read-only web page of the image store: sessions, lineage, recipes, live (no model is loaded)",
    )
    from klein_agent.gallery.command import add_gallery_arguments, run_gallery

    add_logging_arguments(gallery)
    add_gallery_arguments(gallery)
    gallery.set_defaults(run=run_gallery)

    store = commands.add_parser("store", help="manage an image store: copy it to PostgreSQL + S3 and back")
    from klein_agent.store_command import add_store_arguments

    add_logging_arguments(store)
    add_store_arguments(store)

    models = commands.add_parser(
        "models",
        help="the official checkpoints: repo, steps, licence, and what the local cache holds of them",
    )
    from klein_agent.models_command import add_models_arguments

    add_logging_arguments(models)
    add_models_arguments(models)

    deploy = commands.add_parser(
        "deploy", help="put the model on a Ray cluster ($RAY_ADDRESS) for serve --generator ray"
    )
    from klein_agent.deploy_command import add_deploy_arguments

    add_logging_arguments(deploy)
    add_deploy_arguments(deploy)
    return parser


def add_logging_arguments(parser: argparse.ArgumentParser, *, defaults: bool = False) -> None:
    """`-v` and `--log-level`, accepted before or after the command name (`klein-agent -v serve` and
    `klein-agent serve -v` alike). Only the top-level parser sets defaults: a subcommand's default would
    overwrite what was given before the command name."""
    group = parser.add_argument_group("logging (stderr)")
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="debug logging (same as --log-level DEBUG)",
    )
    group.add_argument(
        "--log-level",
        type=parse_level,
        default="INFO" if defaults else argparse.SUPPRESS,
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR, any case (default INFO); other libraries log WARNING and above only",
    )


def run_serve(args: argparse.Namespace) -> int:
    """`klein-agent serve`: the options that need no server checked first (--model, --device, --lora,
    --allow-dir: a bad one is refused in a fraction of a second), then `klein_agent.server.serve.run_serve`,
    imported only now (the MCP SDK takes seconds to load)."""
    from klein_agent.model_options import check_serve_model_options
    from klein_agent.replica.handle import parse_generator
    from klein_agent.server.options import allowed_dir_options

    try:
        check_serve_model_options(args, remote=parse_generator(args.generator) is not None)
        allowed_dir_options(args)
    except ValueError as exc:
        log.error("%s", exc)  # as serve logs its other start-up errors
        return 2
    from klein_agent.server.serve import run_serve as serve

    return serve(args)


def run_generate(args: argparse.Namespace) -> int:
    """`klein-agent generate`: check everything, load the model, make the pictures, write PNGs with provenance."""
    from dataclasses import replace

    from klein_agent.loading.errors import CheckpointError
    from klein_agent.model_options import model_family
    from klein_agent.rules import resolution
    from klein_agent.rules.calls import prepare_call
    from klein_agent.rules.upsampling import CLI_CAPTION_SENTENCES
    from klein_agent.service.inputs import InputPolicy
    from klein_agent.service.pngfile import encode_png

    # Everything the server checks, checked and prepared here before the model loads, by the same rules
    # (`rules.calls`, one way in): the inputs' size and aspect checks, the mask and the pixel budget included.
    call = image_call(args)
    # the family from --model's name or folder, before it loads (FLUX 3's rules are not FLUX.2's); a --model that
    # cannot be found is said by `generator_factory` below, after every other option is checked, as before
    known = True
    try:
        family = model_family(args)
    except CheckpointError:
        family, known = families.FLUX2.name, False
    call.check(families.family(family).max_references)
    # before the model loads, as the pipeline would refuse them after
    if known and call.caption is not None:
        families.check_flux3_only("caption", family)
    if known and call.layout:
        families.check_flux3_only("layout", family)
    outputs = output_paths(args.out, args.num_images)
    budget = int(args.max_megapixels * 1_000_000)
    # the server's limits and reduced decoding; any path is read
    files = FileDecoder(InputPolicy(allowed_dirs=()))
    prepared = prepare_call(
        call,
        files,
        multiple=limits.SIZE_MULTIPLE,  # every klein checkpoint's token size; the pipeline checks it once loaded
        budget=lambda device: (budget, "--max-megapixels raises it"),
        family=family,
        upsampler=args.prompt_upsampler is not None,
    )

    factory = generator_factory(args)  # checks --device, --lora and --model on the filesystem (no torch yet)
    bar = ProgressBar("loading model")
    pipeline = factory()
    bar.note(f"model ready on {pipeline.info.device} ({pipeline.info.dtype})")
    request = replace(prepared.request, loras=pipeline.info.loras)  # generate runs every adapter it loaded
    note = resolution.guidance_note(args.guidance, distilled=pipeline.info.distilled)
    if note is not None:  # the note a tool result carries, said before the wait
        log.warning("%s", note)
    result = pipeline.generate(request, progress=bar.update)
    bar.close()
    if result.caption_source is not None:  # FLUX 3: which text ran, as the tool result says it
        print(f"text encoded: {CLI_CAPTION_SENTENCES[result.caption_source]}", file=sys.stderr)
    for k, (image, path) in enumerate(zip(result.images, outputs, strict=True)):
        recipe = prepared.recipe(result, k, parents=args.image, mask_name=args.mask)
        path.write_bytes(encode_png(image, provenance=recipe))
        print(f"wrote {path} (seed {recipe['seed']}, {image.width}x{image.height})", file=sys.stderr)
    timings = ", ".join(f"{k} {v:.0f} ms" for k, v in result.timings_ms.items())
    print(f"timings: {timings}", file=sys.stderr)
    return 0


def image_call(args: argparse.Namespace) -> ImageCall:
    """The call `generate`'s options name: inpaint with --mask or --box, else generate, edit or compose by the
    number of --image. Raises RequestError for options that do not go together (parse_box's for a bad --box)."""
    from klein_agent.rules import calls, layout, masks
    from klein_agent.rules.resolution import RequestError
    from klein_agent.rules.step_caches import split_step_cache_argument

    common: dict[str, Any] = {
        "prompt": args.prompt,
        "caption": args.caption,
        "layout": tuple(layout.parse_layout_box(text, k) for k, text in enumerate(args.layout, start=1)),
        "width": args.width,
        "height": args.height,
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "num_images": args.num_images,
        "step_cache": None if args.step_cache is None else split_step_cache_argument(args.step_cache),
    }
    if args.mask is None and not args.box:
        if args.strength is not None:
            raise RequestError("--strength applies to masked edits: add --mask or --box")
        if len(args.image) > 1:
            return calls.Compose(images=tuple(args.image), **common)
        return calls.Edit(image=args.image[0], **common) if args.image else calls.Generate(**common)
    if not args.image:
        raise RequestError("--mask and --box need --image: the picture to repaint")
    if args.width is not None or args.height is not None:
        raise RequestError(
            "a masked edit keeps the image's size (as the model sees it): drop --width/--height, or resize with an "
            "edit first"
        )
    boxes = [masks.parse_box(text, k) for k, text in enumerate(args.box, start=1)]
    return calls.Inpaint(
        image=args.image[0],
        references=tuple(args.image[1:]),
        mask=args.mask,
        boxes=[[b.x, b.y, b.width, b.height] for b in boxes] or None,
        strength=args.strength,
        **common,
    )


class FileDecoder:
    """`rules.calls.Decoder` over files named on the command line (any readable path), with the server's limits;
    errors name the --image."""

    def __init__(self, policy: InputPolicy) -> None:
        self.policy = policy

    def image(self, argument: str, number: int, count: int, prepare: Prepare) -> Decoded[str]:
        """--image `number` of `count`, decoded and prepared; a ValueError is re-raised naming it."""
        from klein_agent.rules.calls import Decoded
        from klein_agent.service.inputs import read_image_file

        which = f"--image {argument}" if count == 1 else f"--image {number} of {count} ({argument})"
        policy = self.policy
        try:
            decoded = read_image_file(
                argument, max_bytes=policy.max_bytes, max_pixels=policy.max_pixels, reduce_to=policy.reduce_to
            )
            return Decoded(prepare(decoded.image), argument)
        except ValueError as exc:  # ImageInputError, RequestError: the message, saying which --image
            raise type(exc)(f"{which}: {exc}") from exc

    def mask(self, argument: str) -> Decoded[str]:
        """--mask, decoded at full size (the mask rule resizes it)."""
        from klein_agent.rules.calls import Decoded
        from klein_agent.service.inputs import read_image_file

        policy = self.policy
        return Decoded(
            read_image_file(argument, max_bytes=policy.max_bytes, max_pixels=policy.max_pixels).image,
            argument,
        )


def output_paths(out: Path, count: int) -> list[Path]:
    """FILE.png for one picture, FILE-1.png ... for several; raises ValueError naming --out unless each can be
    written: a file is made and removed in the folder (permission bits say nothing for root, nor for a read-only
    or special filesystem), and an existing file is opened for writing without being changed."""
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{k + 1}{out.suffix}") for k in range(count)]
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"--out {out}: the folder {folder} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".klein-agent-", suffix=".png"):
            pass  # removed on leaving
    except OSError as exc:
        raise ValueError(
            f"--out {out}: cannot write in the folder {folder} ({exc.strerror or exc}); choose another --out"
        ) from None
    for path in paths:
        if path.is_dir():
            raise ValueError(f"--out {path} is a folder; name a .png file")
        if path.exists():
            try:
                with open(path, "r+b"):
                    pass
            except OSError as exc:
                raise ValueError(
                    f"--out {path} exists and cannot be written ({exc.strerror or exc})"
                ) from None
    return paths


class ProgressBar:
    """A one-line bar on stderr, drawn only when stderr is a terminal and the work outlasts a moment."""

    open_line = False  # a bar is drawn and its line not yet ended (Ctrl-C or an error in the middle)

    @classmethod
    def end_line(cls) -> None:
        """End a bar's line left open, so what follows starts on a line of its own."""
        if cls.open_line:
            print(file=sys.stderr, flush=True)
            ProgressBar.open_line = False

    def __init__(self, label: str, delay_s: float = 0.5) -> None:
        self.start = time.monotonic()
        self.delay_s = delay_s
        self.tty = sys.stderr.isatty()
        self.drawn = False
        print(f"{label}...", file=sys.stderr)

    def note(self, message: str) -> None:
        """Print `message` on its own line and restart the delay before the bar shows."""
        print(message, file=sys.stderr)
        self.start = time.monotonic()

    def update(self, done: int, total: int, message: str) -> None:
        """Redraw the bar at `done` of `total` steps; off a terminal, print only the finished line."""
        if time.monotonic() - self.start < self.delay_s and done < total:
            return
        width = 30
        filled = int(width * done / total)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {message}"
        if self.tty:
            # Marked open before the write: a Ctrl-C landing just after it must still end the line.
            self.drawn = True
            ProgressBar.open_line = True
            print(f"\r{line:<70}", end="", file=sys.stderr, flush=True)
        elif done == total:
            print(line, file=sys.stderr)

    def close(self) -> None:
        """End the bar's line, if one was drawn."""
        if self.drawn:
            print(file=sys.stderr)
            ProgressBar.open_line = False


if __name__ == "__main__":
    raise SystemExit(main())
