"""The layout's two rules, checked on the source: dependencies point one way, and the service side has no torch.

rules            (no torch)   what a request is, limits, resolution, recipes
model            (torch)      the network
loading          (torch)      checkpoints -> modules           uses model
speedups         (torch)      devices, fp8, compile             uses model
pipeline         (torch)      the ImageGenerator                uses model, loading, speedups, rules
service          (no torch)   engine, store, inputs, studio     uses rules
web              (no torch)   HTTP: bind, token, guard, uvicorn (no MCP)
gallery          (no torch)   the read-only web page            uses service, rules, web (no MCP)
server           (no torch)   MCP                               uses service, rules, model_options, web, gallery
cli, model_options            drivers; the pipeline is imported only inside the model factory
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "klein_agent"

ALLOWED: dict[str, set[str]] = {
    "rules": {"rules"},
    "model": {"model"},
    "loading": {"loading", "model"},
    "speedups": {"speedups", "model"},
    "pipeline": {"pipeline", "model", "loading", "speedups", "rules"},
    "service": {"service", "rules"},
    "web": {"web"},
    "gallery": {"gallery", "service", "rules", "web", "option_types"},
    "server": {"server", "service", "rules", "model_options", "web", "gallery", "option_types"},
    # the model options check a --model folder or cache entry with loading/hub.py's filesystem reads (no torch)
    "model_options": {"rules", "pipeline", "loading", "option_types"},
    "option_types": set(),  # argparse value types shared by the commands' parsers
}
TORCH_FREE = ["rules", "service", "web", "gallery", "server", "model_options", "option_types", "cli"]


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
    wrong = internal_imports(path) - ALLOWED[here]
    assert not wrong, f"{path.relative_to(PACKAGE)} ({here}) imports {sorted(wrong)}"


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
