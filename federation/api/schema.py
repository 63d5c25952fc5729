"""OpenAPI description of the device API (drf-spectacular), with the catalogue of error codes.

Every error the API returns is JSON `{"code", "detail"}`. ERROR_CATALOGUE
lists each code with its HTTP status: the FloError subclasses of the
federation and privacy apps plus the codes that DRF's own errors get from
federation.api.errors. The schema carries the catalogue twice: as the enum
of the Error schema's `code` and as the top-level `x-error-codes` list of
`{code, status, description}`.
"""

from dataclasses import dataclass

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse

from federation import exceptions
from federation.queries import MAX_MODEL_VERSION
from flo_client import signing, wire
from privacy import exceptions as privacy_exceptions


@dataclass(frozen=True)
class ErrorCode:
    code: str
    status: int
    description: str


# Codes of DRF's own exceptions, as federation.api.errors reports them.
DRF_ERROR_CODES = [
    ErrorCode("invalid_request", 400, "A JSON endpoint got missing or invalid fields; `errors` lists them by field."),
    ErrorCode("parse_error", 400, "The body is not valid JSON."),
    ErrorCode("not_authenticated", 401, "An operator endpoint got no token or session; `WWW-Authenticate` names the scheme."),
    ErrorCode("permission_denied", 403, "The signed-in user's role may not use this operator endpoint."),
    ErrorCode("not_found", 404, "No endpoint at this path, or a path parameter of the wrong form."),
    ErrorCode("method_not_allowed", 405, "The endpoint does not accept this HTTP method; `Allow` lists the methods it does."),
    ErrorCode("not_acceptable", 406, "The Accept header rules out application/json."),
    ErrorCode("unsupported_media_type", 415, "The body's Content-Type is not the one the endpoint reads."),
    ErrorCode("throttled", 429, "Too many requests from this node (or, for enrolment, this address); retry after `Retry-After` seconds."),
]


def _flo_error_classes() -> list[type[exceptions.FloError]]:
    found, pending = [], [exceptions.FloError]
    while pending:
        error_class = pending.pop()
        found.append(error_class)
        pending.extend(error_class.__subclasses__())
    # Only classes of the two apps, so test doubles defined elsewhere stay out of the catalogue.
    modules = {exceptions.__name__, privacy_exceptions.__name__}
    return [error_class for error_class in found if error_class.__module__ in modules]


def build_error_catalogue() -> list[ErrorCode]:
    """Return every error code with its status, sorted by status then code, each code once."""
    catalogue = {entry.code: entry for entry in DRF_ERROR_CODES}
    for error_class in _flo_error_classes():
        description = error_class.__doc__.strip().splitlines()[0] if error_class.__doc__ else ""
        catalogue.setdefault(error_class.code, ErrorCode(error_class.code, error_class.status_code, description))
    return sorted(catalogue.values(), key=lambda entry: (entry.status, entry.code))


ERROR_CATALOGUE = build_error_catalogue()

ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "detail"],
    "properties": {
        "code": {"type": "string", "enum": [entry.code for entry in ERROR_CATALOGUE], "description": "Stable machine-readable reason; see x-error-codes."},
        "detail": {"type": "string", "description": "What was wrong and what to do, for people."},
        "errors": {"description": "invalid_request only: the invalid fields and why."},
        "server_time": {"type": "integer", "description": "invalid_timestamp and stale_timestamp: the server's Unix time, to correct the device clock."},
        "open_round": {"type": ["integer", "null"], "description": "round_not_open: the round that is open now."},
        "model_version": {"type": "integer", "description": "stale_model_version: the version the open round trains."},
    },
    "additionalProperties": True,
}


def error_response(*codes: str) -> OpenApiResponse:
    """Document one status of an endpoint's error responses, listing the codes it may carry."""
    return OpenApiResponse(response={"$ref": "#/components/schemas/Error"}, description="Error codes: " + ", ".join(f"`{code}`" for code in codes) + ".")


SIGNED_ERROR_RESPONSES = {
    401: error_response(
        "missing_signature_headers", "invalid_timestamp", "stale_timestamp", "invalid_nonce", "replayed_nonce", "unknown_node", "invalid_signature"
    ),
    403: error_response("node_revoked", "node_quarantined"),
    404: error_response("not_found"),
    413: error_response("payload_too_large"),
    429: error_response("throttled"),
    503: error_response("nonce_store_unavailable", "throttle_store_unavailable", "database_busy"),
}

MODEL_VERSION_PARAMETER = OpenApiParameter(
    "version", int, OpenApiParameter.PATH, description=f"Model version, 0 to {MAX_MODEL_VERSION}; version 0 is the initial model."
)

TASK_SCHEMA = {
    "type": "object",
    "required": ["status", "federation", "latest_model_version", "model_spec", "retry_after_seconds", "round"],
    "properties": {
        "status": {"type": "string", "enum": ["train", "wait", "done"]},
        "federation": {"type": "object"},
        "latest_model_version": {"type": ["integer", "null"]},
        "model_spec": {"type": "object"},
        "retry_after_seconds": {"type": "number"},
        "round": {"type": ["object", "null"]},
        "training_plan": {"type": "object", "description": "With status train: the plan, with this node's DP-SGD noise."},
        "weights_path": {"type": "string", "description": "With status train: where to download the round's model."},
    },
}

ENROLMENT_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["node_id", "secret", "federation_id", "signature_window_seconds", "server_time"],
    "properties": {
        "node_id": {"type": "string", "format": "uuid"},
        "secret": {"type": "string", "description": "The node's HMAC secret, URL-safe base64; returned only here."},
        "federation_id": {"type": "integer"},
        "signature_window_seconds": {"type": "integer"},
        "server_time": {"type": "integer"},
    },
}

UPDATE_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["status", "update_id", "round", "num_examples"],
    "properties": {
        "status": {"type": "string", "enum": ["accepted"]},
        "update_id": {"type": "integer"},
        "round": {"type": "integer"},
        "num_examples": {"type": "integer"},
    },
}

NODE_STATUS_SCHEMA = {
    "type": "object",
    "required": ["node_id", "display_name", "federation_id", "status", "updates_submitted"],
    "properties": {
        "node_id": {"type": "string", "format": "uuid"},
        "display_name": {"type": "string"},
        "federation_id": {"type": "integer"},
        "status": {"type": "string", "enum": ["active", "quarantined", "revoked"]},
        "status_reason": {"type": "string"},
        "last_seen_at": {"type": ["string", "null"]},
        "updates_submitted": {"type": "integer"},
        "last_update": {"type": ["object", "null"]},
        "reputation": {"type": ["number", "null"]},
        "reputation_detail": {"type": ["object", "null"]},
        "privacy_budget": {"type": ["object", "null"]},
    },
}

ROTATED_SECRET_SCHEMA = {
    "type": "object",
    "required": ["node_id", "secret", "previous_secret_valid_until"],
    "properties": {
        "node_id": {"type": "string", "format": "uuid"},
        "secret": {"type": "string", "description": "The new HMAC secret, URL-safe base64; returned only here."},
        "previous_secret_valid_until": {"type": ["string", "null"], "description": "When the old secret stops verifying (ISO 8601); null if it already has."},
    },
}

TENSOR_BODY_SCHEMA = {"type": "string", "format": "binary", "description": "Tensor wire format (flo_client/wire.py): FLOT, version, header length, JSON header, float32 data."}

ENROLMENT_RESPONSES = {
    201: OpenApiResponse(response=ENROLMENT_RESPONSE_SCHEMA, description="Enrolled; store the secret, it is not shown again."),
    400: error_response("invalid_request", "parse_error", "invalid_enrolment_token", "enrolment_token_expired"),
    404: error_response("not_found"),
    409: error_response("enrolment_token_used", "federation_full"),
    413: error_response("payload_too_large"),
    415: error_response("unsupported_media_type"),
    429: error_response("throttled"),
    503: error_response("throttle_store_unavailable", "database_busy"),
}

TASK_RESPONSES = {200: OpenApiResponse(response=TASK_SCHEMA, description="What the node should do now."), **SIGNED_ERROR_RESPONSES}

WEIGHTS_RESPONSES = {
    (200, wire.MEDIA_TYPE): OpenApiResponse(response={"type": "string", "format": "binary"}, description="The model version in the tensor wire format."),
    **SIGNED_ERROR_RESPONSES,
    404: error_response("model_version_not_found", "not_found"),
}

UPDATE_RESPONSES = {
    202: OpenApiResponse(response=UPDATE_RESPONSE_SCHEMA, description="Stored; the round aggregates it when it closes."),
    400: error_response("malformed_update", "invalid_update_field", "invalid_num_examples", "tensor_mismatch", "non_finite_values"),
    **SIGNED_ERROR_RESPONSES,
    403: error_response("node_revoked", "node_quarantined", "node_not_selected", "budget_exhausted"),
    409: error_response("round_not_open", "stale_model_version", "duplicate_update", "federation_not_running"),
    415: error_response("unsupported_media_type"),
}

NODE_STATUS_RESPONSES = {200: OpenApiResponse(response=NODE_STATUS_SCHEMA, description="The node's own status, reputation and budget."), **SIGNED_ERROR_RESPONSES}

SECRET_ROTATION_RESPONSES = {
    200: OpenApiResponse(response=ROTATED_SECRET_SCHEMA, description="Rotated; sign every later request with the new secret."),
    400: error_response("invalid_request", "parse_error", "invalid_secret_rotation"),
    **SIGNED_ERROR_RESPONSES,
    403: error_response("node_revoked", "node_quarantined", "previous_secret_used"),
    409: error_response("invalid_node_state"),
    415: error_response("unsupported_media_type"),
}


class NodeSignatureScheme(OpenApiAuthenticationExtension):
    """The four headers of a signed request, as API-key schemes that every signed operation needs together."""

    target_class = "federation.api.authentication.NodeSignatureAuthentication"
    name = ["FloNode", "FloTimestamp", "FloNonce", "FloSignature"]

    def get_security_definition(self, auto_schema):
        return [
            {"type": "apiKey", "in": "header", "name": signing.HEADER_NODE, "description": "Node id (UUID) returned at enrolment."},
            {"type": "apiKey", "in": "header", "name": signing.HEADER_TIMESTAMP, "description": "Whole Unix seconds."},
            {"type": "apiKey", "in": "header", "name": signing.HEADER_NONCE, "description": "16 to 64 characters from A-Z, a-z, 0-9, '-' and '_'; never reused."},
            {
                "type": "apiKey",
                "in": "header",
                "name": signing.HEADER_SIGNATURE,
                "description": "Lowercase hex HMAC-SHA256 under the node secret of "
                "FLO-HMAC-SHA256\\nMETHOD\\nPATH_WITH_QUERY\\nTIMESTAMP\\nNONCE\\nSHA256_HEX(BODY).",
            },
        ]

    def get_security_requirement(self, auto_schema):
        return {scheme_name: [] for scheme_name in self.name}


SCHEMA_DESCRIPTION = f"""Signed REST API through which devices enrol, fetch training tasks, download
models and submit updates.

Every request except enrolment carries the four {signing.SCHEME} headers.
Updates and model weights travel in the tensor wire format, media type
`{wire.MEDIA_TYPE}`. Every error is JSON `{{"code", "detail"}}`; `x-error-codes`
lists every code with its HTTP status."""


def add_error_catalogue(result, generator, request, public):
    """drf-spectacular postprocessing hook: add the Error schema and the x-error-codes catalogue."""
    result["info"]["description"] = SCHEMA_DESCRIPTION
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    result["x-error-codes"] = [{"code": entry.code, "status": entry.status, "description": entry.description} for entry in ERROR_CATALOGUE]
    return result
