"""Retention of device updates: payloads past the period are cleared, everything the reports need is kept."""

from datetime import timedelta

from django.utils import timezone

from federation.models import AuditEntry, ModelUpdate, ModelVersion, TrainingRound
from federation.services import update_store
from federation.services.federations import start_federation
from privacy.models import ComplianceProfile, PrivacyLedgerEntry
from privacy.services.report_periods import ReportPeriod
from privacy.services.reports import build_report
from privacy.services.retention import apply_update_retention
from privacy.tasks import apply_update_retention_task
from tests.conftest import DP_PLAN, enrol, make_federation


def run_two_rounds_and_open_third(name: str = "retention"):
    """A federation whose rounds 1 and 2 are closed and round 3 is open with one update; all updates are 40 days old."""
    federation = make_federation(name=name, plan=DP_PLAN, round_size=2, min_updates=2, node_epsilon_budget=50.0, max_rounds=5)
    nodes = enrol(federation, 2)
    start_federation(federation)
    for number in (1, 2):
        for node in nodes:
            assert node.submit(round_number=number, model_version=number - 1).status_code == 202
    assert nodes[0].submit(round_number=3, model_version=2).status_code == 202
    ModelUpdate.objects.filter(round__federation=federation).update(received_at=timezone.now() - timedelta(days=40))
    return federation


def test_clears_expired_payloads_of_settled_rounds_only(transactional_db):
    federation = run_two_rounds_and_open_third()
    ComplianceProfile.objects.create(federation=federation, update_retention_days=30)
    expired_files = [update_store.store_dir() / name for name in ModelUpdate.objects.filter(round__number__in=[1, 2]).values_list("payload_file", flat=True)]
    payload_bytes = sum(path.stat().st_size for path in expired_files)
    ledger_before = list(PrivacyLedgerEntry.objects.values_list("id", "epsilon_after"))
    versions_before = list(ModelVersion.objects.values_list("version", "weights_sha256"))

    cleared = apply_update_retention()

    assert cleared == {federation.id: 4}
    assert ModelUpdate.objects.count() == 5
    assert ModelUpdate.objects.filter(round__number__in=[1, 2], payload_file="").count() == 4
    assert not any(path.exists() for path in expired_files)
    open_update = ModelUpdate.objects.get(round__number=3)
    assert TrainingRound.objects.get(federation=federation, number=3).state == TrainingRound.State.OPEN
    assert (update_store.store_dir() / open_update.payload_file).stat().st_size == open_update.payload_bytes
    assert list(PrivacyLedgerEntry.objects.values_list("id", "epsilon_after")) == ledger_before
    assert list(ModelVersion.objects.values_list("version", "weights_sha256")) == versions_before
    entry = AuditEntry.objects.get(action="privacy.retention_applied")
    assert entry.details["updates_payload_cleared"] == 4
    assert entry.details["payload_bytes_cleared"] == payload_bytes
    assert entry.details["rounds"] == [1, 2]
    assert entry.details["retention_days"] == 30


def test_keeps_payloads_younger_than_retention_period(transactional_db):
    federation = run_two_rounds_and_open_third()
    ComplianceProfile.objects.create(federation=federation, update_retention_days=41)

    assert apply_update_retention() == {}
    assert not ModelUpdate.objects.filter(payload_file="").exists()
    assert not AuditEntry.objects.filter(action="privacy.retention_applied").exists()


def test_second_run_clears_nothing_and_records_nothing(transactional_db):
    federation = run_two_rounds_and_open_third()
    ComplianceProfile.objects.create(federation=federation, update_retention_days=30)
    apply_update_retention()

    result = apply_update_retention_task()

    assert result == {}
    assert AuditEntry.objects.filter(action="privacy.retention_applied").count() == 1


def test_skips_federation_without_retention_period(transactional_db):
    run_two_rounds_and_open_third()

    assert apply_update_retention() == {}
    assert not ModelUpdate.objects.filter(payload_file="").exists()


def test_report_counts_cleared_payloads_and_keeps_update_counts(transactional_db):
    federation = run_two_rounds_and_open_third()
    ComplianceProfile.objects.create(federation=federation, update_retention_days=30)
    apply_update_retention_task()

    document = build_report(federation, ReportPeriod(start=None, end=None))

    retention = document["retention"]
    assert (retention["updates_payload_cleared"], retention["updates_stored_with_payload"]) == (4, 1)
    assert retention["last_retention_run"]["updates_payload_cleared"] == 4
    assert [row["accepted"] for row in document["rounds"]] == [2, 2, 1]
    assert len(document["ledger"]["record_level"]) == 5
