"""Argument types shared by the benchmark scripts, which reject bad values before any timing starts."""

import argparse
import math
import os
from pathlib import Path


def positive_count(text: str) -> int:
    """Parse a whole number of at least 1, also written as a float such as 1e6, for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a whole number of at least 1, such as 100 or 1e6") from None
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a whole number of at least 1, such as 100 or 1e6")
    return int(value)


def positive_number(text: str) -> float:
    """Parse a finite number above 0, such as 8 or 0.5, for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: expected a finite number above 0, such as 8 or 0.5") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: expected a finite number above 0, such as 8 or 0.5")
    return value


def output_file(text: str) -> Path:
    """Parse the path of a results file for argparse, and reject a path that cannot be written before the run instead of after it.

    Creates nothing: the scripts create missing parent directories when they write the file.
    """
    path = Path(text)
    try:
        if path.exists():
            if path.is_dir():
                raise argparse.ArgumentTypeError(f"{text!r} is a directory: expected the path of a JSON file")
            if not os.access(path, os.W_OK):
                raise argparse.ArgumentTypeError(f"cannot write {text!r}: the file is read-only; choose another file or make it writable")
            return path
        existing = next(directory for directory in path.absolute().parents if directory.exists())
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot check {text!r}: {error.strerror or error}; choose a file in a directory you can read") from None
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(existing)!r} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: the directory {str(existing)!r} is not writable; choose a file in a writable directory")
    return path
