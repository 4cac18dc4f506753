"""Argument checks shared by the library and the command line."""

import math
import numbers


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}.")
    return value


def positive_float(name, value):
    """Returns `value` as a float, or raises if it is not a positive number."""
    value = _number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be positive; got {value}.")
    return value


def finite_float(name, value):
    """Returns `value` as a float, or raises if it is not finite."""
    return _number(name, value)


def float_in_range(name, value, low, high):
    """Returns `value` as a float in `[low, high)`, or raises."""
    value = _number(name, value)
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}); got {value}.")
    return value


def positive_int(name, value):
    """Returns `value` as an int, or raises if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name} must be positive; got {value}.")
    return int(value)


def one_of(name, value, allowed):
    """Returns `value` if it is in `allowed`, or raises naming the choices."""
    if value not in allowed:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, allowed))}; "
            f"got {value!r}."
        )
    return value
