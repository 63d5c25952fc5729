"""Operator API for privacy reports: session or token authentication, never device signatures."""

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.views import APIView

from federation.api.schema import error_response
from federation.models import Federation
from privacy.exceptions import FederationNotFound
from privacy.permissions import CanExportPrivacyReports
from privacy.services.report_exports import export_privacy_report
from privacy.services.report_periods import parse_period


class JsonErrorsNegotiation(BaseContentNegotiation):
    """Render errors as JSON and leave the `format` query parameter to the view.

    DRF's default negotiation reads `?format=` as a renderer name and
    returns 404 for pdf and csv before the view runs.
    """

    def select_renderer(self, request, renderers, format_suffix=None):
        return JSONRenderer(), JSONRenderer.media_type

    def select_parser(self, request, parsers):
        return None


class PrivacyReportView(APIView):
    # Token first, so an anonymous call gets 401 with WWW-Authenticate: Token.
    authentication_classes = [TokenAuthentication, SessionAuthentication]
    permission_classes = [IsAuthenticated, CanExportPrivacyReports]
    content_negotiation_class = JsonErrorsNegotiation

    @extend_schema(
        operation_id="export_privacy_report",
        parameters=[
            OpenApiParameter("format", str, enum=["json", "csv", "pdf"], description="Report format (default json)."),
            OpenApiParameter("start", OpenApiTypes.DATE, description="First day of the period, in the server's time zone."),
            OpenApiParameter("end", OpenApiTypes.DATE, description="Last day of the period, in the server's time zone."),
            OpenApiParameter("table", str, description="CSV only: one table instead of a zip of all of them."),
        ],
        responses={
            200: OpenApiResponse(response=OpenApiTypes.BINARY, description="The report, as JSON, a CSV zip or table, or PDF; its SHA-256 digest is in X-FLO-Report-SHA256."),
            400: error_response("invalid_report_format", "invalid_report_period"),
            401: error_response("not_authenticated", "authentication_failed"),
            403: error_response("permission_denied"),
            404: error_response("federation_not_found", "not_found"),
        },
    )
    def get(self, request, federation_id: int):
        federation = Federation.objects.filter(id=federation_id).first()
        if federation is None:
            raise FederationNotFound(f"Federation {federation_id} does not exist.")
        params = request.query_params
        exported = export_privacy_report(
            federation,
            report_format=params.get("format", "json"),
            period=parse_period(params.get("start"), params.get("end")),
            table=params.get("table"),
            actor=request.user,
            remote_addr=request.META.get("REMOTE_ADDR"),
        )
        return report_response(exported)


def report_response(exported) -> HttpResponse:
    """Return an exported report as a download with its digest in a header."""
    response = HttpResponse(exported.content, content_type=exported.media_type)
    response["Content-Disposition"] = f'attachment; filename="{exported.filename}"'
    response["X-FLO-Report-SHA256"] = exported.json_sha256
    response["Cache-Control"] = "no-store"
    return response
