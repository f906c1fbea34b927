"""The concurrency limiter on its own (the cap over sockets: tests/socket/test_admission.py)."""

from __future__ import annotations

import pytest

from tgi_compat.admission import ConcurrencyLimiter
from tgi_compat.errors import OverloadedError


def test_limiter_unit():
    limiter = ConcurrencyLimiter(2)
    a = limiter.try_acquire()
    b = limiter.try_acquire()
    with pytest.raises(OverloadedError):
        limiter.try_acquire()
    a.release()
    a.release()  # idempotent
    assert limiter.in_use == 1
    with pytest.raises(OverloadedError):
        limiter.try_acquire(2)
    b.release()
    assert limiter.in_use == 0
