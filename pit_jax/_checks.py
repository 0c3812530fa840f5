"""Trace-time argument checks shared by the public functions (Python or numpy scalars alike)."""
from __future__ import annotations

import numbers


def is_int(v) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_positive_int(v) -> bool:
    return is_int(v) and v >= 1


def is_positive_real(v) -> bool:
    """A Python or numpy real number > 0, not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0
