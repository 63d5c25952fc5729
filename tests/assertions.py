"""Assertions shared by the API tests: error shape and unchanged stored state."""

from collections.abc import Callable

from federation.models import (
    EnrolmentToken,
    ModelUpdate,
    ModelVersion,
    Node,
    Reputation,
    TrainingRound,
)
from privacy.models import PrivacyBudget, PrivacyLedgerEntry


def snapshot_stored_state() -> dict:
    """Return every stored row a rejected update or signed request must leave unchanged."""
    return {
        "model_updates": list(ModelUpdate.objects.order_by("id").values_list("id", "round_id", "node_id", "num_examples", "payload_sha256", "status")),
        "model_versions": list(ModelVersion.objects.order_by("id").values_list("id", "federation_id", "version", "weights_sha256")),
        "training_rounds": list(TrainingRound.objects.order_by("id").values_list("id", "number", "state", "result_version_id")),
        "privacy_ledger": list(PrivacyLedgerEntry.objects.order_by("id").values_list("id", "node_id", "round_id", "epsilon_after")),
        "privacy_budgets": list(PrivacyBudget.objects.order_by("id").values_list("node_id", "epsilon_spent")),
        "reputations": list(Reputation.objects.order_by("id").values_list("node_id", "score", "accepted_count", "rejected_count")),
    }


def snapshot_enrolment_state() -> dict:
    """Return every stored row a rejected enrolment must leave unchanged."""
    return {
        "nodes": list(Node.objects.order_by("id").values_list("id", "display_name", "status")),
        "reputations": list(Reputation.objects.order_by("id").values_list("node_id", flat=True)),
        "privacy_budgets": list(PrivacyBudget.objects.order_by("id").values_list("node_id", flat=True)),
        "tokens": list(EnrolmentToken.objects.order_by("id").values_list("id", "used_at", "node_id")),
    }


def assert_state_unchanged(before: dict, snapshot: Callable[[], dict] = snapshot_stored_state) -> None:
    after = snapshot()
    for table, rows in before.items():
        assert after[table] == rows, f"{table} changed after a rejected request"


def assert_error(response, *, status: int, code: str) -> dict:
    """Check an error response: status, exact code and a detail sentence. Returns the body."""
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str)
    assert len(body["detail"].split()) >= 3, f"detail is not a sentence: {body['detail']!r}"
    return body
