"""Client load for integration tests: threads that stop when the test ends, however it ends."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def background(*targets: Callable[[threading.Event], None], join_s: float = 120.0) -> Iterator[threading.Event]:
    """Run each ``target(stop)`` in a daemon thread; on exit set ``stop`` and join them.

    The exit also runs when an assertion in the ``with`` block fails: a failed test once left its
    client threads looping after pytest's summary, and the interpreter waited for them until CI's
    time ran out. Daemon threads and a bounded join keep even a stuck client from holding the run.
    """
    stop = threading.Event()
    threads = [threading.Thread(target=t, args=(stop,), daemon=True, name=f"load-{i}") for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    try:
        yield stop
    finally:
        stop.set()
        for thread in threads:
            thread.join(join_s)
