"""Domain errors of the federation app, each with a stable machine-readable code.

Services raise these; `federation.api.errors.handle_api_exception` turns
them into JSON responses `{"code": ..., "detail": ...}` with the status below.
Devices switch on `code`; `detail` is a sentence for people.
"""


class FloError(Exception):
    """Base class: an HTTP status, a stable snake_case code and a sentence."""

    status_code = 400
    code = "invalid_request"

    def __init__(self, detail: str, *, extra: dict | None = None):
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}


# --- Authentication (401) and authorisation (403) ---------------------------


class AuthenticationFailed(FloError):
    status_code = 401
    code = "authentication_failed"


class MissingSignatureHeaders(AuthenticationFailed):
    code = "missing_signature_headers"


class InvalidTimestamp(AuthenticationFailed):
    code = "invalid_timestamp"


class StaleTimestamp(AuthenticationFailed):
    code = "stale_timestamp"


class InvalidNonce(AuthenticationFailed):
    code = "invalid_nonce"


class ReplayedNonce(AuthenticationFailed):
    code = "replayed_nonce"


class UnknownNode(AuthenticationFailed):
    code = "unknown_node"


class InvalidSignature(AuthenticationFailed):
    code = "invalid_signature"


class NodeRevoked(FloError):
    status_code = 403
    code = "node_revoked"


class NodeQuarantined(FloError):
    status_code = 403
    code = "node_quarantined"


class NodeNotSelected(FloError):
    status_code = 403
    code = "node_not_selected"


class PreviousSecretUsed(FloError):
    """A request that only the current secret may sign was signed with the secret it replaced."""

    status_code = 403
    code = "previous_secret_used"


class InvalidSecretRotation(FloError):
    status_code = 400
    code = "invalid_secret_rotation"


# --- Enrolment ---------------------------------------------------------------


class InvalidEnrolmentToken(FloError):
    status_code = 400
    code = "invalid_enrolment_token"


class EnrolmentTokenExpired(FloError):
    status_code = 400
    code = "enrolment_token_expired"


class EnrolmentTokenUsed(FloError):
    status_code = 409
    code = "enrolment_token_used"


class FederationFull(FloError):
    """The federation already has max_nodes enrolled nodes that are not revoked."""

    status_code = 409
    code = "federation_full"


# --- Rounds and updates --------------------------------------------------------


class FederationNotRunning(FloError):
    status_code = 409
    code = "federation_not_running"


class RoundNotOpen(FloError):
    """The update names a round that is not the federation's open round (late or early)."""

    status_code = 409
    code = "round_not_open"


class StaleModelVersion(FloError):
    status_code = 409
    code = "stale_model_version"


class DuplicateUpdate(FloError):
    status_code = 409
    code = "duplicate_update"


class MalformedUpdate(FloError):
    status_code = 400
    code = "malformed_update"


class InvalidUpdateField(FloError):
    status_code = 400
    code = "invalid_update_field"


class InvalidNumExamples(FloError):
    status_code = 400
    code = "invalid_num_examples"


class TensorMismatch(FloError):
    status_code = 400
    code = "tensor_mismatch"


class NonFiniteValues(FloError):
    status_code = 400
    code = "non_finite_values"


class PayloadTooLarge(FloError):
    status_code = 413
    code = "payload_too_large"


class ModelVersionNotFound(FloError):
    status_code = 404
    code = "model_version_not_found"


class DatabaseBusy(FloError):
    status_code = 503
    code = "database_busy"


class NonceStoreUnavailable(FloError):
    """Redis, which stores the used nonces, did not respond, so the request is rejected instead of let through."""

    status_code = 503
    code = "nonce_store_unavailable"


class ThrottleStoreUnavailable(FloError):
    """Redis, which counts requests for rate limiting, did not respond, so the request is rejected with a status devices retry."""

    status_code = 503
    code = "throttle_store_unavailable"


# --- Configuration (operator side) ---------------------------------------------


class InvalidFederationConfig(FloError):
    status_code = 400
    code = "invalid_federation_config"


class InvalidNodeState(FloError):
    """An operator action that the node's current status does not allow."""

    status_code = 409
    code = "invalid_node_state"
