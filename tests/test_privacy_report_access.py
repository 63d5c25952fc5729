"""Who may export privacy reports: the API, the console page and the roles behind them."""

import pytest
from django.contrib.auth.models import Group
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from federation.models import AuditEntry, Federation
from flo_site.roles import ADMIN, COMPLIANCE_OFFICER, OPERATOR, ensure_groups
from tests.conftest import enrol, make_federation

PASSWORD = "correct-horse-battery-staple"


@pytest.fixture
def report_setup(transactional_db, django_user_model):
    """A federation and one user per role, plus a superuser without groups."""
    ensure_groups()
    federation = make_federation(name="clinics")
    users = {}
    for role in (ADMIN, OPERATOR, COMPLIANCE_OFFICER):
        user = django_user_model.objects.create_user(role, password=PASSWORD)
        user.groups.add(Group.objects.get(name=role))
        users[role] = user
    users["superuser"] = django_user_model.objects.create_superuser("root", password=PASSWORD)
    return federation, users


def api_path(federation: Federation, query: str = "format=json") -> str:
    return f"/api/v1/federations/{federation.id}/privacy-report?{query}"


@pytest.mark.parametrize("role", [COMPLIANCE_OFFICER, ADMIN, "superuser"])
def test_api_exports_report_for_allowed_roles(report_setup, role):
    federation, users = report_setup
    client = APIClient()
    client.force_authenticate(users[role])

    response = client.get(api_path(federation, "format=pdf"))

    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    assert response.content.startswith(b"%PDF-")
    assert len(response["X-FLO-Report-SHA256"]) == 64
    assert AuditEntry.objects.get(action="privacy_report.exported").actor_label == users[role].username


@pytest.mark.parametrize("report_format", ["pdf", "csv", "json"])
def test_api_refuses_operator_in_every_format(report_setup, report_format):
    federation, users = report_setup
    client = APIClient()
    client.force_authenticate(users[OPERATOR])

    response = client.get(api_path(federation, f"format={report_format}"))

    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"
    assert not AuditEntry.objects.filter(action="privacy_report.exported").exists()


def test_api_accepts_token_of_compliance_officer(report_setup):
    federation, users = report_setup
    token = Token.objects.create(user=users[COMPLIANCE_OFFICER])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")

    response = client.get(api_path(federation, "format=csv&table=nodes"))

    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response.content.decode("utf-8-sig").startswith("node,sensitivity_class")


def test_api_refuses_token_of_operator(report_setup):
    federation, users = report_setup
    token = Token.objects.create(user=users[OPERATOR])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")

    response = client.get(api_path(federation))

    assert response.status_code == 403


def test_api_asks_anonymous_caller_to_authenticate(report_setup):
    federation, _ = report_setup

    response = APIClient().get(api_path(federation))

    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"
    assert response["WWW-Authenticate"] == "Token"


def test_api_refuses_signed_device_request(report_setup):
    federation, _ = report_setup
    [device] = enrol(federation, 1)

    response = device.request("GET", api_path(federation))

    assert response.status_code == 401


def test_api_refuses_inactive_compliance_officer(report_setup):
    federation, users = report_setup
    users[COMPLIANCE_OFFICER].is_active = False
    users[COMPLIANCE_OFFICER].save()
    client = APIClient()
    client.force_authenticate(users[COMPLIANCE_OFFICER])

    response = client.get(api_path(federation))

    assert response.status_code == 403


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("format=docx", 400, "invalid_report_format"),
        ("format=json&table=nodes", 400, "invalid_report_format"),
        ("format=csv&table=passwords", 400, "invalid_report_format"),
        ("format=json&start=yesterday", 400, "invalid_report_period"),
        ("format=json&start=2026-03-10&end=2026-03-01", 400, "invalid_report_period"),
    ],
)
def test_api_rejects_invalid_parameters(report_setup, query, status, code):
    federation, users = report_setup
    client = APIClient()
    client.force_authenticate(users[COMPLIANCE_OFFICER])

    response = client.get(api_path(federation, query))

    assert response.status_code == status
    assert response.json()["code"] == code
    assert not AuditEntry.objects.filter(action="privacy_report.exported").exists()


def test_api_reports_unknown_federation(report_setup):
    _, users = report_setup
    client = APIClient()
    client.force_authenticate(users[COMPLIANCE_OFFICER])

    response = client.get("/api/v1/federations/999999/privacy-report?format=json")

    assert response.status_code == 404
    assert response.json()["code"] == "federation_not_found"


def test_console_page_and_download_for_compliance_officer(report_setup, client):
    federation, users = report_setup
    client.force_login(users[COMPLIANCE_OFFICER])

    page = client.get(f"/console/federations/{federation.id}/privacy-report")
    download = client.get(f"/console/federations/{federation.id}/privacy-report/download?format=csv&start=2026-01-01")

    assert page.status_code == 200
    assert f"/console/federations/{federation.id}/privacy-report/download?format=pdf" in page.content.decode()
    assert download.status_code == 200
    assert download["Content-Type"] == "application/zip"
    assert download["Content-Disposition"].startswith('attachment; filename="privacy-report-federation-')


def test_console_refuses_operator(report_setup, client):
    federation, users = report_setup
    client.force_login(users[OPERATOR])

    page = client.get(f"/console/federations/{federation.id}/privacy-report")
    download = client.get(f"/console/federations/{federation.id}/privacy-report/download?format=pdf")

    assert page.status_code == 403
    assert download.status_code == 403
    assert not AuditEntry.objects.filter(action="privacy_report.exported").exists()


def test_console_sends_anonymous_visitor_to_login(report_setup, client):
    federation, _ = report_setup

    response = client.get(f"/console/federations/{federation.id}/privacy-report/download?format=pdf")

    assert response.status_code == 302
    assert response["Location"].startswith("/console/login/?next=")


def test_console_login_page_signs_in(report_setup, client):
    federation, users = report_setup

    response = client.post("/accounts/login/", {"username": COMPLIANCE_OFFICER, "password": PASSWORD, "next": f"/console/federations/{federation.id}/privacy-report"})

    assert response.status_code == 302
    assert client.get(response["Location"]).status_code == 200


def test_console_shows_invalid_period(report_setup, client):
    federation, users = report_setup
    client.force_login(users[COMPLIANCE_OFFICER])

    response = client.get(f"/console/federations/{federation.id}/privacy-report/download?format=pdf&start=31.12.2026")

    assert response.status_code == 400
    assert "is not a date" in response.content.decode()
