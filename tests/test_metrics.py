"""GET /metrics: bearer-token protection and the metrics it serves."""

import pytest
from django.test import Client

from federation.services.federations import start_federation
from tests.conftest import enrol, make_federation

TOKEN = "scrape-token-for-tests"


@pytest.fixture
def metrics_token(settings):
    settings.FLO_METRICS_TOKEN = TOKEN
    return TOKEN


def scrape(token: str | None = TOKEN):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    return Client().get("/metrics", **headers)


def sample(body: str, name: str) -> float:
    for line in body.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric == name:
            return float(value)
    raise AssertionError(f"{name} not found in the metrics output")


def test_metrics_are_off_without_token(db, settings):
    settings.FLO_METRICS_TOKEN = None

    assert scrape().status_code == 404


def test_metrics_reject_missing_or_wrong_token(db, metrics_token):
    assert scrape(None).status_code == 403
    assert scrape("wrong").status_code == 403
    assert Client().get("/metrics", HTTP_AUTHORIZATION=TOKEN).status_code == 403


def test_metrics_count_rounds_updates_and_rejections(transactional_db, metrics_token):
    federation = make_federation(min_updates=2)
    nodes = enrol(federation, 3)
    start_federation(federation)
    before = scrape().content.decode()
    nodes[0].submit(round_number=1)
    nodes[0].submit(round_number=1)
    nodes[1].submit(round_number=1)

    response = scrape()

    body = response.content.decode()
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert sample(body, 'flo_rounds{state="closed"}') == 1
    assert sample(body, 'flo_rounds{state="open"}') == 1
    assert sample(body, 'flo_updates{status="accepted"}') == 2
    assert sample(body, 'flo_api_rejections_total{code="duplicate_update"}') - _or_zero(before, 'flo_api_rejections_total{code="duplicate_update"}') == 1
    assert sample(body, "flo_aggregation_duration_seconds_count") - _or_zero(before, "flo_aggregation_duration_seconds_count") == 1
    assert "flo_console_websocket_clients" in body


def _or_zero(body: str, name: str) -> float:
    try:
        return sample(body, name)
    except AssertionError:
        return 0.0
