"""What an image reference is: the one reading of `img_...` and `image://img_...` for every caller (the input
dispatcher, compose's string of ids, view_image, export_image, the prompts, the message-size check).

The rules, decided once:

- An id is exactly what the store mints: `img_` and 22 base64url characters (`A-Z a-z 0-9 - _`, 128 random
  bits), `IMAGE_ID_PATTERN`. Ids are case-sensitive (base64url), so `IMG_...` or `Img_...` is not an id.
- The `image://` scheme is case-insensitive (RFC 3986, 3.1): `IMAGE://img_...` names the same image.
- Surrounding white space is dropped (agents add a trailing newline); white space inside is not.
- A text is *meant* as an id reference when it begins with the scheme `image:` in any case, or with `img_` in any
  case and holds no `.`, `/` or `\\` (an id never does; a file name has an extension or a folder). Such a text is
  never read as a file path: if it is not a well-formed id it is refused with a message that says what an id looks
  like (`ImageRefError`), instead of a path error or an "unknown id" that hides the typo. A camera's `IMG_1234.JPG`
  or the CLI's `img_<id>.png` stays a file name, read by the path rules of whoever reads it.
- `image://<id>/meta` is the recipe resource, not an image: refused, naming the two forms that are.

Whether a well-formed id is in the store is the store's question (`UnknownImageError`); this module does no I/O.
"""

from __future__ import annotations

import re

from klein_agent.rules.quoting import show
from klein_agent.rules.resolution import RequestError

ID_PREFIX = "img_"
ID_TOKEN_CHARS = 22  # secrets.token_urlsafe(16): 16 bytes as unpadded base64url
# ASCII-only on purpose: `\w` would admit Unicode look-alikes.
IMAGE_ID_PATTERN = re.compile(rf"{ID_PREFIX}[A-Za-z0-9_-]{{{ID_TOKEN_CHARS}}}", re.ASCII)
SCHEME = "image://"
_META = "/meta"
# Where agents put several ids in one string: "img_a, img_b", "img_a img_b", "img_a;img_b".
_SEPARATORS = re.compile(r"[\s,;]+")
_HEAD = re.compile(r"\s*(image:|img_)", re.IGNORECASE | re.ASCII)
_PATH_CHARS = re.compile(r"[./\\]")  # a file name's extension or folder: in no id

ID_SHAPE = f"an id is {ID_PREFIX} followed by {ID_TOKEN_CHARS} letters, digits, '-' or '_', and case matters"
_WHERE = "copy one from a previous result or list_images"


class ImageRefError(RequestError):
    """A text meant as an image id or `image://` URI that is not one; the message says what an id looks like."""


def is_image_id(text: object) -> bool:
    """Whether `text` is exactly an id of the store's shape (no white space, no scheme)."""
    return isinstance(text, str) and IMAGE_ID_PATTERN.fullmatch(text) is not None


def looks_like_image_ref(text: str) -> bool:
    """Whether `text` (surrounding white space aside) is meant as an id reference: it begins with the scheme
    `image:` in any case, or with `img_` in any case and holds no `.`, `/` or `\\`. Such a text is read by
    `parse_image_ref` and never as a path. Linear in `len(text)`, and copies nothing of it."""
    head = _HEAD.match(text)
    if head is None:
        return False
    return head.group(1).lower() == "image:" or _PATH_CHARS.search(text) is None


def parse_image_ref(text: str) -> str | None:
    """The image id `text` refers to: `img_...` or `image://img_...` (scheme in any case, surrounding white
    space dropped), or None when `text` is no id reference (a path, a data: URI, a URL, base64).

    Raises ImageRefError when `text` is meant as an id reference (`looks_like_image_ref`) but is not a
    well-formed one: a short or misspelt id, `IMG_...`, `image://`, `image:img_...`, `image://<id>/meta`."""
    if not looks_like_image_ref(text):
        return None
    ref = text.strip()
    if ref[: len(SCHEME)].lower() == SCHEME:
        return _id_from_uri(ref)
    if ref[:6].lower() == "image:":  # image:img_... or image:/img_...: the scheme without its "//"
        raise ImageRefError(_bad_uri(ref))
    if not is_image_id(ref):
        raise ImageRefError(_bad_id(ref, ref, bare=True))
    return ref


def require_image_id(text: str) -> str:
    """The id of an argument that takes ids only (view_image, export_image, the prompts): as `parse_image_ref`,
    and a text that is no id reference at all (a path, empty) is refused too. Raises ImageRefError."""
    image_id = parse_image_ref(text)
    if image_id is not None:
        return image_id
    if not text.strip():
        raise ImageRefError(f"empty image id: pass an image id ({ID_PREFIX}...); {_WHERE}")
    raise ImageRefError(
        f"{show(text)} is not an image id, and this argument takes ids only: {ID_SHAPE}; {_WHERE}"
    )


def split_refs(text: str) -> list[str]:
    """The pieces of one string that may hold several references, split at commas, semicolons and white space,
    in order, none empty. Ids hold none of those characters; paths and data: URIs may, so a caller that also
    takes those splits only when every piece `looks_like_image_ref`."""
    return [piece for piece in _SEPARATORS.split(text) if piece]


def split_image_refs(text: str) -> list[str]:
    """The ids of one string of ids (`"img_a, image://img_b"`), in order: each piece read by
    `require_image_id`. Raises ImageRefError naming the first piece that is not an id."""
    return [require_image_id(piece) for piece in split_refs(text)]


def _id_from_uri(ref: str) -> str:
    rest = ref[len(SCHEME) :]
    if rest.endswith(_META) and is_image_id(rest[: -len(_META)]):
        image_id = rest[: -len(_META)]
        raise ImageRefError(
            f"{show(ref)} is the metadata resource, not an image: pass {SCHEME}{image_id} or {image_id}"
        )
    if is_image_id(rest):
        return rest
    if rest.lower().startswith(ID_PREFIX):
        raise ImageRefError(_bad_id(ref, rest, bare=False))
    raise ImageRefError(_bad_uri(ref))


def _bad_id(ref: str, id_part: str, *, bare: bool) -> str:
    case = "" if id_part.startswith(ID_PREFIX) else f" ({ID_PREFIX} in lower case)"
    file = "; if it is a file, give its absolute path" if bare else ""  # a file without an extension
    return f"{show(ref)} is not a valid image id: {ID_SHAPE}{case}; {_WHERE}{file}"


def _bad_uri(ref: str) -> str:
    return (
        f"{show(ref)} is not a valid image URI: use {SCHEME}{ID_PREFIX}... with the id from a previous result "
        "(list_images shows the stored ids)"
    )
