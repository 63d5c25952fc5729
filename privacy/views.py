"""Console pages for privacy reports: a page per federation with download links."""

import logging

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import render
from django.views.decorators.http import require_GET

from federation.models import Federation
from flo_site.roles import REPORT_ROLES, has_role
from privacy.api.views import report_response
from privacy.exceptions import InvalidReportFormat, InvalidReportPeriod
from privacy.services.report_exports import REPORT_FORMATS, export_privacy_report
from privacy.services.report_periods import parse_period

logger = logging.getLogger(__name__)


def _require_report_role(request) -> None:
    if not has_role(request.user, *REPORT_ROLES):
        raise PermissionDenied("Privacy reports are limited to the admin and compliance officer roles.")


@require_GET
@login_required
def report_page(request, federation_id: int):
    _require_report_role(request)
    federation = Federation.objects.filter(id=federation_id).first()
    if federation is None:
        raise Http404(f"Federation {federation_id} does not exist.")
    context = {"federation": federation, "formats": REPORT_FORMATS, "time_zone": settings.TIME_ZONE, "start": request.GET.get("start", ""), "end": request.GET.get("end", "")}
    return render(request, "privacy/report.html", context)


@require_GET
@login_required
def report_download(request, federation_id: int):
    _require_report_role(request)
    federation = Federation.objects.filter(id=federation_id).first()
    if federation is None:
        raise Http404(f"Federation {federation_id} does not exist.")
    try:
        exported = export_privacy_report(
            federation,
            report_format=request.GET.get("format", "pdf"),
            period=parse_period(request.GET.get("start"), request.GET.get("end")),
            actor=request.user,
            remote_addr=request.META.get("REMOTE_ADDR"),
        )
    except (InvalidReportFormat, InvalidReportPeriod) as error:
        logger.warning("privacy report rejected federation=%s user=%s code=%s detail=%s", federation.id, request.user.get_username(), error.code, error.detail)
        context = {"federation": federation, "formats": REPORT_FORMATS, "time_zone": settings.TIME_ZONE, "error": error.detail}
        return render(request, "privacy/report.html", context, status=400)
    return report_response(exported)
