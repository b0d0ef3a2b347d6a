"""The generator replica (klein_agent/replica/) in Ray Serve's local testing mode: the deployment and the handle's
`ImageGenerator` in one process, no cluster. Same request in, same result out as the local tiny model (pixels,
recipe, progress); a caller's cancel and the per-call deadline stop the replica's model at a step boundary; a
refusal on the replica reaches the caller as the class and sentence a local model raises.

The cluster, two replicas and a real MCP client: tests/test_replica_scaleout.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from PIL import Image

from klein_agent.replica import wire
from klein_agent.replica.handle import RayGenerator, parse_generator
from klein_agent.rules import families, limits
from klein_agent.rules.requests import GenerationRequest, GeneratorInfo, ImageGenerator, resolve
from klein_agent.rules.resolution import RequestError

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before Ray is imported; local mode starts no cluster
serve = pytest.importorskip("ray.serve", reason="the scale extra (ray[serve]) is not installed")

TINY = {"model": "tiny", "transformer_file": None, "device": None, "dtype": None, "allow_download": False}


class Stop(Exception):
    """What the engine's progress callback raises for a cancelled call."""


@pytest.fixture(scope="module")
def replica() -> Iterator[Any]:
    from klein_agent.replica.deployment import build_app

    handle = serve.run(build_app(TINY), name="replica-test", _local_testing_mode=True)
    yield handle


def counts(handle: Any) -> dict[str, int]:
    result: dict[str, int] = handle.options(method_name="counts").remote().result()
    return result


async def acounts(handle: Any) -> dict[str, int]:
    """`counts` from inside an event loop (Ray refuses its blocking `result()` there)."""
    result: dict[str, int] = await handle.options(method_name="counts").remote()
    return result


def generator(handle: Any, deadline_s: float = limits.REPLICA_DEADLINE_S) -> RayGenerator:
    return RayGenerator(handle, handle.options(method_name="info").remote().result(), deadline_s)


def test_a_call_through_the_replica_gives_the_local_models_pictures_recipe_and_progress(
    replica: Any, tiny_pipeline: ImageGenerator
) -> None:
    request = GenerationRequest("a lighthouse at dusk", 64, 48, seed=11, num_images=2)
    heard: list[tuple[int, int, str]] = []
    remote = generator(replica).generate(request, lambda *event: heard.append(event))
    local_heard: list[tuple[int, int, str]] = []
    local = tiny_pipeline.generate(request, lambda *event: local_heard.append(event))
    assert [im.tobytes() for im in remote.images] == [im.tobytes() for im in local.images]
    assert [remote.recipe(k) for k in range(2)] == [local.recipe(k) for k in range(2)]
    assert heard == local_heard and heard[-1][0] == heard[-1][1], "every unit, in order, to the last"
    assert remote.info == tiny_pipeline.info


def test_a_cancel_reaches_the_replica_and_stops_its_model_at_the_next_step(
    replica: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The replica's model stops at the step after the cancel and says so, naming the call; in local testing mode
    (the replica inside this process) our logging is left as it was, so the line reaches the root's handlers."""
    caplog.set_level(logging.INFO, logger="klein_agent")
    before = counts(replica)
    heard: list[int] = []

    def cancel_at_the_first_step(done: int, total: int, message: str) -> None:
        heard.append(done)
        if done == 2:  # the first denoising step: the engine's callback raises for a cancelled call
            raise Stop

    request = GenerationRequest(
        "a long call", 256, 256, seed=1, steps=limits.MAX_STEPS, call_id="call_to_stop"
    )
    with pytest.raises(Stop):
        generator(replica).generate(request, cancel_at_the_first_step)
    deadline = time.monotonic() + 30
    while counts(replica)["stopped"] == before["stopped"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counts(replica)["stopped"] == before["stopped"] + 1, "the replica's model stopped before its end"
    assert heard == [1, 2]
    said = [r.getMessage() for r in caplog.records if r.name == "klein_agent.replica"]
    assert "call 'call_to_stop': its caller cancelled it; stopped at step 3/" in " ".join(said), said
    ours = logging.getLogger("klein_agent")
    assert ours.propagate and not [h for h in ours.handlers if type(h).__name__ == "_ForwardHandler"]


def test_the_replica_stops_a_call_past_its_deadline_with_a_clear_error(replica: Any) -> None:
    before = counts(replica)
    request = GenerationRequest("too slow", 64, 64, seed=1)
    with pytest.raises(wire.ReplicaDeadlineError, match=r"deadline of 0 s and was stopped at step 1/"):
        generator(replica, deadline_s=0).generate(request)
    assert counts(replica)["stopped"] == before["stopped"] + 1


def test_a_refusal_on_the_replica_reads_as_the_local_models(
    replica: Any, tiny_pipeline: ImageGenerator
) -> None:
    request = GenerationRequest("a bad size", 1000, 64, seed=1)
    with pytest.raises(RequestError) as local:
        tiny_pipeline.generate(request)
    with pytest.raises(RequestError) as remote:
        generator(replica).generate(request)
    assert str(remote.value) == str(local.value) and "width" in str(local.value)


def test_the_generator_option_names_the_application_or_says_what_to_give() -> None:
    assert parse_generator("local") is None
    assert parse_generator("ray") == limits.RAY_APP
    assert parse_generator("ray:team-a") == "team-a"
    for bad in ("ray:", "rays", "local:x", ""):
        with pytest.raises(ValueError, match=r"--generator .*give local, ray or ray:APP"):
            parse_generator(bad)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cancelled_engine_call_stops_the_replicas_model(replica: Any, anyio_backend: str) -> None:
    """The path `serve --generator ray` takes: the engine's own cancellation (a client's cancel cancels the
    awaiting task) reaches the replica through the handle, and the engine serves the next call."""
    import anyio

    from klein_agent.service.engine import Engine, EngineState

    engine = Engine(lambda: generator(replica))  # the factory runs on the engine's thread, off the loop
    engine.start()
    assert engine.wait_loaded(60) == EngineState.READY
    before = await acounts(replica)
    started = anyio.Event()

    async def progress(value: float, total: float | None, message: str) -> None:
        if message.startswith("step "):
            started.set()

    long_call = GenerationRequest("a long call", 256, 256, seed=2, steps=limits.MAX_STEPS)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(lambda: engine.run(long_call, progress=progress))
        await started.wait()
        tasks.cancel_scope.cancel()
    deadline = time.monotonic() + 30
    while (await acounts(replica))["stopped"] == before["stopped"] and time.monotonic() < deadline:
        await anyio.sleep(0.05)
    assert (await acounts(replica))["stopped"] == before["stopped"] + 1, (
        "the replica's model stopped before its end"
    )
    after = await engine.run(GenerationRequest("next", 64, 64, seed=3))
    assert len(after.result.images) == 1
    assert engine.status().cancelled == 1
    await engine.aclose()


def test_deploy_without_a_cluster_address_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from klein_agent.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["deploy", "--model", "tiny", "--replicas", "2"]) == 2
    err = capsys.readouterr().err  # stderr: the log, as every start-up error of serve
    assert "set RAY_ADDRESS to its address" in err and "deploy does not start one" in err


def test_a_front_end_without_a_cluster_address_fails_its_load_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from klein_agent.replica.handle import ray_generator_factory
    from klein_agent.service.engine import Engine, EngineState

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    engine = Engine(ray_generator_factory("klein"))
    engine.start()
    assert engine.wait_loaded(30) == EngineState.FAILED
    assert "--generator ray needs the Ray cluster's address: set RAY_ADDRESS" in (engine.status().error or "")
    engine.close()


def test_the_application_tells_front_ends_how_many_calls_to_send_at_once() -> None:
    from klein_agent.replica.config import in_flight_bound

    assert in_flight_bound() == 1  # one replica, one call each: a front-end sends one at a time, as before
    assert in_flight_bound(replicas=4) == 4
    # autoscaling: its most replicas, so calls beyond the running ones wait in Serve's queue, which it scales on
    assert in_flight_bound(autoscale=(0, 3)) == 3
    # never more than Serve lets one caller have waiting: more would be refused as busy with replicas idle
    assert in_flight_bound(replicas=4, max_queued=2) == 2


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_one_engine_sends_a_two_replica_application_two_calls_at_once(anyio_backend: str) -> None:
    """The front-end's shape under `serve --generator ray`: an engine over the handle of an application of two
    replicas takes the bound the application states and has two calls at the replicas at once. Local testing mode
    runs one replica instance (one model thread), so the overlap is shown where it starts: the replica has begun
    the second call while the first is still unanswered at the engine (its progress held on the caller's side)."""
    import anyio

    from klein_agent.replica.deployment import build_app
    from klein_agent.replica.handle import ask_in_flight
    from klein_agent.service.engine import Engine, EngineState

    handle = serve.run(build_app(TINY, replicas=2), name="replica-two", _local_testing_mode=True)
    assert (
        await anyio.to_thread.run_sync(ask_in_flight, handle, 60) == 2
    )  # Ray's result() blocks: off the loop
    engine = Engine(
        lambda: RayGenerator(handle, generator(handle).info, max_in_flight=ask_in_flight(handle, 60))
    )
    engine.start()
    assert engine.wait_loaded(60) == EngineState.READY
    before = (await acounts(handle))["calls"]
    first_reported, release_first = anyio.Event(), anyio.Event()
    finished: list[str] = []

    async def held(value: float, total: float | None, message: str) -> None:
        first_reported.set()
        await release_first.wait()  # the first call cannot finish at the engine until released

    async def one(prompt: str, progress: Any) -> None:
        done = await engine.run(GenerationRequest(prompt, 64, 64, seed=5, steps=2), progress=progress)
        assert len(done.result.images) == 1
        finished.append(prompt)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(one, "first", held)
        with anyio.fail_after(60):
            await first_reported.wait()
        tasks.start_soon(one, "second", None)
        with anyio.fail_after(60):  # a hang guard: a front-end sending one call at a time never gets here
            while (await acounts(handle))["calls"] < before + 2:
                await anyio.sleep(0.02)
        assert "first" not in finished and engine.status().running_calls >= 1
        release_first.set()
    assert sorted(finished) == ["first", "second"] and engine.status().completed == 2
    await engine.aclose()


FLUX2 = GeneratorInfo(
    model="tiny",
    variant="tiny",
    device="cuda",
    dtype="bfloat16",
    distilled=True,
    default_steps=limits.DISTILLED_STEPS,
    default_guidance=limits.DISTILLED_GUIDANCE,
    max_references=families.FLUX2.max_references,
)
FLUX3 = replace(
    FLUX2,
    family="flux3",
    max_references=families.FLUX3.max_references,
    no_masked_edits=families.FLUX3.no_masked_edits,
)


def sized_request(
    width: int | None, height: int | None, num_images: int, references: list[tuple[int, int]]
) -> GenerationRequest:
    """A request of that size with blank references of those sizes."""
    return GenerationRequest(
        prompt="p",
        width=width,
        height=height,
        num_images=num_images,
        references=tuple(Image.new("RGB", size) for size in references),
    )


@pytest.mark.parametrize(
    ("width", "height", "num_images", "references", "fits"),
    [
        (256, 256, 1, [], True),
        (1024, 1024, 1, [], True),  # 3 MiB of pixels: one gRPC message
        (1024, 1024, 2, [], False),  # 6 MiB
        (512, 512, 1, [(1024, 1024)], True),
        (512, 512, 1, [(1024, 1024), (1024, 1024)], False),  # the request is 6 MiB
        (None, None, 1, [], True),  # 1024², the model's default
        (None, None, 1, [(2048, 2048)], False),  # the request is 12 MiB
    ],
)
def test_a_call_goes_over_grpc_only_when_its_request_and_pictures_fit_one_message(
    width: int | None, height: int | None, num_images: int, references: list[tuple[int, int]], fits: bool
) -> None:
    from klein_agent.replica.handle import fits_grpc

    request = sized_request(width, height, num_images, references)
    assert fits_grpc(request, FLUX2) is fits


@pytest.mark.parametrize(
    ("info", "width", "height", "num_images", "references", "made"),
    [
        # one side given (the server and the CLI pass it on as it is): the other keeps the default's aspect
        (FLUX2, 2048, None, 1, [], (2048, 2048)),  # 12 MiB back, not 1024²'s 3 MiB
        (FLUX2, None, 2048, 1, [], (2048, 2048)),
        (FLUX2, 1280, None, 1, [], (1280, 1280)),  # 4.7 MiB: over by less than one picture's worth
        (FLUX2, 1024, None, 2, [], (1024, 1024)),  # two of 3 MiB
        (FLUX2, 1024, None, 1, [(512, 1024)], (1024, 2048)),  # the reference's 1:2, 6 MiB
        (FLUX2, 1024, None, 1, [(1024, 512)], (1024, 512)),
        # FLUX 3 keeps one reference whole (up to 4 Mpx) and crops the picture back to it
        (FLUX3, None, None, 1, [(2048, 1536)], (2048, 1536)),
        (FLUX3, 1536, None, 1, [(2048, 1536)], (1536, 1152)),
        (FLUX3, None, None, 1, [(1024, 768)], (1024, 768)),
    ],
)
def test_a_call_is_sized_for_grpc_as_the_model_will_make_its_pictures(
    info: GeneratorInfo,
    width: int | None,
    height: int | None,
    num_images: int,
    references: list[tuple[int, int]],
    made: tuple[int, int],
) -> None:
    """The pictures come back in one message: a size the call leaves (wholly or one side) to the model counts as
    what the model resolves it to, and only a call whose pictures fit goes over gRPC."""
    from klein_agent.replica.handle import fits_grpc

    request = sized_request(width, height, num_images, references)
    assert resolve(request, info).picture_size == made  # the size the replica's model makes
    pictures = 3 * made[0] * made[1] * num_images
    room = limits.RAY_GRPC_MESSAGE_BYTES - limits.RAY_GRPC_MARGIN_BYTES
    request_bytes = sum(3 * w * h for w, h in references)
    assert fits_grpc(request, info) is (pictures <= room and request_bytes <= room)


def test_a_request_the_rules_refuse_is_sized_by_itself() -> None:
    """A masked edit with a size given is refused on the replica with a short error: only the request counts."""
    from klein_agent.replica.handle import fits_grpc

    source = Image.new("RGB", (512, 512))
    refused = GenerationRequest(
        prompt="p", width=2048, height=2048, references=(source,), mask=Image.new("L", (512, 512))
    )
    with pytest.raises(RequestError):
        resolve(refused, FLUX2)
    assert fits_grpc(refused, FLUX2)
