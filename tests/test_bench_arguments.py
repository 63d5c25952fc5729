"""The argument types of the benchmark scripts reject bad values before a run starts."""

import argparse

import pytest

from bench.arguments import output_file, positive_count, positive_number


@pytest.mark.parametrize(("text", "expected"), [("1", 1), ("100", 100), ("1e6", 1_000_000), ("2.0", 2)])
def test_positive_count_accepts_whole_numbers(text, expected):
    assert positive_count(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "abc", "nan", "inf", ""])
def test_positive_count_rejects_other_values(text):
    with pytest.raises(argparse.ArgumentTypeError):
        positive_count(text)


@pytest.mark.parametrize(("text", "expected"), [("8", 8.0), ("0.5", 0.5), ("1e-3", 0.001)])
def test_positive_number_accepts_finite_positive_values(text, expected):
    assert positive_number(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "-inf", "abc", ""])
def test_positive_number_rejects_other_values(text):
    with pytest.raises(argparse.ArgumentTypeError):
        positive_number(text)


def test_output_file_rejects_directory(tmp_path):
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        output_file(str(tmp_path))


def test_output_file_accepts_new_file(tmp_path):
    assert output_file(str(tmp_path / "results.json")) == tmp_path / "results.json"
