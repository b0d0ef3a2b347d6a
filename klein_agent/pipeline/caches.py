"""The pipeline's caches: prompt embeddings and encoded references, least recently used first out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
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


@dataclass(frozen=True)
class EncodedReference:
    """One reference picture as the transformer reads it: packed latent tokens and their latent grid."""

    tokens: Tensor  # [h*w, C] in the model dtype
    grid: tuple[int, int]  # latent (h, w)
