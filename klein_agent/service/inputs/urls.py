"""http(s) inputs, off by default: public addresses only, the vetted address pinned for the connection (no second
DNS lookup to rebind), no redirects, and the whole fetch bounded in bytes and time.

Why on `http.client` and not a client library: `urllib.request` resolves the host name again as it connects (a
check made before can be rebound), follows redirects to hosts nobody checked and honours the proxy environment
variables; requests and httpx (not our dependencies: they arrive with others) resolve inside their connection
pools too and read proxies from the environment; and the timeouts of all of them bound each connect and each
read, not the whole exchange, so a server dripping a byte a second never trips them. `http.client` lets
`connect` be replaced, so the pinning is two small subclasses, and the deadline is a watchdog on the socket.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse

from klein_agent.service.error_text import describe
from klein_agent.service.inputs.common import (
    ImageInputError,
    LoadedImage,
    content_key,
    ellipsize,
    show,
    too_big_error,
)
from klein_agent.service.inputs.decoding import decode
from klein_agent.service.inputs.policy import ALLOW_URLS_FLAG, InputPolicy

_URL_CHUNK = 64 * 1024


def load_url(url: str, policy: InputPolicy) -> LoadedImage:
    """Fetch and decode an http(s) image under the policy (module docstring).

    Raises ImageInputError when URLs are turned off, the URL is malformed or carries credentials, the host
    resolves to a non-public address, the server redirects or answers other than 200, the body exceeds
    `policy.max_bytes`, the fetch outlasts `policy.url_timeout_s` seconds, or the bytes do not decode as an
    allowed image.
    """
    if not policy.allow_urls:
        raise ImageInputError(
            f"URL inputs are turned off on this server (the user can enable them by starting klein-agent with "
            f"{ALLOW_URLS_FLAG}). Instead, download the image and pass its absolute path inside "
            f"{policy.dirs_text()}, or pass it as a data:image/png;base64,... URI."
        )
    data, host, name = _fetch_url(url, policy)
    image, fmt = decode(data, max_pixels=policy.max_pixels, reduce_to=policy.reduce_to)
    where = ellipsize(host + (f"/{name}" if name else ""), 60)
    return LoadedImage(
        image=image,
        source="url",
        image_id=None,
        description=f"URL {where} ({fmt}, {image.width}x{image.height})",
        content_key=content_key(data),
    )


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `ip` is a global unicast address, looking through IPv4-mapped and NAT64 IPv6 forms."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 reaches 127.0.0.1
            return is_public_address(ip.ipv4_mapped)
        if ip in _NAT64:  # 64:ff9b::a00:1 reaches 10.0.0.1 through a NAT64 gateway
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local  # includes 169.254.169.254, the cloud metadata endpoint
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
        or not ip.is_global  # also catches 100.64.0.0/10 (carrier-grade NAT) and documentation ranges
    )


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _resolve_checked(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise ImageInputError(f"cannot resolve host {host!r} ({e}): check the URL") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise ImageInputError(f"host {host!r} has no addresses: check the URL")
    for a in addresses:  # every address: a host with one public and one private record must not pass
        try:
            ip = ipaddress.ip_address(a.split("%", 1)[0])
        except ValueError:
            ip = None
        if ip is None or not is_public_address(ip):
            raise ImageInputError(
                f"refusing to fetch from {host!r}: it resolves to {a}, a private, loopback, link-local or "
                "reserved address. Only public internet addresses are fetched; download the image yourself and "
                "pass a local path or a data: URI"
            )
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address checked in advance instead of resolving the host name a second time.

    A second resolution could answer differently (DNS rebinding) and land on a private address after the
    check passed. The Host header still carries the name. http.client ignores proxy environment variables,
    which is what we want: a proxy would connect to a host we did not check.
    """

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        # The certificate is checked against the host *name*, as for an ordinary connection.
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _shutdown_socket(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: the fetch finished in the meantime
            sock.shutdown(socket.SHUT_RDWR)


def _fetch_url(url: str, policy: InputPolicy) -> tuple[bytes, str, str]:
    """GET `url` under the policy's checks; return (body, host, last path segment)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ImageInputError(f"malformed URL {show(url)} ({e}): check it") from None
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in ("http", "https") or not host:
        raise ImageInputError(f"malformed URL {show(url)}: use http://host/path or https://host/path")
    if parts.username is not None or parts.password is not None:
        raise ImageInputError("URL contains a user name or password: remove the credentials from the URL")
    if any(c in url for c in "\r\n\t ") or any(ord(c) < 32 for c in url):
        raise ImageInputError("URL contains whitespace or control characters: percent-encode them")
    port = port or (443 if scheme == "https" else 80)
    addresses = _resolve_checked(host, port)

    deadline = time.monotonic() + policy.url_timeout_s
    conn_cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn = conn_cls(host, port, address=addresses[0], timeout=policy.url_timeout_s)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # Socket timeouts bound each recv, not the whole exchange: a server dripping one byte per second would
    # never trip them. The watchdog shuts the socket down at the deadline, which wakes any blocked read.
    watchdog = threading.Timer(policy.url_timeout_s, _shutdown_socket, args=(conn,))
    watchdog.daemon = True
    chunks: list[bytes] = []
    try:
        conn.connect()
        watchdog.start()
        conn.request(
            "GET",
            target,
            headers={"User-Agent": "klein-agent", "Accept": "image/png, image/jpeg, image/webp"},
        )
        resp = conn.getresponse()
        if 300 <= resp.status < 400:
            location = resp.getheader("Location") or "?"
            # Not followed: the new target would need the same address checks, and the agent can simply pass it.
            raise ImageInputError(
                f"the URL redirects (HTTP {resp.status}) to {show(location)}; redirects are not followed: pass "
                "the final URL directly"
            )
        if resp.status != 200:
            raise ImageInputError(f"the server answered HTTP {resp.status} {resp.reason}: check the URL")
        length = resp.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
            raise too_big_error("the URL's image", int(length), policy.max_bytes)
        total = 0
        while True:
            chunk = resp.read1(_URL_CHUNK)  # read1: whatever has arrived, so the deadline is checked often
            if time.monotonic() >= deadline:
                raise TimeoutError
            if not chunk:
                break
            total += len(chunk)
            if total > policy.max_bytes:
                raise too_big_error("the URL's image", total, policy.max_bytes)
            chunks.append(chunk)
    except ImageInputError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        if isinstance(e, TimeoutError) or time.monotonic() >= deadline:
            raise ImageInputError(
                f"fetching the URL took longer than {policy.url_timeout_s:g} s: download the image yourself and "
                "pass a local path or a data: URI"
            ) from None
        raise ImageInputError(
            f"could not fetch the URL ({describe(e)}): check it, or pass a local path or data: URI"
        ) from None
    finally:
        watchdog.cancel()
        conn.close()
    name = urllib.parse.unquote(parts.path.rsplit("/", 1)[-1])
    return b"".join(chunks), host, name
