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


class SteadyRequests:
    """Steady POSTs of ``body(i)`` to ``path`` from one thread (``with SteadyRequests(...) as load``),
    recording what callers see: ``seen`` holds (status or the exception's repr, x-model-version)."""

    def __init__(self, base_url: str, path: str, body: Callable[[int], dict], *, timeout_s: float = 60.0,
                 pause_s: float = 0.01) -> None:
        self.base_url, self.path, self.body, self.timeout_s, self.pause_s = base_url, path, body, timeout_s, pause_s
        self.stop, self.seen = threading.Event(), []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s) as client:
            i = 0
            while not self.stop.is_set():
                try:
                    r = client.post(self.path, json=self.body(i))
                    self.seen.append((r.status_code, r.headers.get("x-model-version")))
                except httpx.HTTPError as exc:
                    self.seen.append((repr(exc), None))
                i += 1
                self.stop.wait(self.pause_s)

    def failures(self) -> list:
        return [s for s in self.seen if s[0] != 200]

    def __enter__(self) -> "SteadyRequests":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(120)
