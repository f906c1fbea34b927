"""Admission control: TGI's non-blocking concurrency permit (router/src/infer/mod.rs).

A generation takes a permit with ``try_acquire`` before validation and holds it until
the generation (or the stream) ends. There is no waiting: over the cap the request is
answered ``overloaded`` at once so the client can back off.
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


class Permit:
    """Released exactly once, however many times ``release`` is called."""

    __slots__ = ("_limiter", "_n")

    def __init__(self, limiter: ConcurrencyLimiter, n: int):
        self._limiter = limiter
        self._n = n

    def release(self) -> None:
        if self._n:
            self._limiter.in_use -= self._n
            self._n = 0

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
