"""Write a federation's privacy report to a file from the shell."""

from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from federation.models import Federation
from privacy.exceptions import InvalidReportFormat, InvalidReportPeriod
from privacy.services.report_exports import REPORT_FORMATS, export_privacy_report
from privacy.services.report_periods import parse_period


class Command(BaseCommand):
    help = (
        "Write a federation's privacy report as PDF, JSON or CSV. With --format csv, OUTPUT is a zip archive of all tables, "
        "unless OUTPUT is an existing directory, which then receives one .csv file per table. Dates are read in the "
        "configured time zone (FLO_TIME_ZONE); --end includes its whole day. The export is recorded in the audit log."
    )

    def add_arguments(self, parser):
        parser.add_argument("--federation", type=int, required=True, help="federation id")
        parser.add_argument("--format", dest="report_format", required=True, choices=REPORT_FORMATS, help="output format")
        parser.add_argument("--output", required=True, help="file to write, or with --format csv an existing directory for one file per table")
        parser.add_argument("--start", help="first day (YYYY-MM-DD) or ISO 8601 time of the period; default: the federation's first record")
        parser.add_argument("--end", help="last day (YYYY-MM-DD, included) or ISO 8601 time (excluded); default: now")
        parser.add_argument("--operator", help="username recorded in the audit log as the exporter")

    def handle(self, *args, federation: int, report_format: str, output: str, start: str | None, end: str | None, operator: str | None, **options):
        target = Federation.objects.filter(id=federation).first()
        if target is None:
            raise CommandError(f"Federation {federation} does not exist.")
        actor = None
        if operator is not None:
            actor = get_user_model().objects.filter(username=operator).first()
            if actor is None:
                raise CommandError(f"User {operator!r} does not exist.")
        output_path = Path(output)
        if output_path.is_dir() and report_format != "csv":
            raise CommandError(f"{output} is a directory; --format {report_format} writes one file, so name the file.")
        if not output_path.is_dir() and not output_path.parent.is_dir():
            # Checked before exporting, because the export writes its audit entry.
            raise CommandError(f"The folder {output_path.parent} does not exist; create it or choose another --output.")
        try:
            exported = export_privacy_report(target, report_format=report_format, period=parse_period(start, end), actor=actor, actor_label="manage.py export_privacy_report")
        except (InvalidReportFormat, InvalidReportPeriod) as error:
            raise CommandError(error.detail) from error

        if report_format == "csv" and output_path.is_dir():
            for name, content in exported.tables.items():
                (output_path / name).write_bytes(content)
            written = f"{len(exported.tables)} tables in {output_path}"
        else:
            output_path.write_bytes(exported.content)
            written = str(output_path)
        self.stdout.write(f"Wrote {written} (SHA-256 of the JSON form {exported.json_sha256}).")
