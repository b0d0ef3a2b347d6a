"""A safetensors file a user names (a LoRA adapter), read with bounds: the header first, every tensor on demand.

The format (huggingface/safetensors README): 8 bytes of little-endian length N, N bytes of UTF-8 JSON
`{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the data, which the
offsets (from the data's start) must index entirely, without holes or overlaps. Everything the header claims is
checked against the file's size before a byte of tensor data is read, so a header that declares more than the file
holds (or than the model could use: the caller checks shapes before it reads) costs nothing. Every refusal is a
`LoRAError` naming the file, the key and the fix.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from klein_agent.loading.errors import LoRAError

MAX_HEADER_BYTES = 100_000_000  # the safetensors spec's cap on N (the library refuses more too)
# A header is 3 levels deep ({key: {shape: [...]}}), a PEFT LoraConfig in the metadata about 4. Python's JSON parser
# recurses once per level; bounding the depth first means a 100k-deep file is refused, not a RecursionError.
MAX_JSON_DEPTH = 32

# safetensors dtype names -> torch dtypes (the itemsize comes from torch)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DAMAGED = "the file is damaged or not a safetensors file: download or export it again"
_MAGIC = {b"\x89PNG": "a PNG picture", b"PK\x03\x04": "a zip (a pickled .pt/.ckpt?)", b"GGUF": "a GGUF file"}


@dataclass(frozen=True)
class Entry:
    """One tensor as the header declares it; `begin`/`end` are byte offsets from the start of the data."""

    key: str
    dtype: str  # the safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int


def json_depth_within(text: str, limit: int) -> bool:
    """Whether the JSON `text` nests at most `limit` arrays/objects deep, found without recursion: strings are
    removed, then innermost brackets `limit` times (each pass a linear regex scan). Malformed text counts as within
    (the parser names it)."""
    rest = re.sub(r'"[^"\\]*(?:\\.[^"\\]*)*"', "", text)
    for _ in range(limit):
        rest, found = re.subn(r"[\[{][^\[\]{}]*[\]}]", "", rest)
        if not found:
            return True
    return not any(c in rest for c in "[{")


def parse_json(text: str, path: object, what: str, fix: str, key: str | None = None) -> Any:
    """`text` parsed as JSON with its depth bounded and duplicate object keys refused; raises LoRAError (naming
    `what`, e.g. "the header") otherwise."""
    if not json_depth_within(text, MAX_JSON_DEPTH):
        raise LoRAError(path, f"{what} nests deeper than {MAX_JSON_DEPTH} levels", fix, key)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise ValueError("a key is given twice")
        return result

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise LoRAError(path, f"{what} is not valid JSON ({exc})", fix, key) from None


class SafetensorsFile:
    """An open safetensors file: `entries` (key -> Entry) and `metadata` (str -> str) checked, data read by `read`.
    Use as a context manager. Raises LoRAError for a file that breaks the format."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file: io.BufferedReader = open(self.path, "rb")  # noqa: SIM115 (closed by __exit__)
        except OSError as exc:
            raise LoRAError(self.path, f"cannot open it ({exc.strerror})", "check the path") from None
        try:
            self.entries, self.metadata, self._data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._file.close()

    def _refuse(self, problem: str, key: str | None = None, fix: str = DAMAGED) -> LoRAError:
        return LoRAError(self.path, problem, fix, key)

    def _read_header(self) -> tuple[dict[str, Entry], dict[str, str], int]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        for magic, kind in _MAGIC.items():
            if head.startswith(magic):
                raise self._refuse(f"this is {kind}, not a safetensors file", fix="give a .safetensors LoRA")
        if len(head) < 8:
            raise self._refuse(f"the file is {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise self._refuse(f"the header declares {n} bytes, over the format's cap of {MAX_HEADER_BYTES}")
        if 8 + n > size:
            raise self._refuse(
                f"the header declares {n} bytes but only {size - 8} follow: the file is truncated"
            )
        try:
            text = self._file.read(n).decode("utf-8")
        except UnicodeDecodeError:
            raise self._refuse("the header is not UTF-8 text") from None
        header = parse_json(text, self.path, "the header", DAMAGED)
        if not isinstance(header, dict):
            raise self._refuse(f"the header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._refuse("the header's __metadata__ is not a map of strings", "__metadata__")
        entries = {key: self._entry(key, value) for key, value in header.items()}
        data_size = size - 8 - n
        at = 0  # the format allows no holes, overlaps or trailing bytes: a mismatch means a damaged file
        for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
            if entry.begin != at:
                raise self._refuse(f"its data starts at byte {entry.begin}, expected {at}", entry.key)
            at = entry.end
        if at != data_size:
            raise self._refuse(f"the tensors index {at} bytes of data but the file holds {data_size}")
        return entries, metadata, 8 + n

    def _entry(self, key: str, value: object) -> Entry:
        if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
            raise self._refuse("its header entry is not {dtype, shape, data_offsets}", key)
        dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._refuse(f"dtype {dtype!r} is not a safetensors dtype ({', '.join(DTYPES)})", key)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise self._refuse(f"shape {shape!r} is not a list of sizes", key)
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise self._refuse(f"data_offsets {offsets!r} are not [begin, end]", key)
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise self._refuse(
                f"shape {shape} of {dtype} takes {nbytes} bytes but its offsets span {offsets[1] - offsets[0]}",
                key,
            )
        return Entry(key, dtype, tuple(shape), offsets[0], offsets[1])

    def read(self, key: str) -> Tensor:
        """The tensor `key` (a fresh CPU tensor of its dtype and shape); only its own bytes are read. Raises
        LoRAError when the file changed under us (fewer bytes than the header promised)."""
        entry = self.entries[key]
        buffer = bytearray(entry.end - entry.begin)
        self._file.seek(self._data_start + entry.begin)
        if self._file.readinto(buffer) != len(buffer):
            raise self._refuse("the file ended inside its data (changed while being read?)", key)
        dtype = DTYPES[entry.dtype]
        if not buffer:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape)
