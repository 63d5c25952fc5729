"""The argument types of the benchmark scripts reject bad values before a run starts."""

import argparse
import os

import pytest

from bench.arguments import output_file, positive_count, positive_number

VALID = [
    (positive_count, "1", 1),
    (positive_count, "100", 100),
    (positive_count, "1e6", 1_000_000),
    (positive_count, "2.0", 2),
    (positive_number, "8", 8.0),
    (positive_number, "0.5", 0.5),
    (positive_number, "1e-3", 0.001),
]
INVALID = [(positive_count, text) for text in ("0", "-3", "1.5", "abc", "nan", "inf", "")] + [
    (positive_number, text) for text in ("0", "-1", "nan", "inf", "-inf", "abc", "")
]


@pytest.mark.parametrize(("parse", "text", "expected"), VALID)
def test_argument_type_accepts_valid_value(parse, text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(("parse", "text"), INVALID)
def test_argument_type_rejects_invalid_value(parse, text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


def test_output_file_rejects_directory(tmp_path):
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        output_file(str(tmp_path))


def test_output_file_accepts_new_file(tmp_path):
    assert output_file(str(tmp_path / "results.json")) == tmp_path / "results.json"


def test_output_file_rejects_path_under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")

    with pytest.raises(argparse.ArgumentTypeError, match="is a file, not a directory"):
        output_file(str(tmp_path / "notes.txt" / "results.json"))


def test_output_file_rejects_directory_without_write_access(tmp_path, monkeypatch):
    # The tests may run as root, whom file modes do not stop, so the access check itself returns False.
    monkeypatch.setattr(os, "access", lambda path, mode: False)

    with pytest.raises(argparse.ArgumentTypeError, match="is not writable"):
        output_file(str(tmp_path / "results.json"))


def test_output_file_rejects_read_only_file(tmp_path, monkeypatch):
    (tmp_path / "results.json").write_text("{}")
    monkeypatch.setattr(os, "access", lambda path, mode: False)

    with pytest.raises(argparse.ArgumentTypeError, match="read-only"):
        output_file(str(tmp_path / "results.json"))


def test_output_file_accepts_existing_writable_file(tmp_path):
    (tmp_path / "results.json").write_text("{}")

    assert output_file(str(tmp_path / "results.json")) == tmp_path / "results.json"


def test_output_file_accepts_missing_directories_and_creates_none(tmp_path):
    assert output_file(str(tmp_path / "new" / "sub" / "results.json")) == tmp_path / "new" / "sub" / "results.json"
    assert list(tmp_path.iterdir()) == []
