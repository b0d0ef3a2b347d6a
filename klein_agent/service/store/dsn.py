"""Store addresses given as text: a PostgreSQL DSN (`postgresql://…` or `host=… dbname=…`) and an S3 URL
(`s3://BUCKET/PREFIX`), recognised and shown without their secrets. No driver imports: a plain install uses it.

A password must never reach a log line, an error message or a tool result. `redact_dsn` rewrites both DSN forms
(the URL's `user:PASSWORD@` and a `password=` keyword); `scrub` removes a known secret from any text (a driver's
error message that quotes what it was given).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

DSN_SCHEMES = ("postgresql://", "postgres://")
S3_SCHEME = "s3://"
MASK = "***"
_URL_PASSWORD = re.compile(r"(?P<head>postgres(?:ql)?://[^:/@\s]*:)(?P<secret>[^@\s]*)(?P<tail>@)", re.I)
_KEYWORD_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'|\S+)", re.I)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&\s]*)", re.I)


def is_dsn(text: object) -> bool:
    """Whether `text` names a PostgreSQL database (a postgresql:// or postgres:// URL)."""
    return isinstance(text, str) and text.strip().lower().startswith(DSN_SCHEMES)


def is_s3_url(text: object) -> bool:
    """Whether `text` is an s3:// URL."""
    return isinstance(text, str) and text.strip().lower().startswith(S3_SCHEME)


def redact_dsn(text: str) -> str:
    """`text` with every password in it (URL or keyword form, also inside a longer message) replaced by ***."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK + m["tail"], text)
    text = _QUERY_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    return _KEYWORD_PASSWORD.sub(lambda m: m["head"] + MASK, text)


def without_password(dsn: str) -> str:
    """`dsn` (a postgresql:// URL) with its password left out, not masked: `user:PASSWORD@` becomes `user@` and a
    `password=` query parameter is dropped, so the text still works as a command's argument (libpq then takes
    the password from PGPASSWORD or ~/.pgpass) and shows no secret. Everything else stays as written."""
    dsn = _URL_PASSWORD.sub(lambda m: m["head"][:-1] + m["tail"], dsn)
    dsn = _QUERY_PASSWORD.sub(lambda m: m["head"][0], dsn)  # "?password=x&a=b" -> "?&a=b", tidied below
    return re.sub(r"[?&]$", "", dsn.replace("?&", "?").replace("&&", "&"))


def dsn_secrets(dsn: str) -> tuple[str, ...]:
    """The password a DSN carries (URL or keyword form) as written and as decoded (a URL's %XX escapes), or ():
    what `scrub` must keep out of messages. Both forms, because a driver may quote either."""
    for pattern in (_URL_PASSWORD, _QUERY_PASSWORD, _KEYWORD_PASSWORD):
        m = pattern.search(dsn)
        if m and m["secret"]:
            raw = m["secret"].strip("'")
            return tuple(dict.fromkeys((raw, unquote(raw))))
    return ()


def scrub(text: str, *secrets: str | None) -> str:
    """`text` without the given secrets (each replaced by ***) and with any DSN password redacted."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return redact_dsn(text)


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://BUCKET/PREFIX` (prefix without slashes at either end, maybe empty). Raises
    ValueError naming the URL's problem."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "s3" or not parts.netloc:
        raise ValueError(f"--blobs {url!r}: expected s3://BUCKET/PREFIX (for example s3://klein/images)")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(
            f"--blobs {url!r}: put no credentials, query or fragment in the URL; keys come from "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the endpoint from --s3-endpoint or AWS_ENDPOINT_URL"
        )
    prefix = parts.path.strip("/")
    if any(seg in ("", ".", "..") for seg in prefix.split("/")) and prefix:
        raise ValueError(f"--blobs {url!r}: the prefix has an empty, '.' or '..' segment")
    return parts.netloc, prefix
