"""The privacy report: contents against the ledger, PDF text, CSV and JSON round trips, hostile names, periods."""

import csv
import hashlib
import io
import json
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pypdfium2
import pytest
from django.core.management import call_command
from django.test import override_settings
from pypdf import PdfReader

from federation.models import AuditEntry, ModelUpdate, ModelVersion, Node, TrainingRound
from federation.services.federations import start_federation
from privacy.models import FederationPrivacyLedgerEntry, PrivacyBudget, PrivacyLedgerEntry
from privacy.reports.csv_tables import report_tables
from privacy.reports.pdf import render_pdf
from privacy.services.report_exports import export_privacy_report
from privacy.services.report_periods import ReportPeriod, parse_period
from privacy.services.reports import build_report
from tests.conftest import DP_PLAN, enrol, make_federation
from tests.report_fixtures import (
    HOSTILE_NAME,
    HOSTILE_ORGANISATION,
    HOSTILE_PURPOSE,
    PSEUDONYM_KEY,
    build_record_level_federation,
    expected_pseudonym,
)
from tests.test_central_rounds import make_central_federation, run_round

WHOLE = ReportPeriod(start=None, end=None)
ARTIFACT_DIR = Path(__file__).resolve().parent.parent / "test-artifacts"


def pdf_text(content: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(content)).pages)


def pdf_lines(content: bytes) -> list[str]:
    """Lines as laid out on the page, so the cells of a table row share a line; runs of spaces become one."""
    pages = PdfReader(io.BytesIO(content)).pages
    lines = "\n".join(page.extract_text(extraction_mode="layout") for page in pages).splitlines()
    return [" ".join(line.split()) for line in lines if line.strip()]


def read_csv(content: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(content.decode("utf-8-sig"), newline="")))


@pytest.fixture
def record_level(transactional_db):
    return build_record_level_federation()


def test_ledger_rows_match_database(record_level):
    document = build_report(record_level, WHOLE, pseudonym_key=PSEUDONYM_KEY)

    expected = [
        (entry.round.number, expected_pseudonym(entry.node_id), entry.noise_multiplier, entry.sampling_rate, entry.steps, entry.delta, entry.epsilon_after)
        for entry in PrivacyLedgerEntry.objects.order_by("created_at", "id")
    ]
    rows = [
        (row["round"], row["node"], row["noise_multiplier"], row["sampling_rate"], row["steps"], row["delta"], row["epsilon_after"])
        for row in document["ledger"]["record_level"]
    ]
    assert rows == expected
    assert len(rows) == 6


def test_node_rows_match_budgets(record_level):
    document = build_report(record_level, WHOLE, pseudonym_key=PSEUDONYM_KEY)

    by_node = {row["node"]: row for row in document["nodes"]}
    for budget in PrivacyBudget.objects.select_related("node"):
        row = by_node[expected_pseudonym(budget.node_id)]
        assert row["epsilon_spent_now"] == budget.epsilon_spent
        assert row["epsilon_at_period_end"] == budget.epsilon_spent
        assert row["epsilon_allocated"] == budget.epsilon_allocated
        assert row["participations_in_period"] == PrivacyLedgerEntry.objects.filter(node=budget.node).count()
        assert row["budget_exhausted"] is True
    assert {row["status"] for row in by_node.values()} == {"active", "quarantined"}


def test_summaries_count_rejections_quarantines_and_exhaustion(record_level):
    document = build_report(record_level, WHOLE, pseudonym_key=PSEUDONYM_KEY)

    aggregation = document["aggregation"]
    rejected = ModelUpdate.objects.get(status=ModelUpdate.Status.REJECTED)
    assert aggregation["rejections_by_reason"] == [{"reason": rejected.rejection_reason, "count": 1}]
    assert aggregation["updates_received"] == ModelUpdate.objects.count() == 6
    assert [event["action"] for event in aggregation["quarantine_events"]] == ["node.quarantined", "node.reinstated", "node.quarantined"]
    quarantined = Node.objects.get(status=Node.Status.QUARANTINED)
    assert aggregation["nodes_quarantined_now"] == [{"node": expected_pseudonym(quarantined.id), "status_reason": quarantined.status_reason}]
    [personal] = document["budgets"]["by_sensitivity_class"]
    assert (personal["nodes"], personal["nodes_exhausted"]) == (3, 3)
    scopes = sorted(event["scope"] for event in document["budgets"]["exhaustion_events"])
    assert scopes == ["federation", "node", "node", "node"]
    assert [row["accepted"] for row in document["rounds"]] == [3, 2]
    assert [row["rejected"] for row in document["rounds"]] == [0, 1]
    assert [row["version"] for row in document["model_versions"]] == list(ModelVersion.objects.order_by("version").values_list("version", flat=True))


def test_report_states_processing_and_guarantees(record_level):
    document = build_report(record_level, WHOLE)

    assert document["schema_version"] == "1.0"
    assert document["parties"]["organisation"] == HOSTILE_ORGANISATION
    assert document["processing"]["purpose"] == HOSTILE_PURPOSE
    assert document["processing"]["legal_basis"] == "public_task"
    assert document["processing"]["raw_data_leaves_devices"] is False
    assert document["differential_privacy"]["modes"] == ["record_level_local_dp_sgd"]
    record_level_dp = document["differential_privacy"]["record_level"]
    assert (record_level_dp["noise_multiplier"], record_level_dp["sampling_rate"], record_level_dp["local_steps"]) == (2.0, 0.2, 5)
    assert record_level_dp["accountant"] == "rdp"
    assert document["differential_privacy"]["delta"] == 1e-5
    assert document["secure_aggregation"] == {"used": False, "statement": "not used: the server receives each device's individual model update"}
    assert document["retention"]["update_retention_days"] == 30
    assert any("AES-256-GCM" in measure for measure in document["security_measures"])


def test_report_holds_no_node_id_or_display_name(record_level):
    document = build_report(record_level, WHOLE)

    text = json.dumps(document, ensure_ascii=False)
    for node in Node.objects.all():
        assert str(node.id) not in text
        assert node.id.hex not in text
        assert node.display_name not in text


def test_pseudonyms_differ_between_reports(record_level):
    first = build_report(record_level, WHOLE)
    second = build_report(record_level, WHOLE)

    assert {row["node"] for row in first["nodes"]}.isdisjoint({row["node"] for row in second["nodes"]})


def test_json_digest_covers_document_without_integrity(record_level):
    exported = export_privacy_report(record_level, report_format="json", period=WHOLE)

    document = json.loads(exported.content)
    unsigned = {key: value for key, value in document.items() if key != "integrity"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert document["integrity"]["json_sha256"] == hashlib.sha256(canonical).hexdigest() == exported.json_sha256
    assert document["federation"]["name"] == HOSTILE_NAME


def test_export_is_audited_with_actor_and_format(record_level, django_user_model):
    officer = django_user_model.objects.create_user("officer", password="x" * 16)

    exported = export_privacy_report(record_level, report_format="pdf", period=parse_period("2020-01-01", None), actor=officer)

    entry = AuditEntry.objects.get(action="privacy_report.exported")
    assert entry.actor_label == "officer"
    assert entry.details["format"] == "pdf"
    assert entry.details["json_sha256"] == exported.json_sha256
    assert entry.details["period_start"] == "2020-01-01T00:00:00+00:00"
    assert entry.details["bytes"] == len(exported.content)


def test_pdf_text_matches_ledger(record_level):
    content = render_pdf(build_report(record_level, WHOLE, pseudonym_key=PSEUDONYM_KEY))

    lines = pdf_lines(content)
    for entry in PrivacyLedgerEntry.objects.select_related("round"):
        pseudonym = expected_pseudonym(entry.node_id)
        epsilon = f"{entry.epsilon_after:.6f}"
        assert any(line.startswith(f"{entry.round.number} {pseudonym} personal 2.000000 0.200000 5 1.000000e-05 {epsilon}") for line in lines), epsilon
    for budget in PrivacyBudget.objects.all():
        pseudonym = expected_pseudonym(budget.node_id)
        participations = PrivacyLedgerEntry.objects.filter(node_id=budget.node_id).count()
        assert any(line.startswith(pseudonym) and f"{budget.epsilon_allocated:.6f} {budget.epsilon_spent:.6f} {participations}" in line for line in lines)
    for training_round in TrainingRound.objects.all():
        accepted = training_round.updates.filter(status="accepted").count()
        rejected = training_round.updates.filter(status="rejected").count()
        assert any(line.startswith(f"{training_round.number} closed") and f" {training_round.selected_nodes.count()} {accepted} {rejected} " in line for line in lines)


def test_pdf_text_keeps_hostile_names(record_level):
    content = render_pdf(build_report(record_level, WHOLE))

    text = pdf_text(content)
    for fragment in ('=HYPERLINK("http://127.0.0.1/x","click"), "quoted"', "שלום", "مرحبا", "Привет", "Zürich", '"Ost"', "@cmd|' /C calc'!A0"):
        assert fragment in text, fragment
    assert "public task (GDPR Art. 6(1)(e))".lower() in text.lower()
    assert "not used" in text


def test_pdf_page_renders_to_png(record_level, tmp_path):
    content = render_pdf(build_report(record_level, WHOLE))

    pdf = pypdfium2.PdfDocument(content)
    paths = []
    for index in range(2):
        image = pdf[index].render(scale=1.5).to_pil()
        path = tmp_path / f"privacy-report-page-{index + 1}.png"
        image.save(path)
        paths.append(path)
        # A rendered page has text and plots, so it is not one flat colour.
        assert len(image.convert("L").getcolors(maxcolors=65536) or []) > 10
    ARTIFACT_DIR.mkdir(exist_ok=True)
    for path in paths:
        (ARTIFACT_DIR / path.name).write_bytes(path.read_bytes())
    assert len(pdf) >= 3


def test_csv_tables_round_trip(record_level):
    document = build_report(record_level, WHOLE, pseudonym_key=PSEUDONYM_KEY)

    tables = report_tables(document)

    ledger = read_csv(tables["ledger_record_level.csv"])
    header = ledger[0]
    assert header[:2] == ["round", "node"]
    entries = list(PrivacyLedgerEntry.objects.order_by("created_at", "id").select_related("round"))
    assert len(ledger) == len(entries) + 1
    for row, entry in zip(ledger[1:], entries, strict=True):
        record = dict(zip(header, row, strict=True))
        assert int(record["round"]) == entry.round.number
        assert record["node"] == expected_pseudonym(entry.node_id)
        assert float(record["epsilon_after"]) == entry.epsilon_after
        assert float(record["delta"]) == entry.delta
    nodes = read_csv(tables["nodes.csv"])
    spent = {row[0]: float(row[nodes[0].index("epsilon_spent_now")]) for row in nodes[1:]}
    assert spent == {expected_pseudonym(budget.node_id): budget.epsilon_spent for budget in PrivacyBudget.objects.all()}


def test_csv_cells_with_formula_prefixes_are_inert(record_level):
    tables = report_tables(build_report(record_level, WHOLE))

    summary = dict(read_csv(tables["summary.csv"])[1:])
    assert summary["federation.name"] == "'" + HOSTILE_NAME
    assert summary["parties.organisation"] == "'" + HOSTILE_ORGANISATION
    assert summary["parties.controller.name"] == "'-Clinic Trust"
    assert summary["processing.purpose"] == "'" + HOSTILE_PURPOSE
    assert summary["parties.controller.contact"] == "dpo@clinic.example\nPostfach 12"
    for name, content in tables.items():
        for row in read_csv(content):
            for cell in row:
                assert not cell.startswith(("=", "+", "@", "\t", "\r")), (name, cell)
                assert not cell.startswith("-") or float(cell) < 0, (name, cell)


def test_csv_zip_export_holds_every_table(record_level):
    exported = export_privacy_report(record_level, report_format="csv", period=WHOLE)

    with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
        names = set(archive.namelist())
        summary = dict(read_csv(archive.read("summary.csv"))[1:])
    assert {"summary.csv", "ledger_record_level.csv", "ledger_central.csv", "nodes.csv", "audit_log.csv"} <= names
    assert summary["integrity.json_sha256"] == exported.json_sha256


def test_central_report_matches_federation_ledger(transactional_db):
    federation = make_central_federation(max_rounds=3)
    nodes = enrol(federation, 2)
    start_federation(federation)
    for number in (1, 2):
        run_round(federation, nodes, number)

    document = build_report(federation, WHOLE)
    content = render_pdf(document)

    entries = list(FederationPrivacyLedgerEntry.objects.order_by("round__number"))
    assert [(row["round"], row["epsilon_after"], row["noise_multiplier"]) for row in document["ledger"]["central"]] == [
        (entry.round.number, entry.epsilon_after, entry.noise_multiplier) for entry in entries
    ]
    assert document["differential_privacy"]["modes"] == ["user_level_central_dp_fedavg"]
    lines = pdf_lines(content)
    for entry in entries:
        expected = f"{entry.round.number} {entry.noise_multiplier:.6f} {entry.sampling_rate:.6f} 1 1.000000e-05 pld {entry.epsilon_after:.6f}"
        assert expected in lines


@override_settings(TIME_ZONE="Asia/Shanghai")
def test_date_range_follows_configured_time_zone(transactional_db):
    federation = make_federation(plan=DP_PLAN, round_size=1, min_updates=1, node_epsilon_budget=50.0, max_rounds=2)
    [node] = enrol(federation, 1)
    start_federation(federation)
    for number in (1, 2):
        assert node.submit(round_number=number, model_version=number - 1).status_code == 202
    first, second = PrivacyLedgerEntry.objects.order_by("round__number")
    # 23:59 and 00:01 in Shanghai (UTC+8) on either side of local midnight between 9 and 10 March.
    PrivacyLedgerEntry.objects.filter(id=first.id).update(created_at=datetime(2026, 3, 9, 15, 59, tzinfo=UTC))
    PrivacyLedgerEntry.objects.filter(id=second.id).update(created_at=datetime(2026, 3, 9, 16, 1, tzinfo=UTC))

    tenth = build_report(federation, parse_period("2026-03-10", "2026-03-10"))
    ninth = build_report(federation, parse_period("2026-03-09", "2026-03-09"))

    assert [row["round"] for row in tenth["ledger"]["record_level"]] == [2]
    assert [row["round"] for row in ninth["ledger"]["record_level"]] == [1]
    assert tenth["report"]["period"]["start"] == "2026-03-10T00:00:00+08:00"
    assert tenth["report"]["period"]["end_exclusive"] == "2026-03-11T00:00:00+08:00"
    [node_row] = ninth["nodes"]
    assert node_row["epsilon_at_period_end"] == first.epsilon_after


@override_settings(TIME_ZONE="Asia/Shanghai")
def test_command_reads_dates_in_configured_time_zone(transactional_db, tmp_path):
    federation = make_federation(plan=DP_PLAN, round_size=1, min_updates=1, node_epsilon_budget=50.0, max_rounds=2)
    [node] = enrol(federation, 1)
    start_federation(federation)
    for number in (1, 2):
        assert node.submit(round_number=number, model_version=number - 1).status_code == 202
    first, second = PrivacyLedgerEntry.objects.order_by("round__number")
    PrivacyLedgerEntry.objects.filter(id=first.id).update(created_at=datetime(2026, 3, 9, 15, 59, tzinfo=UTC))
    PrivacyLedgerEntry.objects.filter(id=second.id).update(created_at=datetime(2026, 3, 9, 16, 1, tzinfo=UTC))
    output = tmp_path / "report.json"

    call_command("export_privacy_report", federation=federation.id, report_format="json", output=str(output), start="2026-03-10", end="2026-03-10")

    document = json.loads(output.read_text(encoding="utf-8"))
    assert [row["epsilon_after"] for row in document["ledger"]["record_level"]] == [second.epsilon_after]
    assert document["report"]["time_zone"] == "Asia/Shanghai"
    assert document["report"]["generated_at_local"].endswith("+08:00")


def test_command_writes_csv_directory(record_level, tmp_path):
    call_command("export_privacy_report", federation=record_level.id, report_format="csv", output=str(tmp_path))

    ledger = read_csv((tmp_path / "ledger_record_level.csv").read_bytes())
    assert len(ledger) == PrivacyLedgerEntry.objects.count() + 1
    assert AuditEntry.objects.get(action="privacy_report.exported").actor_label == "manage.py export_privacy_report"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"start": "2026-13-01"}, "is not a date"),
        ({"start": "2026-03-10", "end": "2026-03-09"}, "before it starts"),
        ({"operator": "nobody"}, "does not exist"),
    ],
)
def test_command_rejects_bad_options(record_level, tmp_path, options, message):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match=message):
        call_command("export_privacy_report", federation=record_level.id, report_format="json", output=str(tmp_path / "r.json"), **options)
    assert not AuditEntry.objects.filter(action="privacy_report.exported").exists()
