"""`serve --generator ray[:APP]`: the `ImageGenerator` that sends each call to a replica of a Ray Serve application.

The engine drives it exactly as it drives a local model: `generate` runs on the engine thread, reports every unit
through the progress callback, and stops when that callback raises (the engine's cancellation). Here each report
is an event streamed from the replica; when the callback raises, the response is cancelled explicitly (Ray does
not cancel a call whose caller merely stops reading: notes §1.3), so the replica stops at its next step too.
Failures arrive as `wire` events and are raised as the classes a local model raises, so a client reads the same
sentence either way. Ray is imported when the factory runs, never at import: this module stays torch- and ray-free.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from klein_agent.replica import wire
from klein_agent.rules import limits
from klein_agent.rules.busy import GeneratorBusyError
from klein_agent.rules.ray_auth import ray_auth_problem
from klein_agent.rules.requests import (
    GenerationRequest,
    GenerationResult,
    GeneratorInfo,
    ImageGenerator,
    ProgressCallback,
    resolve,
)
from klein_agent.rules.resolution import RequestError

log = logging.getLogger("klein_agent.replica")

GENERATOR_HELP = (
    "where the model runs: local (default: loaded in this process) or ray[:APP], the Ray Serve application "
    f"`klein-agent deploy` made (default APP: {limits.RAY_APP}) on the cluster at $RAY_ADDRESS"
)


def parse_generator(text: str) -> str | None:
    """`--generator` as the Ray application to call, or None for `local`. Raises ValueError naming the option."""
    kind, colon, app = text.partition(":")
    if kind == "local" and not colon:
        return None
    if kind == "ray" and (not colon or app):
        return app or limits.RAY_APP
    raise ValueError(
        f"--generator {text!r}: give local, ray or ray:APP (APP: the name given to deploy --app)"
    )


class RayGenerator:
    """An `ImageGenerator` over a Serve handle to `KleinReplica`. `info` is the replica's, asked once at connect;
    every replica of an application runs the same model options. `max_in_flight`: how many calls the engine may
    run through it at once (the application's `KleinReplica.in_flight`, asked at connect: its replicas x one call
    each, and again every `limits.RAY_IN_FLIGHT_REFRESH_S` once `follow_in_flight` runs, so a redeploy with other
    placement is followed); `generate` is safe to call from that many threads, since each call has its own
    response stream."""

    def __init__(
        self,
        handle: Any,
        info: GeneratorInfo,
        deadline_s: float = limits.REPLICA_DEADLINE_S,
        max_in_flight: int = 1,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self._handle = handle
        self.info = info
        self._deadline_s = deadline_s
        self.max_in_flight = max_in_flight
        self._following: threading.Event | None = None  # set to stop `follow_in_flight`'s thread
        self._refresh_failed = False  # the last refresh failed (said once per streak)

    def refresh_in_flight(self, timeout_s: float = limits.RAY_CONNECT_TIMEOUT_S) -> int:
        """Ask the application again how many calls it takes at once and use the answer from the next call on;
        logs a change. Keeps the current bound (and says why, once per failure streak) when the application cannot
        answer now: mid-redeploy, a replica from an older klein-agent. Returns the bound in use."""
        try:
            value = in_flight_answer(self._handle, timeout_s)
        except Exception as exc:
            if not self._refresh_failed:
                log.warning(
                    "could not ask the application how many calls it takes at once (%s); still sending up to %d",
                    describe_failure(exc),
                    self.max_in_flight,
                )
            self._refresh_failed = True
            return self.max_in_flight
        self._refresh_failed = False
        if value is not None and value != self.max_in_flight:
            log.info(
                "the application now takes %d calls at once (was %d): a front-end sends up to %d",
                value,
                self.max_in_flight,
                value,
            )
            self.max_in_flight = value  # the engine reads it when it next starts a call
        return self.max_in_flight

    def follow_in_flight(self, every_s: float = limits.RAY_IN_FLIGHT_REFRESH_S) -> None:
        """Refresh the bound every `every_s` seconds on a daemon thread until `stop_following`. Idempotent."""
        if self._following is not None:
            return
        stop = self._following = threading.Event()

        def follow() -> None:
            while not stop.wait(every_s):
                self.refresh_in_flight(timeout_s=min(every_s, limits.RAY_CONNECT_TIMEOUT_S))

        threading.Thread(target=follow, name="klein-ray-in-flight", daemon=True).start()

    def stop_following(self) -> None:
        """End `follow_in_flight`'s thread (it exits at its next wake-up)."""
        if self._following is not None:
            self._following.set()

    def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Run `request` on a replica and return its pictures; progress as the replica reports it. A call with
        references goes to the replica their digest hashes to (`routing_key`), where a retry finds them prepared;
        others spread. Raises what the model raised there (see `wire.raise_error`), whatever `progress` raised
        (after cancelling the replica's call), GeneratorBusyError when this front-end already has the most calls
        Serve lets it queue (`deploy --max-queue`), or wire.ReplicaLostError when the replica died and so did the
        one the call was retried on. A replica that dies mid-call is retried once: its pictures come only in the
        last event, so none of them reached this side, and this front-end stores the one result it gets. A call
        sent over gRPC (`fits_grpc`) that gRPC refuses for its size, request or pictures, is sent once more as
        Ray tasks and objects, which take any size (a refused result costs the model's time again)."""
        key = routing_key(request)
        by_reference = not fits_grpc(request, self.info)
        heard = 0  # the last `done` passed on: a retry's repeated steps are not reported again

        def relay(done: int, total: int, message: str) -> None:
            nonlocal heard
            if done > heard and progress is not None:
                progress(done, total, message)
            heard = max(heard, done)

        retried = False
        while True:
            try:
                return self._call_once(request, key, relay, by_reference)
            except Exception as exc:
                queued = _backpressure(exc)
                if queued is not None:
                    raise GeneratorBusyError(queued) from exc
                if not by_reference and _too_large_for_grpc(exc):
                    log.warning(
                        "call %s: too large for one gRPC message (%s); sending it again as Ray tasks and objects",
                        wire.call_name(request),
                        describe_failure(exc),
                        extra={"repeat_key": request.call_id},  # every such call named, not one and a count
                    )
                    by_reference = True
                    continue
                if not _replica_died(exc):
                    raise
                if retried:
                    raise wire.ReplicaLostError(
                        "the replica running this call died, and so did the one it was retried on; nothing was "
                        "stored. Retry the call in a minute (Serve replaces dead replicas), or with fewer images, "
                        "steps or pixels if it ran out of memory"
                    ) from exc
                log.warning(
                    "call %s: its replica died mid-call (%s); retrying once on another",
                    wire.call_name(request),
                    exc,
                    extra={"repeat_key": request.call_id},
                )
                retried = True

    def _call_once(
        self, request: GenerationRequest, key: str | None, progress: ProgressCallback, by_reference: bool
    ) -> GenerationResult:
        """One call on one replica, streaming its events; cancels the replica's call when anything raises here.
        `by_reference`: as Ray tasks and objects, else over the replica's gRPC server."""
        # `_by_reference=False`: the call and its events go over the replica's inter-deployment gRPC server rather
        # than as Ray tasks and object refs (what Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED mode does): 6.7 against
        # 10.7 ms p50 of Serve's own cost per call at 256² here (docs/scaling.md). Replica deaths still arrive as
        # RayActorError subclasses, and `response.cancel()` still reaches the replica's `generate`. A call too
        # large for one gRPC message goes the old way (`fits_grpc`, and `generate` when gRPC refuses one).
        options: dict[str, Any] = {"stream": True, "method_name": "generate"}
        if not by_reference:
            options["_by_reference"] = False
        if key is not None:
            options["session_id"] = key  # the router's key (limits.RAY_ROUTER): same references, same replica
        response = self._handle.options(**options).remote(request, self._deadline_s)
        try:
            for event in response:
                if event[0] == wire.PROGRESS:
                    progress(event[1], event[2], event[3])
                elif event[0] == wire.RESULT:
                    result: GenerationResult = event[1]
                    return result
                elif event[0] == wire.ERROR:
                    wire.raise_error(event[1], event[2])
                else:
                    raise wire.ReplicaError(f"unexpected event {wire.describe_event(event)}")
        except BaseException:
            response.cancel()  # a no-op once the stream has ended; otherwise the replica stops at its next step
            raise
        raise wire.ReplicaError("the replica ended the call without a result (its log says why)")


def fits_grpc(request: GenerationRequest, info: GeneratorInfo) -> bool:
    """Whether the call's request and its pictures each fit one message of the replicas' gRPC data plane
    (`limits.RAY_GRPC_MESSAGE_BYTES` less `RAY_GRPC_MARGIN_BYTES`), counting 3 bytes a pixel (RGB). The pictures
    are counted at the size the model of `info` makes them (`rules.requests.resolve`, the rule the replica runs),
    also when the call leaves the size, or one side of it, to the model (the first reference's size or 1024², at
    the given side's aspect). A request the rules refuse gets a short error back: then only the request counts."""
    given = [*request.references, *request.upsampler_references]
    sent = sum(3 * p.width * p.height for p in given) + (
        0 if request.mask is None else 3 * request.mask.width * request.mask.height
    )
    try:
        width, height = resolve(request, info).picture_size
    except RequestError:
        width = height = 0
    made = 3 * width * height * request.num_images
    room = limits.RAY_GRPC_MESSAGE_BYTES - limits.RAY_GRPC_MARGIN_BYTES
    return sent <= room and made <= room


def routing_key(request: GenerationRequest) -> str | None:
    """The digest of the call's references (their pixels, size and order; a masked edit's mask too, which a
    repaint's references are prepared with), None for a call without references. Equal pictures give the same key
    in every front-end, which is what sends a retry to the replica holding their prepared latents (and klein
    9B-KV's kept keys and values). 8 ms (best of 20) for one 1024x1024 reference on a loaded 2-core machine."""
    if not request.references:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for picture in (*request.references, *([request.mask] if request.mask is not None else [])):
        digest.update(f"{picture.mode}:{picture.width}x{picture.height};".encode())
        digest.update(picture.tobytes())
    return "refs-" + digest.hexdigest()


def describe_failure(exc: BaseException) -> str:
    """A one-line account of a failed Ray call: its class and the first line of its message (a gRPC error's
    details, whose str() starts with a header line)."""
    details = getattr(exc, "details", None)
    text = str(details() if callable(details) else exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _replica_died(exc: BaseException) -> bool:
    """Whether `exc` is Ray's word for a replica process that died or cannot be reached (ActorDiedError,
    ActorUnavailableError). Ray is imported already whenever a handle exists."""
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


def _too_large_for_grpc(exc: BaseException) -> bool:
    """Whether gRPC refused a call for its size: RESOURCE_EXHAUSTED, "Received message larger than max", raised
    as grpc's AioRpcError on this side whether the replica refused the request or this side the result (measured
    on the cluster with Ray 2.60). grpc comes with Ray, imported whenever a handle exists."""
    import grpc

    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _backpressure(exc: BaseException) -> int | None:
    """The calls queued when Serve refused `exc`'s call for backpressure (BackPressureError), else None."""
    from ray.serve.exceptions import BackPressureError

    if not isinstance(exc, BackPressureError):
        return None
    return exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0


def ray_generator_factory(
    app: str, address: str | None = None, timeout_s: float = limits.RAY_CONNECT_TIMEOUT_S
) -> Callable[[], ImageGenerator]:
    """A zero-argument callable (the engine's model factory) that connects to the Ray cluster at `address` (default
    $RAY_ADDRESS) and returns a `RayGenerator` for application `app`. Raises RuntimeError naming what is missing:
    the address, the application, or Ray itself."""

    def connect() -> ImageGenerator:
        where = address or os.environ.get("RAY_ADDRESS")
        if not where:
            raise RuntimeError(
                "--generator ray needs the Ray cluster's address: set RAY_ADDRESS (e.g. 127.0.0.1:6379) to the "
                "cluster `klein-agent deploy` put the model on"
            )
        if problem := ray_auth_problem(os.environ, "--generator ray"):
            raise RuntimeError(problem)
        handle = connect_application(where, app)
        try:
            info: GeneratorInfo = handle.options(method_name="info").remote().result(timeout_s=timeout_s)
        except Exception as exc:
            raise RuntimeError(f"Ray application {app!r} did not answer in {timeout_s:g} s: {exc}") from exc
        in_flight = ask_in_flight(handle, timeout_s)
        log.info(
            "generator: Ray application %r on %s: %s; up to %d calls at once",
            app,
            where,
            info.summary(),
            in_flight,
        )
        generator = RayGenerator(handle, info, max_in_flight=in_flight)
        generator.follow_in_flight()  # a redeploy with more (or fewer) replicas is followed, not restart-bound
        return generator

    return connect


def ask_in_flight(handle: Any, timeout_s: float) -> int:
    """How many calls the application takes at once from one front-end (`KleinReplica.in_flight`); 1, with a
    warning, when its replicas cannot say (deployed by an older klein-agent): the front-end then sends one call at
    a time, as before."""
    try:
        value = in_flight_answer(handle, timeout_s)
    except Exception as exc:
        log.warning(
            "the application did not say how many calls it takes at once (%s): sending one at a time", exc
        )
        return 1
    return 1 if value is None else value


def in_flight_answer(handle: Any, timeout_s: float) -> int | None:
    """The application's `KleinReplica.in_flight` answer when it is a whole number of calls (≥ 1), else None (an
    older or broken replica's answer). Raises what the Ray call raised."""
    value = handle.options(method_name="in_flight").remote().result(timeout_s=timeout_s)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def connect_application(address: str, app: str) -> Any:
    """A handle to application `app` on the cluster at `address` (ray.init once per process; its workers' logs are
    not forwarded: stdout is the MCP wire). Raises RuntimeError when Ray is missing or the application is not
    there."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise RuntimeError(
            "--generator ray needs Ray Serve: pip install 'klein-agent[scale]' (ray[serve]==2.60.0)"
        ) from exc
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        # a handle to a missing application is made without complaint and its calls time out: ask first
        known = serve.status().applications
        if app not in known:
            raise LookupError(f"the cluster has {', '.join(sorted(known)) or 'no applications'}")
        return serve.get_app_handle(app)
    except Exception as exc:
        raise RuntimeError(
            f"no Ray Serve application {app!r} on {address}: run klein-agent deploy --model MODEL --app {app} "
            f"first ({exc})"
        ) from exc
