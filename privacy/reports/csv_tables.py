"""CSV tables of a privacy report, safe to open in a spreadsheet.

A cell that starts with = + - @, a tab or a carriage return is read as a
formula by Excel, LibreOffice and Google Sheets (OWASP "CSV Injection").
Such text cells get a leading single quote; numbers are written as numbers,
so a negative epsilon stays a number.
"""

import csv
import io
import json
import re
import zipfile
from collections.abc import Iterable
from typing import Any

# Characters that make a spreadsheet evaluate a cell, with their full-width
# forms, which some spreadsheets normalise to the ASCII ones.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
# A text cell that is only a decimal number (such as "-3" or "-1.5e-3") is data, not a formula.
PLAIN_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
# UTF-8 with a byte-order mark, so spreadsheets detect UTF-8 and show non-Latin text intact.
CSV_ENCODING = "utf-8-sig"

# (table name, path of the row list in the document, columns)
TABLES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("rounds", ("rounds",), ("round", "state", "opened_at", "closed_at", "selected", "accepted", "rejected", "result_version", "record_level_entries", "central_epsilon_after")),
    (
        "ledger_record_level",
        ("ledger", "record_level"),
        ("round", "node", "sensitivity_class", "mechanism", "noise_multiplier", "sampling_rate", "steps", "delta", "epsilon_after", "created_at"),
    ),
    ("ledger_central", ("ledger", "central"), ("round", "mechanism", "noise_multiplier", "sampling_rate", "steps", "delta", "accountant", "epsilon_after", "created_at")),
    (
        "nodes",
        ("nodes",),
        (
            "node",
            "sensitivity_class",
            "status",
            "epsilon_allocated",
            "epsilon_at_period_start",
            "epsilon_at_period_end",
            "epsilon_spent_now",
            "participations_in_period",
            "updates_accepted",
            "updates_rejected",
            "budget_exhausted",
        ),
    ),
    ("budgets_by_class", ("budgets", "by_sensitivity_class"), ("sensitivity_class", "epsilon_allocated", "nodes", "nodes_exhausted", "max_epsilon_spent")),
    ("exhaustion_events", ("budgets", "exhaustion_events"), ("at", "scope", "node", "detail")),
    ("rejections", ("aggregation", "rejections_by_reason"), ("reason", "count")),
    ("quarantines", ("aggregation", "quarantine_events"), ("at", "action", "node", "round", "score", "threshold", "reason", "actor")),
    ("model_versions", ("model_versions",), ("version", "created_at", "num_updates", "total_examples", "weights_sha256")),
    ("audit_log", ("audit_log", "entries"), ("at", "actor", "action", "target", "details")),
)


def safe_cell(value: Any) -> Any:
    """Return a value a spreadsheet shows as data: numbers unchanged, formula-like text quoted, nested values as JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return value
    if isinstance(value, dict | list):
        value = json.dumps(value, ensure_ascii=False, sort_keys=True)
    text = str(value)
    if text.startswith(FORMULA_PREFIXES) and not PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def write_csv(columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> bytes:
    """Write one table as CSV (RFC 4180 quoting, CRLF line ends) in UTF-8 with a byte-order mark."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow([safe_cell(column) for column in columns])
    for row in rows:
        writer.writerow([safe_cell(cell) for cell in row])
    return buffer.getvalue().encode(CSV_ENCODING)


def report_tables(document: dict[str, Any]) -> dict[str, bytes]:
    """Return every table of a report as CSV bytes, keyed by file name; "summary.csv" lists the scalar facts."""
    tables = {"summary.csv": write_csv(("field", "value"), _summary_rows(document))}
    for name, path, columns in TABLES:
        rows = _lookup(document, path)
        tables[f"{name}.csv"] = write_csv(columns, ([row.get(column) for column in columns] for row in rows))
    return tables


def write_zip(tables: dict[str, bytes]) -> bytes:
    """Pack CSV tables into one zip archive."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in tables.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _lookup(document: dict[str, Any], path: tuple[str, ...]) -> list[dict[str, Any]]:
    value: Any = document
    for key in path:
        value = (value or {}).get(key)
    return value or []


def _summary_rows(document: dict[str, Any]) -> list[tuple[str, Any]]:
    """Flatten every member that is not a table into (dotted name, value) rows."""
    table_paths = {path for _, path, _ in TABLES}
    rows: list[tuple[str, Any]] = []

    def visit(value: Any, path: tuple[str, ...]) -> None:
        if path in table_paths:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                visit(item, (*path, key))
        elif isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
            for index, item in enumerate(value):
                visit(item, (*path, str(index)))
        elif isinstance(value, list):
            rows.append((".".join(path), "; ".join(str(item) for item in value)))
        else:
            rows.append((".".join(path), value))

    visit(document, ())
    return rows
