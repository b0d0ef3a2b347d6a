"""`klein-agent deploy`: put the generator on a running Ray cluster as a Ray Serve application, and return when
every replica has loaded the model.

    RAY_ADDRESS=127.0.0.1:6379 klein-agent deploy --model black-forest-labs/FLUX.2-klein-4B --replicas 2 \\
        --gpus-per-replica 1
    klein-agent serve --http --generator ray        # any number of front-ends, each with RAY_ADDRESS set

The model options are `serve`'s and are checked here first (a bad --model or --lora is refused before Ray is
touched); each replica loads them again on its own node (docs/scaling.md). Serve's HTTP proxy is left off: front-
ends call the replicas through deployment handles. Exit 0: the application is running, its replicas counted on
stderr; 2: a bad option, no cluster, or a replica that failed to load (the message says which and why).

`--autoscale MIN:MAX` instead of `--replicas N` lets Serve scale on queue length. `--print-config` prints the Serve
config file the options make (for `serve deploy FILE` or a KubeRay RayService) and touches no cluster: deploy
itself builds its application from that same block (`replica/config.py`), so the file and the command agree.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from klein_agent.model_options import add_model_arguments, check_model_options
from klein_agent.option_types import positive_float, positive_int
from klein_agent.replica.config import app_args, replica_option_problem, serve_config
from klein_agent.rules import limits
from klein_agent.rules.ray_auth import ray_auth_problem

log = logging.getLogger("klein_agent.deploy")


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the model options and the placement options (--replicas, --app, resources per replica) to `parser`."""
    add_model_arguments(parser, serve=True)
    place = parser.add_argument_group("placement on the Ray cluster ($RAY_ADDRESS)")
    count = place.add_mutually_exclusive_group()
    count.add_argument(
        "--replicas", type=positive_int, default=1, metavar="N", help="copies of the model (default: 1)"
    )
    count.add_argument(
        "--autoscale",
        type=replica_range,
        default=None,
        metavar="MIN:MAX",
        help="let Serve keep MIN to MAX replicas by queue length: one more while calls wait (target "
        f"{limits.AUTOSCALE_TARGET_ONGOING} running or waiting per replica, after "
        f"{limits.AUTOSCALE_UPSCALE_DELAY_S:g} s), one fewer after {limits.AUTOSCALE_DOWNSCALE_DELAY_S:g} s of less "
        "work; MIN 0 lets it scale to none (the next call then waits for a replica to load). Not with --replicas",
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
        type=positive_int,  # Serve takes no 0 (-1 is its "no bound", which we do not offer)
        default=limits.MAX_QUEUE,
        metavar="N",
        help="calls one front-end may have waiting for a replica; more are refused at once with 'busy' (default: "
        f"{limits.MAX_QUEUE})",
    )
    place.add_argument(
        "--print-config",
        action="store_true",
        help="print the Serve config file these options make (for `serve deploy FILE` or a KubeRay RayService's "
        "serveConfigV2) and exit, without Ray and without checking the model here (the cluster's nodes load it)",
    )
    parser.set_defaults(run=run_deploy)


def replica_range(text: str) -> tuple[int, int]:
    """`--autoscale MIN:MAX` as (MIN, MAX): whole numbers, 0 <= MIN <= MAX, MAX >= 1 (what Serve accepts).
    Raises argparse.ArgumentTypeError saying which part is wrong."""
    low, colon, high = text.partition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX replicas, e.g. 1:4, got {text!r}")
    try:
        least, most = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two whole numbers MIN:MAX, e.g. 1:4, got {text!r}"
        ) from None
    if least < 0 or most < 1:
        raise argparse.ArgumentTypeError(f"MIN must be 0 or more and MAX 1 or more, got {text!r}")
    if least > most:
        raise argparse.ArgumentTypeError(f"MIN must not exceed MAX, got {text!r}; e.g. {most}:{least}")
    return least, most


def placement(args: argparse.Namespace) -> dict[str, Any]:
    """The deployment options' keywords (`replica.config.deployment_options`) the parsed options name."""
    scale: dict[str, Any] = {"autoscale": args.autoscale} if args.autoscale else {"replicas": args.replicas}
    return {
        **scale,
        "cpus_per_replica": args.cpus_per_replica,
        "gpus_per_replica": args.gpus_per_replica,
        "max_queued": args.max_queue,
    }


def run_deploy(args: argparse.Namespace) -> int:
    """Check the options, connect to $RAY_ADDRESS, deploy, and wait until every replica is running. Returns 0 when
    it is, 2 (after logging why) otherwise."""
    if args.gpus_per_replica < 0:
        log.error("--gpus-per-replica %s: give 0 or more GPUs", args.gpus_per_replica)
        return 2
    # before --print-config too: an option the replicas would not load is never dropped silently
    if problem := replica_option_problem(vars(args), "deploy"):
        log.error("%s", problem)
        return 2
    built = app_args(vars(args), **placement(args))
    if args.print_config:
        try:
            import yaml  # Ray's own dependency, as the file is Ray's
        except ImportError as exc:
            log.error(
                "--print-config needs PyYAML, which Ray Serve brings: pip install 'klein-agent[scale]' (%s)",
                exc,
            )
            return 2
        print(yaml.safe_dump(serve_config(args.app, built), sort_keys=False), end="")
        return 0
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

        from klein_agent.replica.deployment import app_from_args
    except ImportError as exc:
        log.error("deploy needs Ray Serve: pip install 'klein-agent[scale]' (%s)", exc)
        return 2
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        serve.start(proxy_location="Disabled")  # no HTTP proxy (it binds 0.0.0.0 by default): handles only
        app = app_from_args(built)  # the builder a Serve config names: deploy and the file are one path
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
