"""The layout's two rules, checked on the source: dependencies point one way, and the service side has no torch.

`ALLOWED` below is the rule; docs/architecture.md shows the same table to readers, and a test here keeps the two
equal. `rules` (no torch, no other room) is what every room may read: limits, defaults, what a request is. The
drivers (cli, __main__) may use any room; the pipeline is imported only inside the model factory.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "klein_agent"

# Which other rooms each room may import (its own always). Every room may read `rules`, which imports none.
ALLOWED: dict[str, set[str]] = {
    "rules": set(),
    "model": {"rules"},
    "loading": {"model", "rules"},
    "speedups": {"model", "rules"},
    "pipeline": {"model", "loading", "speedups", "rules"},
    "service": {"rules"},
    "web": {"rules"},
    "gallery": {"service", "rules", "web", "option_types"},
    "server": {"service", "rules", "model_options", "web", "gallery", "option_types", "replica"},
    # the model options check a --model folder or cache entry with loading/hub.py's filesystem reads (no torch)
    "model_options": {"rules", "pipeline", "loading", "option_types"},
    "option_types": {"rules"},  # argparse value types shared by the commands' parsers
    # generator replicas on Ray Serve: the deployment loads the model through model_options (the only new place
    # that reaches the pipeline) and, in a worker process of its own, sends our log lines to Serve's replica log
    # (logs.forward_ours); the front-end's side (handle, wire) is torch-free, checked below
    "replica": {"rules", "model_options", "logs"},
}
TORCH_FREE = ["rules", "service", "web", "gallery", "server", "model_options", "option_types", "cli"]
TORCH_FREE.append("store_command")  # `klein-agent store copy`: a driver, like cli
TORCH_FREE += ["replica.handle", "replica.wire", "deploy_command"]  # what a front-end and the deployer import
TORCH_FREE.append("models_command")  # `klein-agent models`: reads presets and the cache, loads nothing


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def room(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def internal_imports(path: Path) -> set[str]:
    """The first part below `klein_agent` of every klein_agent module this file imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = (
                [node.module + "." + a.name for a in node.names]
                if node.module == "klein_agent"
                else [node.module]
            )
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "klein_agent" and len(parts) > 1 and not parts[1].startswith("__"):
                found.add(parts[1])
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path: Path) -> None:
    here = room(path)
    if here not in ALLOWED:
        return  # the drivers (cli, __main__) may use any room
    wrong = internal_imports(path) - ALLOWED[here] - {here}
    assert not wrong, f"{path.relative_to(PACKAGE)} ({here}) imports {sorted(wrong)}"


def documented_rooms() -> dict[str, set[str]]:
    """The "may import" table of docs/architecture.md, as {room: the rooms it names}."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"^```\nroom +may import\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block, "docs/architecture.md lost its `room  may import` block"
    table: dict[str, set[str]] = {}
    for line in block.group(1).splitlines():
        name, _, rest = line.partition(" ")
        names = rest.split("(")[0].strip()  # a parenthesis after the list explains it
        table[name] = set() if names == "nothing" else {n.strip() for n in names.split(",")}
    return table


def test_the_architecture_doc_states_the_checked_rule() -> None:
    documented = documented_rooms()
    assert documented == ALLOWED, (
        "docs/architecture.md's `room  may import` block and ALLOWED in tests/test_architecture.py differ: "
        f"documented {documented}, checked {ALLOWED}; change both together"
    )


BLOCK_TORCH = """
import importlib, pkgutil, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name in ("transformers", "diffusers"):
            raise ImportError(f"{name} imported by a torch-free module")
sys.meta_path.insert(0, NoTorch())
import klein_agent
for room in sys.argv[1:]:
    module = importlib.import_module("klein_agent." + room)
    if hasattr(module, "__path__"):
        for info in pkgutil.walk_packages(module.__path__, module.__name__ + "."):
            importlib.import_module(info.name)
print("ok")
"""


def test_the_service_side_imports_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, *TORCH_FREE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_check_would_catch_a_torch_import(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, "pipeline"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "imported by a torch-free module" in done.stderr
