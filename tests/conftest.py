"""Shared pytest fixtures. Sections are grouped by the part of the project that uses them; add new groups below."""

from __future__ import annotations

import os

# The files only the contained child pytests run (tests/test_store_scaleout.py, tests/test_replica_scaleout.py run
# them inside a loopback-only namespace with real PostgreSQL, SeaweedFS and Ray, and fail when any of their tests
# fails): outside that namespace they are not collected at all, rather than reported as skips.
if os.environ.get("KLEIN_TEST_PRIVATE_NETWORK") != "1":  # tests/store_servers.py NETNS_ENV
    collect_ignore = ["test_store_shared.py", "test_store_shared_e2e.py", "test_replica_e2e.py"]

# ---------------------------------------------------------------------------------------------------------------
# Server tests (tests/test_server_*.py): the real tiny model, one store per test, in-process MCP clients.
# ---------------------------------------------------------------------------------------------------------------
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from klein_agent.rules.requests import (
    GenerationRequest,
    GenerationResult,
    GeneratorInfo,
    ImageGenerator,
    ProgressCallback,
)


@dataclass
class SpyGenerator:
    """The real generator, counting the calls that reach it (validation tests assert it saw none)."""

    inner: ImageGenerator
    calls: list[GenerationRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def info(self) -> GeneratorInfo:
        return self.inner.info

    def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        with self._lock:
            self.calls.append(request)
        return self.inner.generate(request, progress)


@pytest.fixture(scope="session")
def tiny_pipeline() -> ImageGenerator:
    from klein_agent.pipeline import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture
def tiny_spy(tiny_pipeline: ImageGenerator) -> SpyGenerator:
    return SpyGenerator(tiny_pipeline)


@pytest.fixture
def input_dir(tmp_path: Path) -> Path:
    """The one folder server tests allow for image paths and exports."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    return folder


def make_server_state(
    factory: Callable[[], ImageGenerator], store_dir: Path, allowed: Path, **options: Any
) -> Any:
    """A Studio whose engine loads `factory()` (real or fake), started, with small fixed limits."""
    from klein_agent.service.engine import Engine
    from klein_agent.service.inputs import InputPolicy
    from klein_agent.service.store import ImageStore
    from klein_agent.service.studio import Studio, StudioConfig

    engine = Engine(
        factory, max_queue=options.pop("max_queue", 8), heartbeat_s=options.pop("heartbeat_s", 2.0)
    )
    policy = InputPolicy(
        allowed_dirs=(allowed,),
        allow_urls=options.pop("allow_urls", False),
        max_bytes=options.pop("max_input_bytes", 2 * 1024**2),
    )
    store = ImageStore(store_dir, max_bytes=options.pop("store_max_bytes", 256 * 1024**2), max_images=1000)
    from klein_agent.rules.limits import MAX_PIXELS_PER_CALL

    options.setdefault("max_pixels_per_call", MAX_PIXELS_PER_CALL)  # pass None for the device's default
    state = Studio(engine, store, policy, StudioConfig(**options))
    engine.start()
    return state


@pytest.fixture
def server_state(tiny_spy: SpyGenerator, tmp_path: Path, input_dir: Path) -> Iterator[Any]:
    state = make_server_state(lambda: tiny_spy, tmp_path / "store", input_dir)
    yield state
    state.engine.close()
    state.store.close()


@pytest.fixture(params=["auto", "legacy"])
async def client(request: pytest.FixtureRequest, server_state: Any) -> AsyncIterator[Any]:
    """An in-process client of a tiny-model server, in both protocol eras (2026 direct, 2025 handshake)."""
    from mcp import Client

    from klein_agent.server.app import build_server

    async with Client(
        build_server(server_state), mode=request.param, raise_exceptions=request.param == "auto"
    ) as connected:
        yield connected


# ---------------------------------------------------------------------------------------------------------------
# Model tests: tools/ (checkpoint writer, diffusers reference) on the path, tiny checkpoints written once.
# ---------------------------------------------------------------------------------------------------------------
TOOLS = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in the diffusers layout (transformer in 2 shards) plus the BFL single file."""
    import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny-klein")
    assert make_tiny_checkpoint.main([str(folder), "--shards", "2"]) == 0
    return folder


@pytest.fixture(scope="session")
def tiny_base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny undistilled (Base, CFG) checkpoint."""
    import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny-klein-base")
    assert make_tiny_checkpoint.main([str(folder), "--base", "--seed", "1"]) == 0
    return folder
