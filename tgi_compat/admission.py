"""Admission control: TGI's non-blocking concurrency permit (router/src/infer/mod.rs).

A generation takes a permit with ``try_acquire`` before validation and holds it until
the generation (or the stream) ends. There is no waiting: over the cap the request is
answered ``overloaded`` at once so the client can back off. With several API processes
(``--api-server-count``) they take permits from one counter in shared memory, under one
lock (``SharedConcurrencyLimiter``): the cap holds over all of them, exactly.
"""

from __future__ import annotations

from tgi_compat.errors import OverloadedError


class ConcurrencyLimiter:
    """Counts generations in flight; single event loop, so no lock is needed."""

    __slots__ = ("limit", "in_use")

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0

    def try_acquire(self, n: int = 1) -> Permit:
        if self.in_use + n > self.limit:
            raise OverloadedError()
        self.in_use += n
        return Permit(self, n)

    def give_back(self, n: int) -> None:
        self.in_use -= n


class SharedConcurrencyLimiter:
    """``ConcurrencyLimiter`` over a counter shared by API processes: a spawn-context
    ``multiprocessing.Value('q')`` (with its lock) the supervisor created. A permit is
    taken or given back in one locked step (about a microsecond), all of a request's
    permits at once (best_of, n)."""

    __slots__ = ("limit", "_counter", "_lock")

    def __init__(self, limit: int, counter):
        self.limit = limit
        self._counter = counter
        self._lock = counter.get_lock()

    @property
    def in_use(self) -> int:
        return self._counter.value

    def try_acquire(self, n: int = 1) -> Permit:
        with self._lock:
            if self._counter.value + n > self.limit:
                raise OverloadedError()
            self._counter.value += n
        return Permit(self, n)

    def give_back(self, n: int) -> None:
        with self._lock:
            self._counter.value -= n


class Permit:
    """Released exactly once, however many times ``release`` is called."""

    __slots__ = ("_limiter", "_n")

    def __init__(self, limiter: ConcurrencyLimiter | SharedConcurrencyLimiter, n: int):
        self._limiter = limiter
        self._n = n

    def release(self) -> None:
        if self._n:
            self._limiter.give_back(self._n)
            self._n = 0

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
