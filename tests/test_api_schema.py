"""The OpenAPI schema at /api/schema/: operations, media types and the error code catalogue."""

import pytest
from rest_framework.test import APIClient

from federation import exceptions
from federation.api.schema import ERROR_CATALOGUE
from flo_client import wire
from privacy import exceptions as privacy_exceptions


@pytest.fixture(scope="module")
def schema(django_db_blocker):
    with django_db_blocker.unblock():
        response = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return response.json()


def error_classes(module) -> list[type]:
    return [value for value in vars(module).values() if isinstance(value, type) and issubclass(value, exceptions.FloError) and value.__module__ == module.__name__]


def test_schema_lists_every_operation(schema):
    operations = {(path, method) for path, methods in schema["paths"].items() for method in methods}

    assert operations == {
        # Operators and compliance officers, with token or session authentication.
        ("/api/v1/federations/{federation_id}/privacy-report", "get"),
        # Devices, with signed requests.
        ("/api/v1/enrol", "post"),
        ("/api/v1/task", "get"),
        ("/api/v1/models/{version}/weights", "get"),
        ("/api/v1/updates", "post"),
        ("/api/v1/nodes/me", "get"),
        ("/api/v1/nodes/me/secret", "post"),
    }


@pytest.mark.parametrize("module", [exceptions, privacy_exceptions], ids=["federation", "privacy"])
def test_catalogue_has_every_error_code_with_status(schema, module):
    catalogue = {(entry["code"], entry["status"]) for entry in schema["x-error-codes"]}
    enum = set(schema["components"]["schemas"]["Error"]["properties"]["code"]["enum"])

    for error_class in error_classes(module):
        assert (error_class.code, error_class.status_code) in catalogue, error_class.__name__
        assert error_class.code in enum, error_class.__name__


def test_catalogue_codes_are_unique(schema):
    codes = [entry["code"] for entry in schema["x-error-codes"]]

    assert len(codes) == len(set(codes))
    assert len(codes) == len(ERROR_CATALOGUE)


def test_every_documented_error_code_is_in_catalogue(schema):
    catalogue = {entry["code"] for entry in schema["x-error-codes"]}

    for methods in schema["paths"].values():
        for operation in methods.values():
            for status, response in operation["responses"].items():
                if int(status) < 400:
                    continue
                documented = [part.strip(" `.") for part in response["description"].removeprefix("Error codes:").split(",")]
                assert set(documented) <= catalogue, (operation["operationId"], status)


def test_binary_bodies_use_tensor_media_type(schema):
    update_body = schema["paths"]["/api/v1/updates"]["post"]["requestBody"]["content"]
    weights = schema["paths"]["/api/v1/models/{version}/weights"]["get"]["responses"]["200"]["content"]

    assert list(update_body) == [wire.MEDIA_TYPE]
    assert update_body[wire.MEDIA_TYPE]["schema"]["format"] == "binary"
    assert list(weights) == [wire.MEDIA_TYPE]


def test_signed_operations_need_all_four_headers(schema):
    schemes = schema["components"]["securitySchemes"]

    assert {scheme.get("name") for scheme in schemes.values()} >= {"X-FLO-Node", "X-FLO-Timestamp", "X-FLO-Nonce", "X-FLO-Signature"}
    assert schema["paths"]["/api/v1/task"]["get"]["security"] == [{name: [] for name in ("FloNode", "FloTimestamp", "FloNonce", "FloSignature")}]
    assert "security" not in schema["paths"]["/api/v1/enrol"]["post"] or schema["paths"]["/api/v1/enrol"]["post"]["security"] in ([], [{}])
