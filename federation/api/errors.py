"""One mapping from every error to the API's JSON shape `{"code", "detail"}`."""

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404
from django.http.request import RawPostDataException
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

from federation.exceptions import DatabaseBusy, FloError, PayloadTooLarge
from federation.models import Node
from flo_site import database_busy
from monitoring import metrics
from monitoring.events import publish_federation_event

logger = logging.getLogger(__name__)

INTERNAL_ERROR_CODE = "internal_error"
# Seconds a client should wait before retrying after another 503, such as an unreachable nonce store.
SERVICE_UNAVAILABLE_RETRY_AFTER_SECONDS = 5


def handle_api_exception(exc, context):
    """DRF exception handler: domain errors, DRF errors and known infrastructure errors."""
    view_name = type(context.get("view")).__name__
    # As DRF's own handler does, so these stay 404 and 403 below.
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound(*exc.args)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf_exceptions.PermissionDenied(*exc.args)
    if isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge(str(exc) or "The request body is too large.")
    if database_busy.is_database_busy(exc):
        logger.warning("database busy view=%s error=%s", view_name, exc)
        metrics.API_REJECTIONS.labels(code=DatabaseBusy.code).inc()
        exc = DatabaseBusy("The database is busy; retry the same request after the Retry-After delay.")
        response = Response({"code": exc.code, "detail": exc.detail}, status=exc.status_code)
        response["Retry-After"] = str(database_busy.RETRY_AFTER_SECONDS)
        return database_busy.mark_logged(response)

    if isinstance(exc, FloError):
        metrics.API_REJECTIONS.labels(code=exc.code).inc()
        if exc.status_code < 500:
            logger.warning("rejected request view=%s code=%s detail=%s", view_name, exc.code, exc.detail)
        node = getattr(context.get("view"), "submitting_node", None)
        if isinstance(node, Node):
            _publish_rejection(node, exc)
        body = {"code": exc.code, "detail": exc.detail, **exc.extra}
        response = Response(body, status=exc.status_code)
        if exc.status_code == 401:
            response["WWW-Authenticate"] = "FLO-HMAC-SHA256"
        if exc.status_code == 503:
            response["Retry-After"] = str(SERVICE_UNAVAILABLE_RETRY_AFTER_SECONDS)
        return response

    if isinstance(exc, drf_exceptions.APIException):
        code = exc.get_codes() if isinstance(exc.get_codes(), str) else "invalid_request"
        detail = exc.detail if isinstance(exc.detail, str) else "The request is invalid."
        body = {"code": code, "detail": str(detail)}
        if not isinstance(exc.detail, str):
            body["errors"] = exc.detail
        metrics.API_REJECTIONS.labels(code=code).inc()
        logger.warning("rejected request view=%s code=%s", view_name, code)
        response = Response(body, status=exc.status_code)
        # DRF puts the authentication scheme of a 401 on the exception (RFC 9110, section 11.6.1).
        if getattr(exc, "auth_header", None):
            response["WWW-Authenticate"] = exc.auth_header
        if isinstance(exc, drf_exceptions.Throttled) and exc.wait is not None:
            response["Retry-After"] = str(int(exc.wait))
        return response

    # Any other error is a server fault. Devices and scripts still get the
    # API's JSON shape, never Django's HTML error page (a traceback with DEBUG on).
    if isinstance(exc, RawPostDataException):
        logger.error("request body read twice view=%s", view_name, exc_info=exc)
    else:
        logger.error("unhandled error view=%s error=%s", view_name, exc, exc_info=exc)
    metrics.API_REJECTIONS.labels(code=INTERNAL_ERROR_CODE).inc()
    return Response({"code": INTERNAL_ERROR_CODE, "detail": "The server failed to handle the request and logged the error; retry later."}, status=500)


def _publish_rejection(node: Node, exc: FloError) -> None:
    """Tell the federation's console that a signed node's update was rejected; a rejected update is never stored, so no service sees it."""
    payload = {"node_id": str(node.id), "display_name": node.display_name, "code": exc.code, "detail": exc.detail}
    publish_federation_event(node.federation_id, "update.rejected", payload)
    if exc.code == "budget_exhausted":
        publish_federation_event(node.federation_id, "budget.exhausted", {"scope": "node", **payload})
