"""One tool argument to one RGB picture: dispatch on what the argument is.

An argument is a stored image id (`img_...` or `image://img_...`, read by `klein_agent.rules.image_refs`, the
one reading every caller shares), an absolute local path or `file://` URI inside a server-configured folder, a
`data:image/...;base64,...` URI (or bare base64 of a PNG/JPEG/WebP), or an `http(s)://`
URL when the server was started with URL inputs on. Every failure raises ImageInputError whose message says what
was wrong and how to fix it: the calling agent reads it and must be able to correct itself without a human.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from klein_agent.rules.image_refs import ImageRefError, parse_image_ref
from klein_agent.service.inputs.common import MAX_ARG_CHARS, ImageInputError, LoadedImage
from klein_agent.service.inputs.data_uri import load_base64, load_data_uri, looks_like_bare_base64
from klein_agent.service.inputs.decoding import decode
from klein_agent.service.inputs.paths import WINDOWS_DRIVE_RE, load_path, path_from_file_uri
from klein_agent.service.inputs.policy import InputPolicy
from klein_agent.service.inputs.urls import load_url


def load_image_argument(arg: str, policy: InputPolicy, lookup: Callable[[str], bytes]) -> LoadedImage:
    """Resolve one tool argument to an RGB image.

    `lookup(image_id)` returns the stored PNG bytes and raises `LookupError` with an actionable message when
    the id is unknown; that message is passed on unchanged. Other exceptions from `lookup` (a broken store)
    are server faults and propagate.
    """
    if not isinstance(arg, str):
        raise ImageInputError(f"image argument must be a string, got {type(arg).__name__}")
    arg = arg.strip()  # agents often add a trailing newline; no legitimate id, URI or path relies on it
    if not arg:
        raise ImageInputError(
            "empty image argument: pass an image id (img_...), an absolute file path, or a data: URI"
        )
    # Inline image data first, and without scanning or copying the string: a 200 MB argument must be
    # refused on its length alone. (The base64 check rejects NUL and every other stray character.)
    lower = arg[:16].lower()
    if lower.startswith("data:"):
        return load_data_uri(arg, policy)
    if looks_like_bare_base64(arg):
        return load_base64(arg, 0, policy, what="base64 data")
    if "\x00" in arg:
        raise ImageInputError("image argument contains a NUL character: pass a plain image id, path or URI")
    if len(arg) > MAX_ARG_CHARS:
        raise ImageInputError(
            f"image argument is {len(arg)} characters long, over the {MAX_ARG_CHARS} limit for ids, paths "
            "and URLs: pass an image id, a shorter path, or the image itself as a data: URI"
        )
    # An id reference before any path or URI reading: `img_...` in any case and the `image:` scheme are ids or
    # refused as malformed ids, never looked up as relative paths or unknown schemes.
    try:
        image_id = parse_image_ref(arg)
    except ImageRefError as exc:
        raise ImageInputError(str(exc)) from None
    if image_id is not None:
        return _load_id(image_id, policy, lookup)
    if lower.startswith(("http://", "https://")):
        return load_url(arg, policy)
    if lower.startswith("file:"):
        path = path_from_file_uri(arg)
        return load_path(path, policy)
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", arg)
    if scheme and not WINDOWS_DRIVE_RE.match(arg):
        raise ImageInputError(
            f"unsupported URI scheme {scheme.group(1)!r}: pass an image id (img_...), an absolute file path, "
            "a file:// URI, a data:image/png;base64,... URI, or an http(s) URL"
        )
    return load_path(arg, policy)


def _load_id(image_id: str, policy: InputPolicy, lookup: Callable[[str], bytes]) -> LoadedImage:
    try:
        data = lookup(image_id)
    except LookupError as e:
        # KeyError's str() adds quotes; the store's message is the first argument.
        msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise ImageInputError(msg) from None
    # Our own store, so the bytes are trusted; the same checks cost next to nothing.
    image, _fmt = decode(data, max_pixels=policy.max_pixels)
    return LoadedImage(image=image, source="image_id", image_id=image_id, description=image_id)
