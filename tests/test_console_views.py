"""Console pages and actions through Django's test client: roles, forms, services and audit entries."""

import pytest
from django.test import Client

from federation.models import AuditEntry, EnrolmentToken, Federation, Node
from federation.services.federations import start_federation
from flo_site.roles import COMPLIANCE_OFFICER, OPERATOR
from privacy.services.central import calibrate_central_noise, federation_epsilon
from tests.conftest import enrol, make_federation
from tests.console_personas import make_user

FORM = {
    "name": "clinics",
    "model_kind": "softmax_regression",
    "num_features": 2,
    "num_classes": 2,
    "learning_rate": 0.1,
    "batch_size": 4,
    "local_epochs": 1,
    "round_size": 3,
    "min_updates": 2,
    "round_deadline_seconds": 600,
    "max_rounds": 10,
    "aggregation_rule": "fedavg",
    "privacy_mode": "none",
    "dp_delta": 1e-5,
    "accountant": "pld",
}
CENTRAL = {"privacy_mode": "central", "target_epsilon": 4.0, "participation_rate": 0.5, "central_clip_norm": 0.5}


def client_for(user) -> Client:
    client = Client(REMOTE_ADDR="10.0.0.7")
    client.force_login(user)
    return client


@pytest.fixture
def operator(transactional_db):
    return client_for(make_user("olivia", OPERATOR))


@pytest.fixture
def compliance(transactional_db):
    return client_for(make_user("carl", COMPLIANCE_OFFICER))


@pytest.fixture
def fleet(transactional_db):
    federation = make_federation(min_updates=2)
    nodes = enrol(federation, 3)
    return federation, [signed.node for signed in nodes]


def read_paths(federation) -> list[str]:
    return [
        "/console/",
        f"/console/federations/{federation.id}/",
        f"/console/federations/{federation.id}/snapshot",
        f"/console/federations/{federation.id}/nodes/",
        f"/console/federations/{federation.id}/ledger/",
        "/console/audit/",
    ]


def test_pages_send_anonymous_users_to_login(fleet):
    federation, _ = fleet

    for path in read_paths(federation):
        response = Client().get(path)

        assert response.status_code == 302, path
        assert response["Location"].startswith("/console/login/?next=")


def test_pages_reject_users_without_role(fleet):
    federation, _ = fleet
    client = client_for(make_user("nobody", None))

    for path in read_paths(federation):
        assert client.get(path).status_code == 403, path


def test_compliance_officer_reads_every_page_without_buttons(fleet, compliance):
    federation, _ = fleet
    start_federation(federation)

    for path in read_paths(federation):
        response = compliance.get(path)

        assert response.status_code == 200, path
        assert b"data-action=" not in response.content, path
    assert compliance.get(f"/console/federations/{federation.id}/rounds/1/").status_code == 200


def test_compliance_officer_posts_are_forbidden(fleet, compliance):
    federation, nodes = fleet
    posts = [
        ("/console/federations/new/", FORM),
        (f"/console/federations/{federation.id}/actions/start/", {}),
        (f"/console/federations/{federation.id}/tokens/", {"count": 1, "ttl_seconds": 3600, "sensitivity_class": "personal"}),
        (f"/console/federations/{federation.id}/nodes/{nodes[0].id}/quarantine/", {}),
        (f"/console/federations/{federation.id}/nodes/{nodes[0].id}/revoke/", {}),
    ]

    for path, data in posts:
        assert compliance.post(path, data).status_code == 403, path

    federation.refresh_from_db()
    nodes[0].refresh_from_db()
    assert federation.status == Federation.Status.DRAFT
    assert nodes[0].status == Node.Status.ACTIVE
    assert not Federation.objects.filter(name="clinics").exists()
    assert EnrolmentToken.objects.filter(federation=federation).count() == 3


def test_operator_creates_federation_with_audit(operator):
    response = operator.post("/console/federations/new/", {**FORM, "action": "create"})

    federation = Federation.objects.get(name="clinics")
    assert response.status_code == 302
    assert response["Location"] == f"/console/federations/{federation.id}/"
    assert federation.status == Federation.Status.DRAFT
    entry = AuditEntry.objects.get(action="federation.created")
    assert entry.actor_label == "olivia"
    assert entry.remote_addr == "10.0.0.7"


def test_create_shows_service_error(operator):
    response = operator.post("/console/federations/new/", {**FORM, "min_updates": 5, "action": "create"})

    assert response.status_code == 200
    assert b"min_updates (5) cannot exceed round_size (3)." in response.content
    assert not Federation.objects.exists()


def test_central_dp_is_previewed_before_saving(operator):
    data = {**FORM, **CENTRAL, "action": "create"}
    expected = calibrate_central_noise(target_epsilon=4.0, delta=1e-5, participation_rate=0.5, rounds=10, accountant="pld")

    preview = operator.post("/console/federations/new/", data)

    assert preview.status_code == 200
    assert not Federation.objects.exists()
    assert preview.context["preview"]["noise_multiplier"] == pytest.approx(expected)
    assert f"{expected:.4f}".encode() in preview.content

    created = operator.post("/console/federations/new/", {**data, "previewed": preview.context["preview"]["key"]})

    assert created.status_code == 302
    assert Federation.objects.get(name="clinics").central_noise_multiplier == pytest.approx(expected)


def test_changed_target_after_preview_previews_again(operator):
    data = {**FORM, **CENTRAL, "action": "create"}
    key = operator.post("/console/federations/new/", data).context["preview"]["key"]

    response = operator.post("/console/federations/new/", {**data, "target_epsilon": 8.0, "previewed": key})

    assert response.status_code == 200
    assert response.context["preview"]["target_epsilon"] == 8.0
    assert not Federation.objects.exists()


def test_central_preview_rejects_impossible_target(operator):
    response = operator.post("/console/federations/new/", {**FORM, **CENTRAL, "participation_rate": 2.0, "action": "preview"})

    assert response.status_code == 200
    assert response.context["preview"] is None
    assert response.context["form"].non_field_errors()
    assert not Federation.objects.exists()


def test_operator_runs_lifecycle_with_audit(fleet, operator):
    federation, _ = fleet
    base = f"/console/federations/{federation.id}/actions"

    for action, status in [("start", "running"), ("pause", "paused"), ("resume", "running"), ("stop", "stopped")]:
        response = operator.post(f"{base}/{action}/")

        federation.refresh_from_db()
        assert response.status_code == 302
        assert federation.status == status, action
    actions = list(AuditEntry.objects.filter(actor_label="olivia").exclude(action__startswith="operator.").order_by("id").values_list("action", flat=True))
    assert actions == ["federation.started", "federation.paused", "federation.resumed", "federation.stopped"]
    assert federation.rounds.get(number=1).state == "failed"
    assert set(AuditEntry.objects.filter(actor_label="olivia").exclude(action__startswith="operator.").values_list("remote_addr", flat=True)) == {"10.0.0.7"}


def test_invalid_transition_shows_message(fleet, operator):
    federation, _ = fleet

    response = operator.post(f"/console/federations/{federation.id}/actions/pause/", follow=True)

    federation.refresh_from_db()
    assert federation.status == Federation.Status.DRAFT
    assert b"only a running federation can become paused" in response.content


def test_unknown_action_is_not_found(fleet, operator):
    federation, nodes = fleet

    assert operator.post(f"/console/federations/{federation.id}/actions/explode/").status_code == 404
    assert operator.post(f"/console/federations/{federation.id}/nodes/{nodes[0].id}/explode/").status_code == 400
    assert operator.get(f"/console/federations/{federation.id}/actions/start/").status_code == 405


def test_tokens_are_shown_once_and_stored_hashed(fleet, operator):
    federation, _ = fleet

    response = operator.post(f"/console/federations/{federation.id}/tokens/", {"count": 2, "ttl_seconds": 3600, "sensitivity_class": "personal"})

    tokens = response.context["tokens"]
    assert response.status_code == 200
    assert len(tokens) == 2
    assert "no-cache" in response["Cache-Control"]
    assert all(token.encode() in response.content for token in tokens)
    assert not EnrolmentToken.objects.filter(token_sha256__in=tokens).exists()
    entry = AuditEntry.objects.get(action="enrolment_tokens.issued", actor_label="olivia")
    assert entry.remote_addr == "10.0.0.7"


def test_tokens_reject_invalid_count(fleet, operator):
    federation, _ = fleet

    response = operator.post(f"/console/federations/{federation.id}/tokens/", {"count": 0, "ttl_seconds": 3600, "sensitivity_class": "personal"})

    assert response.status_code == 400
    assert response.context["tokens"] == []


def test_node_quarantine_reinstate_revoke(fleet, operator):
    federation, nodes = fleet
    node = nodes[0]
    base = f"/console/federations/{federation.id}/nodes/{node.id}"

    operator.post(f"{base}/quarantine/", {"reason": "odd updates"})
    node.refresh_from_db()
    assert node.status == Node.Status.QUARANTINED
    assert node.status_reason == "odd updates"

    operator.post(f"{base}/reinstate/", {"reason": "checked"})
    node.refresh_from_db()
    assert node.status == Node.Status.ACTIVE

    operator.post(f"{base}/revoke/")
    node.refresh_from_db()
    assert node.status == Node.Status.REVOKED

    response = operator.post(f"{base}/reinstate/", follow=True)
    assert b"only a quarantined node can be reinstated" in response.content
    actions = list(AuditEntry.objects.filter(actor_label="olivia").exclude(action__startswith="operator.").order_by("id").values_list("action", flat=True))
    assert actions == ["node.quarantined", "node.reinstated", "node.revoked"]


def test_node_of_other_federation_is_not_found(fleet, operator):
    federation, _ = fleet
    other = make_federation(name="other")
    stranger = enrol(other, 1)[0].node

    response = operator.post(f"/console/federations/{federation.id}/nodes/{stranger.id}/quarantine/")

    stranger.refresh_from_db()
    assert response.status_code == 404
    assert stranger.status == Node.Status.ACTIVE


def test_nodes_table_filters_and_sorts(fleet, operator):
    federation, nodes = fleet
    operator.post(f"/console/federations/{federation.id}/nodes/{nodes[1].id}/quarantine/")
    path = f"/console/federations/{federation.id}/nodes/"

    quarantined = operator.get(path, {"status": "quarantined"}).context["nodes"]
    by_name = operator.get(path, {"q": "device-2"}).context["nodes"]
    descending = operator.get(path, {"sort": "-name"}).context["nodes"]
    by_status = operator.get(path, {"sort": "status"}).context["nodes"]

    assert [node["display_name"] for node in quarantined] == ["device-1"]
    assert [node["display_name"] for node in by_name] == ["device-2"]
    assert [node["display_name"] for node in descending] == ["device-2", "device-1", "device-0"]
    assert [node["status"] for node in by_status] == ["active", "active", "quarantined"]


def test_snapshot_reports_round_progress(fleet, operator):
    federation, _ = fleet
    start_federation(federation)

    snapshot = operator.get(f"/console/federations/{federation.id}/snapshot").json()

    assert snapshot["federation"]["status"] == "running"
    assert snapshot["nodes"] == {"active": 3, "quarantined": 0, "revoked": 0, "selected": 3, "responding": 0}
    assert snapshot["current_round"]["number"] == 1
    assert snapshot["current_round"]["state"] == "open"
    assert 0 < snapshot["current_round"]["seconds_left"] <= 600
    assert snapshot["privacy"]["mode"] == "none"
    assert snapshot["accuracy_series"] == []
    assert snapshot["epsilon_series"] == []
    assert [(row["number"], row["state"]) for row in snapshot["recent_rounds"]] == [(1, "open")]


def test_missing_federation_is_not_found(operator):
    assert operator.get("/console/federations/999/").status_code == 404
    assert operator.get("/console/federations/999/snapshot").status_code == 404


def test_snapshot_reports_central_epsilon_from_ledger(operator):
    federation = make_federation(
        name="central", round_size=1, min_updates=1, max_rounds=5, central_dp={"target_epsilon": 4.0, "participation_rate": 1.0, "clip_norm": 1.0}
    )
    nodes = enrol(federation, 2)
    start_federation(federation)
    for signed in nodes:
        assert signed.submit(round_number=1).status_code == 202

    snapshot = operator.get(f"/console/federations/{federation.id}/snapshot").json()

    assert snapshot["privacy"]["mode"] == "central"
    assert snapshot["privacy"]["epsilon_spent"] == pytest.approx(federation_epsilon(federation))
    assert snapshot["privacy"]["epsilon_budget"] == 4.0
    assert [point["round"] for point in snapshot["epsilon_series"]] == [1]
    assert snapshot["epsilon_series"][0]["epsilon"] == pytest.approx(snapshot["privacy"]["epsilon_spent"])
