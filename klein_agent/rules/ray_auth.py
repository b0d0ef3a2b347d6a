"""Ray's token authentication, required wherever klein-agent connects to a Ray cluster (`deploy`, `serve
--generator ray`): a cluster without it runs code for anyone who reaches its ports. A pure rule over the
environment; the drivers call it before `ray.init`, so the refusal costs no connection. No I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

# What every process that joins the cluster needs (Ray 2.60: https://docs.ray.io/en/latest/ray-security/token-auth.html).
NEEDED = "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (the same in every process)"


def ray_auth_problem(environ: Mapping[str, str], what: str) -> str | None:
    """Why `what` (e.g. "deploy") must not connect with this environment, or None when token auth is on:
    `RAY_AUTH_MODE` must be "token" (any case). The message names the variables and never a token's value.
    A token may also come from Ray's token file (`ray start` writes ~/.ray/auth_token), so RAY_AUTH_TOKEN is not
    required here; a wrong or missing token is then Ray's own refusal."""
    mode = environ.get("RAY_AUTH_MODE", "")
    if mode.strip().lower() == "token":
        return None
    shown = "unset" if not mode else f"{mode[:20]!r}"
    return (
        f"{what} connects to Ray only with token authentication on (RAY_AUTH_MODE is {shown}): set {NEEDED}, as "
        "the cluster was started with; a cluster without it runs code for anyone who reaches its ports"
    )
