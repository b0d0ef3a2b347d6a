"""The pipeline's caches: prompt embeddings, encoded references and (klein 9B-KV) the references' kept keys and
values, least recently used first out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from torch import Tensor

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A mapping of at most `capacity` entries that drops the least recently used first; not thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value stored under `key`, now the most recently used, or None."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: K, value: V) -> None:
        """Store `value` under `key` as the most recently used; drop the oldest entries over `capacity`."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class ByteLRUCache(Generic[K, V]):
    """A mapping holding at most `capacity_bytes` (as `size_of` counts them) that drops the least recently used
    first; a value larger than the whole capacity is not kept. Not thread-safe."""

    def __init__(self, capacity_bytes: int, size_of: Callable[[V], int]) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"a cache capacity cannot be negative, got {capacity_bytes} bytes")
        self.capacity_bytes = capacity_bytes
        self._size_of = size_of
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.nbytes = 0  # held now

    def get(self, key: K) -> V | None:
        """The value stored under `key`, now the most recently used, or None."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key][0]

    def put(self, key: K, value: V) -> bool:
        """Store `value` as the most recently used, dropping the oldest entries until it fits; False (and
        nothing dropped) when it alone exceeds the capacity."""
        size = self._size_of(value)
        if size > self.capacity_bytes:
            return False
        if key in self._items:
            self.nbytes -= self._items.pop(key)[1]
        while self._items and self.nbytes + size > self.capacity_bytes:
            self.nbytes -= self._items.popitem(last=False)[1][1]
        self._items[key] = (value, size)
        self.nbytes += size
        return True

    def clear(self) -> None:
        """Drop every entry."""
        self._items.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class EncodedReference:
    """One reference picture as the transformer reads it: packed latent tokens and their latent grid, and the
    key of its prepared pixels (content, size and mode)."""

    tokens: Tensor  # [h*w, C] in the model dtype
    grid: tuple[int, int]  # latent (h, w)
    key: str = ""
