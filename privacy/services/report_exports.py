"""Exporting a federation's privacy report as JSON, CSV or PDF, with an audit entry per export."""

import logging
from dataclasses import dataclass

from django.db import transaction

from federation.models import Federation
from federation.services.audit import record_audit
from privacy.exceptions import InvalidReportFormat
from privacy.reports.csv_tables import report_tables, write_zip
from privacy.reports.integrity import render_json
from privacy.reports.pdf import render_pdf
from privacy.services.report_periods import ReportPeriod
from privacy.services.reports import build_report

logger = logging.getLogger(__name__)

REPORT_FORMATS = ("json", "csv", "pdf")
EXPORT_AUDIT_ACTION = "privacy_report.exported"


@dataclass(frozen=True)
class ExportedReport:
    content: bytes
    media_type: str
    filename: str
    json_sha256: str
    # CSV only: every table as its own file, keyed by file name.
    tables: dict[str, bytes] | None = None


def export_privacy_report(
    federation: Federation,
    *,
    report_format: str,
    period: ReportPeriod,
    table: str | None = None,
    actor=None,
    actor_label: str = "system",
    remote_addr: str | None = None,
) -> ExportedReport:
    """Build the report, render it and record who exported what.

    CSV is a zip archive of all tables, or one table when `table` names it
    (such as "ledger_record_level").

    Raises:
        InvalidReportFormat: for an unknown format or table.
    """
    if report_format not in REPORT_FORMATS:
        raise InvalidReportFormat(f"format={str(report_format)[:20]!r} is not one of {', '.join(REPORT_FORMATS)}.")
    if table is not None and report_format != "csv":
        raise InvalidReportFormat("table= selects one CSV table; use it with format=csv.")
    document = build_report(federation, period)
    digest = document["integrity"]["json_sha256"]
    stem = f"privacy-report-federation-{federation.id}-{document['report']['generated_at_utc'][:10]}"
    exported = _render(document, report_format, table, stem, digest)

    with transaction.atomic():
        record_audit(
            EXPORT_AUDIT_ACTION,
            federation=federation,
            actor=actor,
            actor_label=actor_label,
            target=f"federation:{federation.id}",
            details={
                "format": report_format,
                "table": table,
                "period_start": document["report"]["period"]["start"],
                "period_end_exclusive": document["report"]["period"]["end_exclusive"],
                "schema_version": document["schema_version"],
                "json_sha256": digest,
                "bytes": len(exported.content),
            },
            remote_addr=remote_addr,
        )
    logger.info("privacy report exported federation=%s format=%s bytes=%d sha256=%s", federation.id, report_format, len(exported.content), digest)
    return exported


def _render(document: dict, report_format: str, table: str | None, stem: str, digest: str) -> ExportedReport:
    if report_format == "json":
        return ExportedReport(render_json(document), "application/json", f"{stem}.json", digest)
    if report_format == "pdf":
        return ExportedReport(render_pdf(document), "application/pdf", f"{stem}.pdf", digest)
    tables = report_tables(document)
    if table is None:
        return ExportedReport(write_zip(tables), "application/zip", f"{stem}-csv.zip", digest, tables)
    name = f"{table}.csv"
    if name not in tables:
        names = ", ".join(sorted(key.removesuffix(".csv") for key in tables))
        raise InvalidReportFormat(f"table={table[:40]!r} is not a report table; choose one of {names}.")
    return ExportedReport(tables[name], "text/csv; charset=utf-8", f"{stem}-{table}.csv", digest, {name: tables[name]})
