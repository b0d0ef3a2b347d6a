"""Leases: pins that hold across every process (and, next, every front-end) on one store, kept in the catalog.

Invariant: an image with an unexpired lease is never evicted, whichever process evicts. The catalog picks its
victims among unleased rows inside the transaction that deletes them, and a lease is written in a transaction of
its own, so the two are ordered: a lease committed first protects the image; one that comes second and requires
the image finds it gone (UnknownImageError) before the call has spent anything on it. Deleting an image on purpose
(`ImageStore.delete`) ignores leases: a call whose input was removed so still stores its pictures, with the
parent's id in their lineage (`ImageStore.put` accepts parents that are gone).

A lease is a row (image_id, holder, expires_at) (`Catalog.take_leases`, `records.LeaseRow`). `holder` is one
lease's random token (a call, or one `pinned` block), so two leases of one process on one image are counted
separately; `expires_at` is wall-clock Unix time. The holder renews its rows every `LEASE_RENEW_S` while it lives
(`Renewer`, one thread per open store) and deletes them when it ends, however it ends. A process that dies holding
leases stops renewing; once its rows have expired, eviction ignores them, and the next release or open on the
store deletes them. A lease may name an id that is not stored yet (an input stored only when the call succeeds, a
picture about to be stored): the row waits and protects the image from the moment it is stored.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Renewer:
    """One daemon thread per open store that calls `renew()` every `interval_s` seconds while `start` has been
    called and `stop` has not. A failed renewal is logged and retried at the next tick: the expiry leaves room
    for several (rules/limits.py, LEASE_TTL_S)."""

    def __init__(self, renew: Callable[[], None], interval_s: float) -> None:
        self._renew = renew
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the thread, once (later calls do nothing)."""
        with self._lock:
            if self._thread is None and not self._stopped.is_set():
                self._thread = threading.Thread(target=self._run, name="klein-store-leases", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for a renewal in progress to end."""
        with self._lock:
            self._stopped.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self._renew()
            except Exception as exc:  # a busy or full disk now; the lease has time left for the next tick
                if self._stopped.is_set():
                    return
                log.warning("image store: could not renew the leases of running calls (retrying): %s", exc)
