"""Pure report renderers: spreadsheet-safe CSV cells, pseudonyms, canonical JSON and number format."""

import csv
import hashlib
import hmac
import io
import math

import pytest

from privacy.reports.csv_tables import safe_cell, write_csv
from privacy.reports.integrity import canonical_json, report_digest, seal
from privacy.reports.pdf_layout import format_number, format_time
from privacy.reports.pseudonyms import Pseudonymizer

NODE_ID = "8b903689-12b3-4a69-b617-478adc0b430c"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=1+1", "'=1+1"),
        ("+SUM(A1)", "'+SUM(A1)"),
        ("-2+3", "'-2+3"),
        ("@cmd", "'@cmd"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("\uff1dHYPERLINK()", "'\uff1dHYPERLINK()"),
        ("-3", "-3"),
        ("-1.5e-3", "-1.5e-3"),
        ("a=b", "a=b"),
        ("", ""),
        (-1.5, -1.5),
        (0, 0),
        (True, "true"),
        (None, ""),
        ({"k": "=x"}, '{"k": "=x"}'),
    ],
)
def test_safe_cell(value, expected):
    assert safe_cell(value) == expected


def test_csv_round_trips_hostile_text_and_numbers():
    rows = [['He said "hi", then\nleft', -2.5, 7, "שלום مرحبا", "=cmd"], ["x,y", 1e-05, -3, "Привет", "-1"]]

    content = write_csv(["text", "number", "count", "name", "formula"], rows)

    assert content.startswith(b"\xef\xbb\xbf")
    parsed = list(csv.reader(io.StringIO(content.decode("utf-8-sig"), newline="")))
    assert parsed[1] == ['He said "hi", then\nleft', "-2.5", "7", "שלום مرحبا", "'=cmd"]
    assert parsed[2] == ["x,y", "1e-05", "-3", "Привет", "-1"]
    assert float(parsed[2][1]) == 1e-05


def test_pseudonym_is_keyed_hmac_sha256():
    key = b"\x01" * 32

    pseudonym = Pseudonymizer(key).pseudonym(NODE_ID)

    assert pseudonym == "node-" + hmac.new(key, NODE_ID.encode(), hashlib.sha256).hexdigest()[:16]
    assert Pseudonymizer(b"\x02" * 32).pseudonym(NODE_ID) != pseudonym


def test_scrub_replaces_node_ids():
    pseudonymizer = Pseudonymizer(b"\x01" * 32)
    value = {"target": f"node:{NODE_ID}", "nodes": {NODE_ID: {"score": 0.5}}, "display_name": "Alice's phone", "list": [NODE_ID.upper()]}

    scrubbed = pseudonymizer.scrub(value)

    pseudonym = pseudonymizer.pseudonym(NODE_ID)
    assert scrubbed == {"target": f"node:{pseudonym}", "nodes": {pseudonym: {"score": 0.5}}, "list": [pseudonym]}


def test_pseudonymizer_rejects_short_key():
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Pseudonymizer(b"short")


def test_digest_ignores_integrity_member_and_key_order():
    sealed = seal({"b": 1, "a": "ü"})

    assert sealed["integrity"]["json_sha256"] == hashlib.sha256('{"a":"ü","b":1}'.encode()).hexdigest()
    assert report_digest({"a": "ü", "b": 1}) == sealed["integrity"]["json_sha256"]
    assert report_digest(sealed) == sealed["integrity"]["json_sha256"]


def test_canonical_json_rejects_nan():
    with pytest.raises(ValueError):
        canonical_json({"epsilon": math.nan})


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.4072229, "1.407223"), (1e-05, "1.000000e-05"), (0.0, "0.000000"), (-2.5, "-2.500000"), (12, "12"), (None, "n/a"), (False, "no"), (2e6, "2.000000e+06")],
)
def test_format_number(value, expected):
    assert format_number(value) == expected


def test_format_time_cuts_to_seconds():
    assert format_time("2026-03-09T15:59:00.123456+00:00") == "2026-03-09 15:59:00"
    assert format_time(None) == "n/a"
