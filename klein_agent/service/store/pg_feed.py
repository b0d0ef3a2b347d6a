"""`PostgresFeed`: the live feed of a PostgreSQL catalog (`Catalog.listen`), on a connection of its own.

The catalog runs `pg_notify(CHANNEL, image_id)` inside the transaction that inserts an image or records a verdict
on it, so a listener hears committed changes only, each once, in commit order.
"""

from __future__ import annotations

from typing import Any

import psycopg

from klein_agent.service.store.records import StoreError

CHANNEL = "klein_images"


class PostgresFeed:
    """The `Feed` of a PostgreSQL catalog: LISTEN klein_images on a dedicated autocommit connection."""

    def __init__(self, conn: psycopg.Connection[Any], scrub_text: Any) -> None:
        self._conn = conn
        self._scrub = scrub_text

    def wait(self, timeout_s: float) -> list[str]:
        """The ids notified since the last call, waiting up to `timeout_s` s for the first. Raises StoreError."""
        try:
            ids = [n.payload for n in self._conn.notifies(timeout=timeout_s, stop_after=1)]
            if ids:  # whatever else already arrived, without waiting again
                ids += [n.payload for n in self._conn.notifies(timeout=0.001)]
        except psycopg.Error as e:
            raise StoreError(f"The image feed was cut: {self._scrub(e)}. Open a new one.") from None
        return ids

    def close(self) -> None:
        """Close the listening connection. Idempotent."""
        self._conn.close()
