"""Fill .whl with the wheels tools/gpu_check.sh needs on the device machine, pinned to this venv's versions.

    python tools/gpu_wheels.py            # downloads into .whl (ignored by git), prints the names and total size
    python tools/gpu_wheels.py --list     # only prints what it would fetch

The device machine (Python 3.12, no package index) already has torch, transformers, numpy, Pillow and most of the
scientific stack; what klein-agent and the reference add on top — diffusers, the MCP SDK and its needs — travels as
wheels in the carried folder .whl (/work/.library/device/README.md gives the recipe this follows). The set is the
closure of those packages' requirements as installed here, less what the device image lists as installed, so the
versions match what the tests ran with.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOTS = ("diffusers", "mcp", "pydantic", "sse-starlette", "starlette", "uvicorn")
# On the device image already (its package list, 2026-11-17): carrying them would replace working versions.
ON_DEVICE = {
    "anyio", "certifi", "charset-normalizer", "click", "filelock", "fsspec", "h11", "hf-xet", "httpcore", "httpx",
    "huggingface-hub", "idna", "numpy", "packaging", "pillow", "pyyaml", "regex", "requests", "safetensors",
    "tokenizers", "torch", "tqdm", "transformers", "typing-extensions", "urllib3", "zipp", "attrs", "markupsafe",
    "jinja2", "sympy", "networkx", "mpmath", "triton", "setuptools", "shellingham", "typer", "rich", "pygments",
    "markdown-it-py", "mdurl", "protobuf", "psutil",
}  # fmt: skip
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...]) -> dict[str, str]:
    """{name: installed version} of `roots` and everything they require here (extras and markers that do not
    hold on Linux skipped), less what the device already has."""
    seen: dict[str, str] = {}
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name in ON_DEVICE:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here: a marker excluded it
        seen[name] = dist.version
        for requirement in dist.requires or []:
            if "extra ==" in requirement or 'sys_platform == "win32"' in requirement:
                continue
            todo.append(canonical(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0]))
    return dict(sorted(seen.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    parser.add_argument("--list", action="store_true", help="print the pinned set and stop")
    args = parser.parse_args(argv)
    pins = [f"{name}=={version}" for name, version in closure(ROOTS).items()]
    print("\n".join(pins))
    if args.list:
        return 0
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", "-d", str(args.dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + pins, check=True)
    total = sum(p.stat().st_size for p in args.dest.glob("*.whl"))
    print(
        f"{len(list(args.dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {args.dest} (carry limit 64 MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
