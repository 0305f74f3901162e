"""Whether autotuned kernels may time their configs now (no Triton import: preparation uses it).

The self-check runs each prepared layer once at one row to verify its layout; the small-M
kernels that path takes read the layout the same way in every config, so timing all of them
there only spends preparation time on shapes sampling may never run at one row (on the H100
that tuning was most of fp8's 6.8 s preparation with the self-check). Inside `untuned()`,
autotuned launches run their first config; tuning happens on a shape's first real call.
"""
from __future__ import annotations

import contextlib
import contextvars

_UNTUNED = contextvars.ContextVar("nvfp4_untuned", default=False)


def tuning_allowed() -> bool:
    return not _UNTUNED.get()


@contextlib.contextmanager
def untuned():
    token = _UNTUNED.set(True)
    try:
        yield
    finally:
        _UNTUNED.reset(token)
