"""Console pages (read-only for every console role), the overview snapshot, /metrics and /healthz."""

import hmac
import logging

from django.conf import settings
from django.db import DatabaseError, connection
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from federation.models import Node
from monitoring import console
from monitoring.forms import EnrolmentTokensForm, ReasonForm
from monitoring.metrics import REGISTRY
from monitoring.permissions import can_operate, console_reader

logger = logging.getLogger(__name__)


def healthz(request):
    """Return 200 when the database responds to a query, 503 otherwise."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as error:
        logger.error("health check failed: database unreachable", exc_info=error)
        return JsonResponse({"status": "unavailable", "database": "unreachable"}, status=503)
    return JsonResponse({"status": "ok"})


@require_GET
def metrics_view(request):
    """Serve Prometheus metrics to a caller with `Authorization: Bearer <FLO_METRICS_TOKEN>`; 404 when no token is configured, 403 for a wrong one."""
    token = settings.FLO_METRICS_TOKEN
    if not token:
        raise Http404("Metrics are off; set FLO_METRICS_TOKEN to serve them.")
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
        return HttpResponse("A valid bearer token is required.\n", status=403, content_type="text/plain")
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


@console_reader
def federation_list(request):
    return render(request, "console/federations.html", {"federations": console.list_federations(), "can_operate": can_operate(request.user)})


@console_reader
def federation_overview(request, federation_id: int):
    federation = console.get_federation(federation_id)
    context = {
        "federation": federation,
        "overview": console.describe_overview(federation),
        "can_operate": can_operate(request.user),
        "tokens_form": EnrolmentTokensForm(),
    }
    return render(request, "console/overview.html", context)


@console_reader
def federation_snapshot(request, federation_id: int):
    """Return the overview as JSON; consoles reload it after events, after a reconnect and periodically."""
    return JsonResponse(console.describe_overview(console.get_federation(federation_id)))


@console_reader
def node_list(request, federation_id: int):
    federation = console.get_federation(federation_id)
    sort = request.GET.get("sort", "name")
    descending = sort.startswith("-")
    filters = {"status": request.GET.get("status", ""), "search": request.GET.get("q", "").strip()[:200]}
    context = {
        "federation": federation,
        "nodes": console.list_nodes(federation, sort=sort.lstrip("-"), descending=descending, **filters),
        "statuses": Node.Status.values,
        "sort": sort,
        "filters": filters,
        "sort_keys": list(console.NODE_SORTS),
        "can_operate": can_operate(request.user),
        "reason_form": ReasonForm(),
    }
    return render(request, "console/nodes.html", context)


@console_reader
def round_detail(request, federation_id: int, number: int):
    federation = console.get_federation(federation_id)
    training_round = console.get_round(federation, number)
    context = {
        "federation": federation,
        "round": training_round,
        "progress": console.describe_round_progress(training_round),
        "updates": console.list_round_updates(training_round),
        "selected_nodes": console.list_selected_nodes(training_round),
    }
    return render(request, "console/round.html", context)


@console_reader
def privacy_ledger(request, federation_id: int):
    federation = console.get_federation(federation_id)
    context = {"federation": federation, "privacy": console.describe_privacy(federation), **console.list_ledger(federation)}
    return render(request, "console/ledger.html", context)


@console_reader
def audit_log(request):
    federation = None
    if request.GET.get("federation", "").isdigit():
        federation = console.get_federation(int(request.GET["federation"]))
    action = request.GET.get("action", "").strip()[:100]
    context = {"entries": console.list_audit_entries(federation=federation, action=action), "federation": federation, "action": action}
    return render(request, "console/audit.html", context)
