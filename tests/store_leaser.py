"""Child process for the lease tests in test_store_leases.py: leases stored images, then waits to be killed.

Usage: python tests/store_leaser.py ROOT IMAGE_ID...

Prints "leased" once the lease is committed, then sleeps until it is killed (SIGKILL: no release, no close), so the
parent sees what a crashed server leaves behind: lease rows that nobody renews. Imports only the store and the
standard library.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's klein_agent

from klein_agent.service.store import ImageStore


def main() -> int:
    store = ImageStore(sys.argv[1])
    store.pinned(sys.argv[2:])  # held until the process dies
    sys.stdout.write("leased\n")
    sys.stdout.flush()
    while True:
        time.sleep(60)


if __name__ == "__main__":
    sys.exit(main())
