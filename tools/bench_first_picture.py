"""Time from `klein-agent serve` starting to the first finished picture, as an MCP client sees it.

Starts the server as a subprocess over stdio (what Claude Desktop does), calls `generate` at once (the call waits
while the model loads and, with --compile, while the shape buckets warm), and reports: the time to the answer of
`initialize`, to the first finished picture (the tool result), and what the server logged for its load and its
bucket warm-up (from its stderr, kept in --log). Extra arguments after `--` go to `klein-agent serve`.
Where the MCP package is missing (a bare device machine), `--via cli` (chosen automatically) times `klein-agent
generate` from process start to the PNG on disk instead: the same load and compile, without the server.

    python tools/bench_first_picture.py --model tiny --size 256
    python tools/bench_first_picture.py --model random:klein-4b --size 1024 -- --device cuda --compile --warm-buckets 1,2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


async def first_picture(args: argparse.Namespace, serve_extra: list[str]) -> dict[str, object]:
    from mcp import Client, StdioServerParameters

    store = Path(tempfile.mkdtemp(prefix="klein-first-picture-"))
    log = Path(args.log)
    log.write_text("")
    command = [sys.executable, "-m", "klein_agent", "serve", "--model", args.model, "--store", str(store)]
    command += ["--no-default-dirs", *serve_extra]
    # stderr to the log (the server's progress lines), stdout is the MCP wire
    shell = f"exec {shlex.join(command)} 2>>{shlex.quote(str(log))}"
    params = StdioServerParameters(command="bash", args=["-c", shell], cwd=str(REPO))
    started = time.perf_counter()
    async with Client(params) as client:
        initialized = time.perf_counter() - started
        result = await client.call_tool(
            "generate", {"prompt": "a first picture", "width": args.size, "height": args.size, "seed": 1}
        )
        finished = time.perf_counter() - started
        if result.is_error:
            raise SystemExit(f"generate failed: {result.content}")
        status = (await client.call_tool("server_status", {})).structured_content or {}
    text = log.read_text()
    figures: dict[str, object] = {
        "via": "mcp",
        "model": args.model,
        "size": args.size,
        "serve_args": serve_extra,
        "initialize_s": round(initialized, 3),
        "first_picture_s": round(finished, 3),
        "load_s": _logged(r"model ready in ([0-9.]+) s", text),
        "warm_up_s": _logged(r"compile warm-up done in ([0-9.]+) s", text),
        "warm_up_lines": re.findall(r"compile warm-up \d+/\d+: .*", text),
        "model_status": status.get("model", {}).get("state")
        if isinstance(status.get("model"), dict)
        else None,
    }
    return figures


def first_picture_cli(args: argparse.Namespace, extra: list[str]) -> dict[str, object]:
    out = Path(tempfile.mkdtemp(prefix="klein-first-picture-")) / "first.png"
    size = str(args.size)
    command = [
        sys.executable,
        "-m",
        "klein_agent",
        "generate",
        "--model",
        args.model,
        "--prompt",
        "a first picture",
    ]
    command += ["--width", size, "--height", size, "--seed", "1", "--out", str(out)]
    command += _without_warm_buckets(extra)  # generate compiles the one bucket it needs
    started = time.perf_counter()
    with open(args.log, "w") as log:
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, check=False)
    finished = time.perf_counter() - started
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"generate failed (exit {done.returncode}); see {args.log}")
    return {
        "via": "cli",
        "model": args.model,
        "size": args.size,
        "serve_args": extra,
        "initialize_s": None,
        "first_picture_s": round(finished, 3),
        "load_s": None,
        "warm_up_s": None,
        "warm_up_lines": [],
        "model_status": None,
    }


def _without_warm_buckets(extra: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in extra:
        if skip:
            skip = False
        elif arg == "--warm-buckets":
            skip = True
        elif not arg.startswith("--warm-buckets="):
            kept.append(arg)
    return kept


def _logged(pattern: str, text: str) -> float | None:
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


def main() -> int:
    argv = sys.argv[1:]
    serve_extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=256, help="width and height of the first picture")
    parser.add_argument("--log", default="first_picture_server.log", help="the server's stderr")
    parser.add_argument("--json", default=None)
    parser.add_argument("--via", choices=["auto", "mcp", "cli"], default="auto")
    args = parser.parse_args(argv)
    via = args.via
    if via == "auto":
        via = "mcp" if importlib.util.find_spec("mcp") is not None else "cli"
    if via == "mcp":
        import anyio

        figures = anyio.run(first_picture, args, serve_extra)
    else:
        figures = first_picture_cli(args, serve_extra)
    for line in figures["warm_up_lines"]:  # type: ignore[union-attr]
        print(line)
    print(
        f"{figures['via']}: start -> initialize {figures['initialize_s']} s, -> first picture {figures['first_picture_s']} s "
        f"(model load {figures['load_s']} s, bucket warm-up {figures['warm_up_s']} s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
