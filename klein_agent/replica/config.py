"""What a klein Serve application is, as plain values and without Ray: the model options each replica loads, the
deployment options (replicas or autoscaling, the queue bound, resources, the cache-affinity router), and the Serve
config file that `serve deploy` or a KubeRay `RayService` reads. `klein-agent deploy` and that file go through
the same functions (`app_args`, then `deployment.app_from_args`), so they cannot drift apart
(`klein-agent deploy --print-config` prints the file; examples/ holds two).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from klein_agent.rules import limits

# The model options `deploy` forwards to each replica (the rest of its command line stays with the deployer).
MODEL_OPTION_NAMES = (
    "model",
    "transformer_file",
    "device",
    "dtype",
    "offload_text_encoder",
    "fp8",
    "compile",
    "warm_buckets",
    "reference_kv_cache_gib",
    "lora",
    "allow_download",
)
# Model options a replica does not load (yet), each with what to do instead: `deploy` and `serve --generator ray`
# refuse them by name (`replica_option_problem`) rather than drop them. Every model option is in exactly one of
# MODEL_OPTION_NAMES and this (tests/test_deploy_config.py compares them with the parser).
NOT_ON_REPLICAS = {"prompt_upsampler": "callers can still pass a caption"}
# The application builder a Serve config names: Serve imports it on the cluster and calls it with the `args` block.
APP_BUILDER = "klein_agent.replica.deployment:app_from_args"


def deployment_options(
    *,
    replicas: int = 1,
    autoscale: tuple[int, int] | None = None,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    max_queued: int = limits.MAX_QUEUE,
) -> dict[str, Any]:
    """The Serve deployment options of the replicas, as plain values (what a Serve config file writes under a
    deployment): `replicas` copies, or between `autoscale` (MIN, MAX) on queue length when given; one call at a
    time each; a caller with `max_queued` calls waiting is refused with Ray's BackPressureError; calls routed by
    the digest of their references (`limits.RAY_ROUTER`, the handle sets it as the session id)."""
    if autoscale is None:
        scale: dict[str, Any] = {"num_replicas": replicas}
    else:
        scale = {
            "autoscaling_config": {
                "min_replicas": autoscale[0],
                "max_replicas": autoscale[1],
                "target_ongoing_requests": limits.AUTOSCALE_TARGET_ONGOING,
                "upscale_delay_s": limits.AUTOSCALE_UPSCALE_DELAY_S,
                "downscale_delay_s": limits.AUTOSCALE_DOWNSCALE_DELAY_S,
            }
        }
    return {
        **scale,
        "max_ongoing_requests": 1,
        "max_queued_requests": max_queued,
        # num_gpus only when asked: Ray reserves what is named, and a CPU cluster has no GPU to give
        "ray_actor_options": {
            "num_cpus": cpus_per_replica,
            **({"num_gpus": gpus_per_replica} if gpus_per_replica else {}),
        },
        "request_router_config": {"request_router_class": limits.RAY_ROUTER},
    }


def in_flight_bound(**placement: Any) -> int:
    """How many calls one front-end sends the application at once (`RayGenerator.max_in_flight`), for the
    deployment `deployment_options(**placement)` makes: every replica it may have (MAX under autoscaling) times
    the calls each runs at once, and never more than Serve lets one caller have waiting (`max_queued_requests`
    counts calls still being routed too, so more would be refused as busy with replicas idle: the notes' §1.6).
    Under autoscaling the calls beyond the running replicas wait in Serve's queue, which is what the autoscaler
    counts: holding them in the front-end instead would never scale up. At least 1."""
    options = deployment_options(**placement)
    scaling = options.get("autoscaling_config")
    replicas = scaling["max_replicas"] if scaling else options["num_replicas"]
    bound = replicas * options["max_ongoing_requests"]
    if options["max_queued_requests"] > 0:
        bound = min(bound, options["max_queued_requests"])
    return max(1, int(bound))


def app_args(options: dict[str, Any], **placement: Any) -> dict[str, Any]:
    """The `args` block of a Serve config for the model `options` (those in MODEL_OPTION_NAMES are kept) placed
    as `deployment_options(**placement)` says: {"model": {...}, "placement": {...}}, plain values only."""
    if placement.get("autoscale") is not None:
        placement["autoscale"] = list(placement["autoscale"])
    deployment_options(
        **placement
    )  # an unknown placement name raises TypeError here, before anything is printed
    return {
        "model": {name: options[name] for name in MODEL_OPTION_NAMES if name in options},
        "placement": placement,
    }


def replica_option_problem(options: Mapping[str, Any], where: str) -> str | None:
    """Why the model `options` (parsed option names to values) cannot go to Ray replicas from `where` ("deploy",
    "--generator ray"), or None: an option of NOT_ON_REPLICAS that was given. The one sentence both commands say."""
    for name, instead in NOT_ON_REPLICAS.items():
        if options.get(name) not in (None, False, []):
            flag = "--" + name.replace("_", "-")
            return (
                f"{flag} does not apply with {where}: the replicas load the model without it; leave it out "
                f"({instead})"
            )
    return None


def placement_from_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`app_args`' block read back: (model options, placement keywords). Raises KeyError without "model"."""
    placement = dict(args.get("placement") or {})
    if placement.get("autoscale") is not None:  # a list in YAML and JSON
        placement["autoscale"] = tuple(placement["autoscale"])
    return dict(args["model"]), placement


def serve_config(app: str, args: dict[str, Any]) -> dict[str, Any]:
    """The Serve config file (`serve deploy FILE`, or a RayService's `serveConfigV2`) of application `app` built
    from `args` (`app_args`). Serve's HTTP proxy stays off: front-ends call replicas through handles."""
    return {
        "proxy_location": "Disabled",
        "http_options": {"host": "127.0.0.1"},  # never 0.0.0.0, should a proxy be turned on
        "applications": [{"name": app, "import_path": APP_BUILDER, "args": args}],
    }
