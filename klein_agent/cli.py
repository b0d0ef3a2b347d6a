"""`klein-agent`: one console script with two commands.

    klein-agent generate --model MODEL --prompt TEXT [--image PATH ...] --out FILE.png
    klein-agent serve --model MODEL [--store DIR] [--http] ...

stdout belongs to the MCP wire under `serve`, so everything human-readable goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import time
from pathlib import Path

from klein_agent import __version__
from klein_agent.model_options import add_model_arguments, generator_factory

log = logging.getLogger("klein_agent")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result: int = args.run(args)
        return result
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as err:  # bad input or a missing file: a message, not a traceback
        print(f"klein-agent: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klein-agent", description="FLUX.2 [klein] for agents that iterate on pictures"
    )
    parser.add_argument("--version", action="version", version=f"klein-agent {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="make one or more pictures and write PNG files")
    add_model_arguments(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help='a reference picture; one is an edit, several a composition ("image 1", "image 2", ...)',
    )
    gen.add_argument(
        "--width", type=int, default=None, help="multiple of 16 (default: the first image's, else 1024)"
    )
    gen.add_argument(
        "--height", type=int, default=None, help="multiple of 16 (default: the first image's, else 1024)"
    )
    gen.add_argument("--seed", type=int, default=None, help="default: a random one, reported on stderr")
    gen.add_argument("--steps", type=int, default=None, help="default: the model's (4 distilled, 50 Base)")
    gen.add_argument("--guidance", type=float, default=None, help="CFG scale for Base models (default 4.0)")
    gen.add_argument(
        "--num-images", type=int, default=1, help="seeds seed, seed+1, ...; files FILE-1.png, ..."
    )
    gen.add_argument("--out", required=True, type=Path, help="the PNG to write")
    gen.set_defaults(run=run_generate)

    serve = commands.add_parser("serve", help="run the MCP server (stdio by default)")
    add_model_arguments(serve)
    from klein_agent.server.serve import add_serve_arguments, run_serve

    add_serve_arguments(serve)
    serve.set_defaults(run=run_serve)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from klein_agent.previews import encode_png
    from klein_agent.request import GenerationRequest

    references = []
    for path in args.image:
        with Image.open(path) as opened:
            references.append(opened.convert("RGB"))
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {args.out}")
    bar = ProgressBar("loading model")
    pipeline = generator_factory(args)()
    bar.note(f"model ready on {pipeline.info.device} ({pipeline.info.dtype})")
    width, height = args.width, args.height
    if width is None or height is None:
        default_w, default_h = pipeline.default_size(references)  # type: ignore[attr-defined]
        width, height = width or default_w, height or default_h
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    request = GenerationRequest(
        prompt=args.prompt,
        width=width,
        height=height,
        seed=seed,
        num_images=args.num_images,
        steps=args.steps,
        guidance=args.guidance,
        references=tuple(references),
    )
    result = pipeline.generate(request, progress=bar.update)
    bar.close()
    outputs = (
        [args.out]
        if len(result.images) == 1
        else [
            args.out.with_name(f"{args.out.stem}-{k + 1}{args.out.suffix}") for k in range(len(result.images))
        ]
    )
    for k, (image, path) in enumerate(zip(result.images, outputs, strict=True)):
        recipe = {
            "prompt": args.prompt,
            "seed": seed + k,
            "width": width,
            "height": height,
            "steps": request.steps or pipeline.info.default_steps,
            "model": pipeline.info.model,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(image, provenance=recipe))
        print(f"wrote {path} (seed {seed + k}, {width}x{height})", file=sys.stderr)
    timings = ", ".join(f"{k} {v:.0f} ms" for k, v in result.timings_ms.items())
    print(f"timings: {timings}", file=sys.stderr)
    return 0


class ProgressBar:
    """A one-line bar on stderr, drawn only when stderr is a terminal and the work outlasts a moment."""

    def __init__(self, label: str, delay_s: float = 0.5) -> None:
        self.start = time.monotonic()
        self.delay_s = delay_s
        self.tty = sys.stderr.isatty()
        self.drawn = False
        print(f"{label}...", file=sys.stderr)

    def note(self, message: str) -> None:
        print(message, file=sys.stderr)
        self.start = time.monotonic()

    def update(self, done: int, total: int, message: str) -> None:
        if time.monotonic() - self.start < self.delay_s and done < total:
            return
        width = 30
        filled = int(width * done / total)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {message}"
        if self.tty:
            print(f"\r{line:<70}", end="", file=sys.stderr, flush=True)
            self.drawn = True
        elif done == total:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.drawn:
            print(file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
