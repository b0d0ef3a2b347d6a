"""`klein-agent deploy`: put the generator on a running Ray cluster as a Ray Serve application, and return when
every replica has loaded the model.

    RAY_ADDRESS=127.0.0.1:6379 klein-agent deploy --model black-forest-labs/FLUX.2-klein-4B --replicas 2 \\
        --gpus-per-replica 1
    klein-agent serve --http --generator ray        # any number of front-ends, each with RAY_ADDRESS set

The model options are `serve`'s and are checked here first (a bad --model or --lora is refused before Ray is
touched); each replica loads them again on its own node (docs/scaling.md). Serve's HTTP proxy is left off: front-
ends call the replicas through deployment handles. Exit 0: the application is running, its replicas counted on
stderr; 2: a bad option, no cluster, or a replica that failed to load (the message says which and why).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from klein_agent.model_options import add_model_arguments, check_model_options
from klein_agent.option_types import non_negative_int, positive_float, positive_int
from klein_agent.rules import limits
from klein_agent.rules.ray_auth import ray_auth_problem

log = logging.getLogger("klein_agent.deploy")


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the model options and the placement options (--replicas, --app, resources per replica) to `parser`."""
    add_model_arguments(parser, serve=True)
    place = parser.add_argument_group("placement on the Ray cluster ($RAY_ADDRESS)")
    place.add_argument(
        "--replicas", type=positive_int, default=1, metavar="N", help="copies of the model (default: 1)"
    )
    place.add_argument(
        "--app",
        default=limits.RAY_APP,
        metavar="NAME",
        help=f"the Serve application's name, as `serve --generator ray:NAME` calls it (default: {limits.RAY_APP}); "
        "deploying a name again replaces that application",
    )
    place.add_argument(
        "--gpus-per-replica",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs each replica reserves (default: 0, a CPU model; 1 for a model per GPU)",
    )
    place.add_argument(
        "--cpus-per-replica",
        type=positive_float,
        default=1.0,
        metavar="C",
        help="CPUs each replica reserves (default: 1)",
    )
    place.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=limits.MAX_QUEUE,
        metavar="N",
        help="calls one front-end may have waiting for a replica; more are refused at once (default: "
        f"{limits.MAX_QUEUE})",
    )
    parser.set_defaults(run=run_deploy)


def run_deploy(args: argparse.Namespace) -> int:
    """Check the options, connect to $RAY_ADDRESS, deploy, and wait until every replica is running. Returns 0 when
    it is, 2 (after logging why) otherwise."""
    if args.gpus_per_replica < 0:
        log.error("--gpus-per-replica %s: give 0 or more GPUs", args.gpus_per_replica)
        return 2
    try:
        check_model_options(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        log.error(
            "deploy needs a running Ray cluster: set RAY_ADDRESS to its address (e.g. 127.0.0.1:6379, from "
            "`ray start --head`); deploy does not start one"
        )
        return 2
    if problem := ray_auth_problem(os.environ, "deploy"):
        log.error("%s", problem)
        return 2
    try:
        import ray
        from ray import serve
        from ray.serve.schema import ReplicaState

        from klein_agent.replica.deployment import build_app
    except ImportError as exc:
        log.error("deploy needs Ray Serve: pip install 'klein-agent[scale]' (%s)", exc)
        return 2
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        serve.start(proxy_location="Disabled")  # no HTTP proxy (it binds 0.0.0.0 by default): handles only
        app = build_app(
            vars(args),
            replicas=args.replicas,
            cpus_per_replica=args.cpus_per_replica,
            gpus_per_replica=args.gpus_per_replica,
            max_queued=args.max_queue,
        )
        handle = serve.run(app, name=args.app, route_prefix=None, blocking=False)  # returns once running
        info = handle.options(method_name="info").remote().result(timeout_s=limits.RAY_CONNECT_TIMEOUT_S)
        status = serve.status().applications[args.app]
        running = sum(d.replica_states.get(ReplicaState.RUNNING, 0) for d in status.deployments.values())
    except Exception as exc:  # a replica that failed to load: its error is in the deployment's status
        log.error(
            "deploying %r to %s failed: %s%s", args.app, address, exc, _status_messages(serve, args.app)
        )
        return 2
    finally:
        ray.shutdown()  # the application outlives this process
    log.info(
        "Ray Serve application %r on %s: %d replica(s) running %s; front-ends: klein-agent serve --generator "
        "ray:%s with RAY_ADDRESS set",
        args.app,
        address,
        running,
        info.summary(),
        args.app,
    )
    return 0


def _status_messages(serve: Any, app: str) -> str:
    """What Serve says about `app`'s deployments (a replica's load error and traceback), or "" when it says
    nothing or cannot be asked."""
    try:
        status = serve.status().applications[app]
    except Exception:
        return ""
    said = [f"{name}: {d.message}" for name, d in status.deployments.items() if d.message]
    return "".join(f"\n{text}" for text in said)
