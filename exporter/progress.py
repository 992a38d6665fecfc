"""The exporter's progress on stderr: one line per phase as it starts and ends, and a heartbeat while it runs."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastdiff.runtime.format import raise_if_stopped


def log(message: str) -> None:
    print(f"[fastdiff-export] {message}", file=sys.stderr, flush=True)


@contextmanager
def phase(message: str, heartbeat_s: float = 30.0) -> Iterator[None]:
    """Log a phase's start and duration on stderr, and how long it has run every `heartbeat_s` (compiles of large
    models take minutes)."""
    raise_if_stopped()
    log(f"{message} ...")
    start = time.perf_counter()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(heartbeat_s):
            log(f"{message}: {time.perf_counter() - start:.0f} s so far")

    ticker = threading.Thread(target=heartbeat, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
    raise_if_stopped()
    log(f"{message}: done in {time.perf_counter() - start:.1f} s")
