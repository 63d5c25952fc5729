"""The argument types of the benchmark scripts reject bad values before a run starts."""

import argparse

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

    with pytest.raises(argparse.ArgumentTypeError, match="is a file, not a folder"):
        output_file(str(tmp_path / "notes.txt" / "results.json"))


def test_output_file_rejects_folder_that_takes_no_files():
    # Linux's /proc takes no new files, not even from root.
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write"):
        output_file("/proc/results.json")


def test_output_file_creates_missing_folders(tmp_path):
    output_file(str(tmp_path / "new" / "results.json"))

    assert (tmp_path / "new").is_dir()


def test_output_file_leaves_no_file_behind(tmp_path):
    output_file(str(tmp_path / "results.json"))

    assert list(tmp_path.iterdir()) == []
