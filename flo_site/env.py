"""Typed readers for environment variables, used by settings.py and by commands that read a secret.

Each reader rejects a malformed value at startup with a message that names
the variable, so a typo fails loudly instead of silently picking a default.
"""

import os
from pathlib import Path


class ConfigurationError(RuntimeError):
    """An environment variable contains a value FLO cannot use."""


def read_str(name: str, default: str | None = None) -> str | None:
    """Return the variable, or the contents of the file named by `<name>_FILE`."""
    file_path = os.environ.get(f"{name}_FILE")
    if file_path:
        try:
            return Path(file_path).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ConfigurationError(f"{name}_FILE={file_path!r} cannot be read: {error}") from error
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value


def read_bool(name: str, default: bool) -> bool:
    value = read_str(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"{name}={value!r} is not a boolean; use true or false.")


def read_int(name: str, default: int, *, minimum: int | None = None) -> int:
    value = read_str(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError as error:
        raise ConfigurationError(f"{name}={value!r} is not an integer.") from error
    if minimum is not None and number < minimum:
        raise ConfigurationError(f"{name}={number} is below the minimum {minimum}.")
    return number


def read_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = read_str(name, default)
    if value not in choices:
        raise ConfigurationError(f"{name}={value!r} is not one of {', '.join(choices)}.")
    return value


def read_list(name: str, default: list[str]) -> list[str]:
    value = read_str(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]
