"""The front-end side of the replicas (klein_agent/replica/handle.py) against a stand-in Serve handle that streams
the tiny model's real events and raises Ray's real exceptions: which key routes a call (cache affinity), how Serve's
backpressure reaches the caller ("busy", in the local queue's words, with a wait estimated from recent calls), and
what happens when the replica running a call dies (one retry, progress never repeated, else a clear error), and
when gRPC refuses a call for its size (sent again as Ray objects).

A real cluster, two replicas, two front-ends and a killed replica process: tests/test_replica_e2e.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from klein_agent.replica import wire
from klein_agent.replica.handle import RayGenerator, routing_key
from klein_agent.rules.busy import busy_message
from klein_agent.rules.requests import GenerationRequest, ImageGenerator
from klein_agent.rules.resolution import RequestError

exceptions = pytest.importorskip("ray.exceptions", reason="the scale extra (ray[serve]) is not installed")
serve_exceptions = pytest.importorskip("ray.serve.exceptions")

pytestmark = [pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Response:
    """A streaming response: the events, then `failure` raised after `die_after` of them (if set)."""

    def __init__(self, events: list[tuple[Any, ...]], failure: BaseException | None, die_after: int) -> None:
        self._events, self._failure, self._die_after = events, failure, die_after
        self.cancelled = False

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for k, event in enumerate(self._events):
            if self._failure is not None and k == self._die_after:
                raise self._failure
            yield event
        if self._failure is not None:
            raise self._failure

    def cancel(self) -> None:
        self.cancelled = True


class StandInHandle:
    """What `RayGenerator` uses of a Serve DeploymentHandle. Each call runs the real tiny model and streams its
    events as the replica does; `failures[k]` (an exception, or None) is raised in call k after `die_after`
    events. `options` records what each call asked for (the routing key among them)."""

    def __init__(
        self, model: ImageGenerator, failures: list[BaseException | None], die_after: int = 2
    ) -> None:
        self.model, self.failures, self.die_after = model, failures, die_after
        self.asked: list[dict[str, Any]] = []
        self._pending: dict[str, Any] = {}

    def options(self, **asked: Any) -> StandInHandle:
        self._pending = asked
        return self

    def remote(self, request: GenerationRequest, deadline_s: float) -> Response:
        self.asked.append(self._pending)
        failure = self.failures[len(self.asked) - 1] if len(self.asked) <= len(self.failures) else None
        events: list[tuple[Any, ...]] = []
        try:
            result = self.model.generate(request, lambda *p: events.append((wire.PROGRESS, *p)))
            events.append((wire.RESULT, result))
        except RequestError as exc:
            events.append(wire.error_event(exc))
        return Response(events, failure, self.die_after)


def picture(colour: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


def died() -> BaseException:
    return exceptions.ActorDiedError()


def test_the_same_references_give_the_same_routing_key_in_any_process_and_others_none() -> None:
    a, b = picture((200, 10, 10)), picture((10, 200, 10))
    same = routing_key(GenerationRequest("x", references=(a.copy(), b.copy())))
    assert same is not None and same == routing_key(
        GenerationRequest("another prompt", 64, 64, references=(a, b))
    )
    assert same != routing_key(GenerationRequest("x", references=(b, a))), "order matters: image 1, image 2"
    assert same != routing_key(GenerationRequest("x", references=(a, picture((10, 200, 11))))), (
        "one pixel value"
    )
    assert same != routing_key(GenerationRequest("x", references=(a, picture((10, 200, 10), (64, 96)))))
    masked = GenerationRequest("x", references=(a,), mask=Image.new("L", (96, 64), 255))
    assert routing_key(masked) != routing_key(GenerationRequest("x", references=(a,)))
    assert routing_key(GenerationRequest("no references", 64, 64)) is None


def test_a_call_with_references_asks_serve_for_their_replica_and_one_without_does_not(
    tiny_pipeline: ImageGenerator,
) -> None:
    handle = StandInHandle(tiny_pipeline, [])
    generator = RayGenerator(handle, tiny_pipeline.info)
    edit = GenerationRequest("night", 64, 64, seed=1, steps=2, references=(picture((90, 90, 200)),))
    generator.generate(edit)
    generator.generate(GenerationRequest("plain", 64, 64, seed=1, steps=2))
    assert handle.asked[0]["session_id"] == routing_key(edit)
    assert "session_id" not in handle.asked[1], "calls without references spread (Serve draws their key)"


async def test_a_full_replica_queue_reaches_the_mcp_client_as_busy_with_a_wait_from_recent_calls(
    tiny_pipeline: ImageGenerator, tmp_path: Path
) -> None:
    from mcp import Client

    from klein_agent.server.app import build_server
    from tests.conftest import make_server_state

    refused = serve_exceptions.BackPressureError(num_queued_requests=3, max_queued_requests=3)
    handle = StandInHandle(tiny_pipeline, [None, refused])
    (tmp_path / "inputs").mkdir()
    state = make_server_state(
        lambda: RayGenerator(handle, tiny_pipeline.info), tmp_path / "store", tmp_path / "inputs"
    )
    try:
        async with Client(build_server(state)) as client:
            small = {"width": 64, "height": 64, "steps": 2}
            first = await client.call_tool("generate", {"prompt": "first", "seed": 1, **small})
            assert not first.is_error, first  # a finished call: the wait can be estimated
            mean_ms = state.engine.status().mean_model_ms
            busy = await client.call_tool("generate", {"prompt": "second", "seed": 2, **small})
        wait_s = max(1, round(mean_ms / 1000 * 4))  # the 3 queued calls and the running one, at the mean
        said = busy.content[0].text
        assert (
            busy.is_error
            and (
                f"busy: 3 calls are queued for the model's replicas; retry in ~{wait_s} s, or ask for fewer images per "
                "call"
            )
            in said
        ), said
        assert state.engine.status().failed == 0, "a refusal, not a model failure"
        assert state.store.stats().count == 1, "nothing stored for the refused call"
    finally:
        await state.engine.aclose()
        state.store.close()


def test_the_local_queue_and_the_replicas_refuse_in_the_same_words() -> None:
    local = busy_message("2 calls are queued and one is running", 2, 1.4)
    assert (
        local
        == "busy: 2 calls are queued and one is running; retry in ~4 s, or ask for fewer images per call"
    )
    assert busy_message("the model is still loading and 1 calls are waiting for it", 1, None).endswith(
        "; retry in a few seconds, or ask for fewer images per call"
    )


def test_a_replica_that_dies_mid_call_is_retried_once_and_progress_is_not_repeated(
    tiny_pipeline: ImageGenerator,
) -> None:
    handle = StandInHandle(tiny_pipeline, [died()], die_after=3)
    request = GenerationRequest(
        "a kite", 64, 48, seed=5, steps=3, references=(picture((1, 2, 3)),), call_id="call-1"
    )
    heard: list[int] = []
    result = RayGenerator(handle, tiny_pipeline.info).generate(
        request, lambda done, total, msg: heard.append(done)
    )
    local = tiny_pipeline.generate(request)
    assert [im.tobytes() for im in result.images] == [im.tobytes() for im in local.images]
    assert len(handle.asked) == 2, "one retry"
    assert heard == list(range(1, heard[-1] + 1)) and heard[-1] == 5, "each unit once, rising, to the last"
    assert handle.asked[0]["session_id"] == handle.asked[1]["session_id"], "the retry keeps its key"


def test_a_call_whose_retry_dies_too_fails_with_a_clear_error_and_is_not_tried_a_third_time(
    tiny_pipeline: ImageGenerator,
) -> None:
    handle = StandInHandle(tiny_pipeline, [died(), died(), None])
    with pytest.raises(
        wire.ReplicaLostError, match=r"died, and so did the one it was retried on; nothing was stored"
    ):
        RayGenerator(handle, tiny_pipeline.info).generate(GenerationRequest("x", 64, 64, seed=1, steps=2))
    assert len(handle.asked) == 2


def test_a_refusal_or_a_cancel_is_not_retried(tiny_pipeline: ImageGenerator) -> None:
    handle = StandInHandle(tiny_pipeline, [])
    with pytest.raises(RequestError, match="width"):
        RayGenerator(handle, tiny_pipeline.info).generate(GenerationRequest("bad", 1000, 64, seed=1))
    assert len(handle.asked) == 1

    class Stop(Exception):
        pass

    def stop(done: int, total: int, message: str) -> None:
        raise Stop

    with pytest.raises(Stop):
        RayGenerator(handle, tiny_pipeline.info).generate(GenerationRequest("x", 64, 64, seed=1), stop)
    assert len(handle.asked) == 2


def grpc_error(code_name: str) -> BaseException:
    """What Ray 2.60 raises on the front-end when the replicas' gRPC data plane refuses a call: grpc's own
    AioRpcError (RESOURCE_EXHAUSTED for "Received message larger than max", from either side, measured on the
    cluster)."""
    grpc = pytest.importorskip("grpc")
    details = "Received message larger than max (4916000 vs. 4194304)"
    return grpc.aio.AioRpcError(
        getattr(grpc.StatusCode, code_name), grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )


@pytest.mark.parametrize(
    "refused_after", [0, 5]
)  # the request, before any event; the pictures, after all 5 units
def test_a_call_grpc_refuses_for_its_size_is_sent_again_as_ray_objects_once(
    tiny_pipeline: ImageGenerator, refused_after: int
) -> None:
    handle = StandInHandle(tiny_pipeline, [grpc_error("RESOURCE_EXHAUSTED"), died()], die_after=refused_after)
    request = GenerationRequest("a kite", 64, 48, seed=5, steps=3)
    heard: list[int] = []
    result = RayGenerator(handle, tiny_pipeline.info).generate(
        request, lambda done, total, msg: heard.append(done)
    )
    local = tiny_pipeline.generate(request)
    assert [im.tobytes() for im in result.images] == [im.tobytes() for im in local.images]
    # over gRPC, then by reference; the replica that then died is retried as before, still by reference
    assert [asked.get("_by_reference", True) for asked in handle.asked] == [False, True, True]
    assert heard == [1, 2, 3, 4, 5], "each unit once"


def test_another_grpc_failure_is_not_sent_again(tiny_pipeline: ImageGenerator) -> None:
    handle = StandInHandle(tiny_pipeline, [grpc_error("INTERNAL")], die_after=0)
    with pytest.raises(Exception, match="larger than max") as raised:
        RayGenerator(handle, tiny_pipeline.info).generate(GenerationRequest("x", 64, 64, seed=1, steps=2))
    assert type(raised.value).__name__ == "AioRpcError" and len(handle.asked) == 1


def test_a_grpc_failure_is_described_by_its_details() -> None:
    from klein_agent.replica.handle import describe_failure

    said = describe_failure(grpc_error("RESOURCE_EXHAUSTED"))
    assert said == "AioRpcError: Received message larger than max (4916000 vs. 4194304)", said
