"""Console actions: each view checks the operator role, validates a form and calls one service.

Services record the audit entry with the operator and their address, so
the views only pass them on.
"""

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from federation.exceptions import FloError
from federation.models import Node
from federation.services.enrolment import issue_enrolment_tokens
from federation.services.federations import create_federation, start_federation
from federation.services.lifecycle import pause_federation, resume_federation, stop_federation
from federation.services.nodes import quarantine_node, revoke_node
from federation.services.reputation import reinstate_node
from monitoring import console
from monitoring.forms import EnrolmentTokensForm, FederationForm, ReasonForm
from monitoring.permissions import console_operator
from privacy.services.central import calibrate_central_noise

FEDERATION_ACTIONS = {
    "start": start_federation,
    "pause": pause_federation,
    "resume": resume_federation,
    "stop": stop_federation,
}
NODE_ACTIONS = {"quarantine": quarantine_node, "reinstate": reinstate_node, "revoke": revoke_node}


@console_operator
@require_http_methods(["GET", "POST"])
def federation_create(request):
    """Show the form; "preview" shows the calibrated central noise, "create" stores the federation.

    With central DP a federation is created only when the submitted form
    carries the preview key of its current privacy settings, so the operator
    saw the noise multiplier for exactly these settings before anything is saved.
    """
    form = FederationForm(request.POST or None)
    preview = None
    if request.method == "POST" and form.is_valid():
        config = form.to_config()
        is_central = "central_dp" in config
        was_previewed = is_central and request.POST.get("previewed") == _preview_key(config)
        if request.POST.get("action") == "create" and (not is_central or was_previewed):
            try:
                federation = create_federation(**config, actor=request.user, remote_addr=_remote_addr(request))
            except FloError as error:
                form.add_error(None, error.detail)
            else:
                messages.success(request, f"Federation {federation.name} created as a draft; issue enrolment tokens, then start it.")
                return redirect("console-overview", federation_id=federation.id)
        elif is_central:
            preview = _preview_central_noise(form, config)
    return render(request, "console/federation_form.html", {"form": form, "preview": preview})


@console_operator
@require_POST
def federation_action(request, federation_id: int, action: str):
    federation = console.get_federation(federation_id)
    service = FEDERATION_ACTIONS.get(action)
    if service is None:
        return render(request, "console/error.html", {"message": f"Unknown action {action!r}."}, status=404)
    try:
        service(federation, actor=request.user, remote_addr=_remote_addr(request))
    except FloError as error:
        messages.error(request, error.detail)
    else:
        messages.success(request, f"Federation {federation.name}: {action} done.")
    return redirect("console-overview", federation_id=federation.id)


@console_operator
@require_POST
def node_action(request, federation_id: int, node_id, action: str):
    federation = console.get_federation(federation_id)
    node = get_object_or_404(Node, id=node_id, federation=federation)
    service = NODE_ACTIONS.get(action)
    form = ReasonForm(request.POST)
    if service is None or not form.is_valid():
        return render(request, "console/error.html", {"message": f"Unknown action {action!r} or invalid reason."}, status=400)
    try:
        service(node, actor=request.user, remote_addr=_remote_addr(request), reason=form.cleaned_data["reason"])
    except FloError as error:
        messages.error(request, error.detail)
    else:
        messages.success(request, f"Node {node.display_name}: {action} done.")
    return redirect("console-nodes", federation_id=federation.id)


@never_cache
@console_operator
@require_POST
def enrolment_tokens(request, federation_id: int):
    """Issue tokens and show them once: only their hashes are stored, and the page is never cached."""
    federation = console.get_federation(federation_id)
    form = EnrolmentTokensForm(request.POST)
    tokens = []
    if form.is_valid():
        try:
            tokens = issue_enrolment_tokens(federation, actor=request.user, remote_addr=_remote_addr(request), **form.cleaned_data)
        except FloError as error:
            form.add_error(None, error.detail)
    return render(request, "console/tokens.html", {"federation": federation, "form": form, "tokens": tokens}, status=200 if tokens else 400)


def _preview_central_noise(form: FederationForm, config: dict) -> dict | None:
    central = config["central_dp"]
    try:
        noise_multiplier = calibrate_central_noise(
            target_epsilon=central["target_epsilon"],
            delta=config["dp_delta"],
            participation_rate=central["participation_rate"],
            rounds=config["max_rounds"],
            accountant=central["accountant"],
        )
    except ValueError as error:
        form.add_error(None, f"Cannot calibrate noise for this target: {error}")
        return None
    return {"noise_multiplier": noise_multiplier, **central, "rounds": config["max_rounds"], "delta": config["dp_delta"], "key": _preview_key(config)}


def _preview_key(config: dict) -> str:
    """Return the settings that the calibrated noise depends on, as one string."""
    central = config["central_dp"]
    return f"{central['target_epsilon']!r}:{central['participation_rate']!r}:{config['max_rounds']}:{config['dp_delta']!r}:{central['accountant']}"


def _remote_addr(request) -> str | None:
    # NOTE: behind a reverse proxy this is the proxy's address; FLO reads no
    # X-Forwarded-For, because a client could forge it.
    return request.META.get("REMOTE_ADDR") or None
