"""Checks of the JSON-supplied settings of aggregation rules and server optimizers.

Pure module: no numpy, no Django. Each check raises ValueError with a
message that names the setting and the rejected value.
"""

import math
import numbers
from collections.abc import Mapping, Sequence


def require_integer(name: str, value: object, *, minimum: int) -> int:
    """Check that `value` is an integer of at least `minimum` and return it as an int.

    Raises:
        ValueError: if `value` is not an integer (a bool is rejected), or is below `minimum`.
    """
    # bool is a subclass of int, so True would otherwise pass as 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
    return int(value)


def require_finite_real(name: str, value: object) -> float:
    """Check that `value` is a finite real number and return it as a float.

    Raises:
        ValueError: if `value` is not a real number (a bool is rejected), or is NaN or infinite.
    """
    # bool is a subclass of int, so True would otherwise pass as 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    return float(value)


def check_config_keys(data: object, *, label: str, allowed: Sequence[str]) -> None:
    """Check that a config's JSON form is a mapping with no keys outside `allowed`.

    Args:
        data: The decoded JSON value.
        label: Name of the config in messages, such as "Server optimizer config".
        allowed: The keys the config accepts.

    Raises:
        ValueError: if `data` is not a mapping, or has keys outside `allowed`, naming them.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{label} must be a mapping, got {type(data).__name__}.")
    unknown = sorted(str(key) for key in data if key not in allowed)
    if unknown:
        raise ValueError(f"{label} has unknown keys {unknown}. Allowed keys are {', '.join(allowed)}.")
