"""Server faults behind the device API: JSON errors, and polls that survive a failing deadline check."""

import logging

from federation.api import views
from federation.services import rounds


def fail(*args, **kwargs):
    raise RuntimeError("simulated fault")


def test_unhandled_error_returns_json_500(running, monkeypatch, caplog):
    _, nodes = running
    nodes[0].client.raise_request_exception = False
    monkeypatch.setattr(views, "describe_task", fail)

    with caplog.at_level(logging.ERROR, logger="federation.api.errors"):
        response = nodes[0].request("GET", "/api/v1/task")

    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert response.json()["code"] == "internal_error"
    assert "simulated fault" not in response.content.decode()
    assert any("unhandled error view=TaskView" in record.getMessage() for record in caplog.records)


def test_unknown_model_version_stays_404(running):
    _, nodes = running

    response = nodes[0].request("GET", "/api/v1/models/999/weights")

    assert response.status_code == 404
    assert response.json()["code"] != "internal_error"


def test_poll_survives_failing_deadline_check(running, monkeypatch, caplog):
    _, nodes = running
    monkeypatch.setattr(rounds, "close_expired_rounds", fail)

    with caplog.at_level(logging.ERROR, logger="federation.services.rounds"):
        response = nodes[0].request("GET", "/api/v1/task")

    assert response.status_code == 200
    assert response.json()["status"] == "train"
    assert any("deadline check from a device poll failed" in record.getMessage() for record in caplog.records)
