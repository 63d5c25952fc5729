"""Read helpers for the operator console: overview snapshot, nodes, rounds, ledger and audit log.

Every page and the JSON snapshot read through these functions, so the page
a console renders and the snapshot it refreshes from show the same numbers.
"""

from django.db.models import Count, Max, Q, QuerySet
from django.shortcuts import get_object_or_404
from django.utils import timezone

from federation.models import AuditEntry, Federation, ModelUpdate, ModelVersion, Node, TrainingRound
from privacy.models import FederationPrivacyLedgerEntry, PrivacyBudget, PrivacyLedgerEntry
from privacy.services.budgets import has_local_dp
from privacy.services.central import update_noise_multiplier

# Rows of the most recent updates and rounds shown on the overview.
RECENT_UPDATES = 20
RECENT_ROUNDS = 20
# Rows per page of the audit log and the privacy ledger.
LOG_PAGE_ROWS = 200
# Sort keys of the nodes table: query parameter value -> ORM ordering.
NODE_SORTS = {
    "name": ("display_name",),
    "status": ("status", "display_name"),
    "reputation": ("reputation__score", "display_name"),
    "budget": ("privacy_budget__epsilon_spent", "display_name"),
    "last_seen": ("last_seen_at", "display_name"),
    "rejections": ("reputation__rejected_count", "display_name"),
}


def get_federation(federation_id: int) -> Federation:
    """Return the federation or raise Http404."""
    return get_object_or_404(Federation, id=federation_id)


def list_federations() -> QuerySet:
    """Return every federation with its node and round counts, newest first."""
    return Federation.objects.annotate(num_nodes=Count("nodes", distinct=True), num_rounds=Count("rounds", distinct=True)).order_by("-created_at")


def describe_overview(federation: Federation) -> dict:
    """Return the overview snapshot: status, nodes, the round in flight, privacy, charts' series and recent updates."""
    current = federation.rounds.order_by("-number").first()
    return {
        "federation": {
            "id": federation.id,
            "name": federation.name,
            "status": federation.status,
            "status_reason": federation.status_reason,
            "aggregation_rule": federation.aggregation_rule,
            "max_rounds": federation.max_rounds,
        },
        "nodes": _count_nodes(federation, current),
        "current_round": describe_round_progress(current) if current else None,
        "privacy": describe_privacy(federation),
        "accuracy_series": list_metric_points(federation),
        "epsilon_series": list_epsilon_points(federation),
        "recent_updates": [_describe_update(update) for update in federation_updates(federation)[:RECENT_UPDATES]],
        "recent_rounds": list_recent_rounds(federation),
        "generated_at": timezone.now().isoformat(),
    }


def describe_round_progress(training_round: TrainingRound) -> dict:
    """Return a round's state, counts and time left before its deadline."""
    counts = training_round.updates.aggregate(
        accepted=Count("id", filter=Q(status=ModelUpdate.Status.ACCEPTED)), rejected=Count("id", filter=Q(status=ModelUpdate.Status.REJECTED))
    )
    seconds_left = (training_round.deadline_at - timezone.now()).total_seconds() if training_round.state == TrainingRound.State.OPEN else None
    return {
        "number": training_round.number,
        "state": training_round.state,
        "opened_at": training_round.opened_at.isoformat(),
        "deadline_at": training_round.deadline_at.isoformat(),
        "closed_at": training_round.closed_at.isoformat() if training_round.closed_at else None,
        "seconds_left": max(seconds_left, 0.0) if seconds_left is not None else None,
        "selected": training_round.selected_nodes.count(),
        "accepted": counts["accepted"],
        "rejected": counts["rejected"],
        "base_version": training_round.base_version.version,
        "result_version": training_round.result_version.version if training_round.result_version_id else None,
        "failure_reason": training_round.failure_reason,
    }


def list_recent_rounds(federation: Federation) -> list[dict]:
    """Return the newest RECENT_ROUNDS rounds with their state, model version and failure reason."""
    rounds = federation.rounds.select_related("result_version").defer("result_version__weights").order_by("-number")[:RECENT_ROUNDS]
    return [
        {
            "number": training_round.number,
            "state": training_round.state,
            "result_version": training_round.result_version.version if training_round.result_version_id else None,
            "opened_at": training_round.opened_at.isoformat(),
            "closed_at": training_round.closed_at.isoformat() if training_round.closed_at else None,
            "failure_reason": training_round.failure_reason,
        }
        for training_round in rounds
    ]


def describe_privacy(federation: Federation) -> dict:
    """Return the privacy mode, epsilon spent against the budget, and the current clip norm and noise."""
    if federation.central_dp:
        # The newest ledger entry stores the composition of every release, so
        # the snapshot, reloaded by every console, needs no accounting run.
        latest = FederationPrivacyLedgerEntry.objects.filter(federation=federation).order_by("-id").values_list("epsilon_after", flat=True).first()
        return {
            "mode": "central",
            "epsilon_spent": latest or 0.0,
            "epsilon_budget": federation.target_epsilon,
            "delta": federation.dp_delta,
            "clip_norm": federation.clip_norm,
            "noise_multiplier": update_noise_multiplier(federation),
        }
    if has_local_dp(federation):
        dp = federation.training_plan["dp"]
        budgets = PrivacyBudget.objects.filter(node__federation=federation).aggregate(
            epsilon_spent_max=Max("epsilon_spent"), epsilon_allocated_max=Max("epsilon_allocated"), num_budgets=Count("id")
        )
        exhausted = _count_exhausted_budgets(federation)
        return {
            "mode": "local",
            "epsilon_spent": budgets["epsilon_spent_max"] or 0.0,
            "epsilon_budget": budgets["epsilon_allocated_max"],
            "delta": federation.dp_delta,
            "clip_norm": dp["clip_norm"],
            "noise_multiplier": dp["noise_multiplier"],
            "nodes_with_budget": budgets["num_budgets"],
            "nodes_exhausted": exhausted,
        }
    return {"mode": "none", "epsilon_spent": None, "epsilon_budget": None, "delta": None, "clip_norm": None, "noise_multiplier": None}


def list_metric_points(federation: Federation) -> list[dict]:
    """Return each model version that has metrics, with them, in version order."""
    rows = ModelVersion.objects.filter(federation=federation).exclude(metrics={}).order_by("version").values_list("version", "metrics")
    return [{"version": version, "metrics": metrics} for version, metrics in rows]


def list_epsilon_points(federation: Federation) -> list[dict]:
    """Return the epsilon spent after each round: the federation's (central DP) or the largest of any node (local DP)."""
    if federation.central_dp:
        rows = FederationPrivacyLedgerEntry.objects.filter(federation=federation).order_by("round__number").values_list("round__number", "epsilon_after")
        return [{"round": number, "epsilon": epsilon} for number, epsilon in rows]
    rows = (
        PrivacyLedgerEntry.objects.filter(round__federation=federation)
        .values("round__number")
        .annotate(epsilon=Max("epsilon_after"))
        .order_by("round__number")
        .values_list("round__number", "epsilon")
    )
    # A node's epsilon never falls, so the running maximum is the largest spend of any node so far.
    points, highest = [], 0.0
    for number, epsilon in rows:
        highest = max(highest, epsilon)
        points.append({"round": number, "epsilon": highest})
    return points


def round_epsilon(training_round: TrainingRound) -> float | None:
    """Return the epsilon spent once the round was charged, as list_epsilon_points reports it, or None without DP."""
    federation = training_round.federation
    if federation.central_dp:
        return FederationPrivacyLedgerEntry.objects.filter(round=training_round).values_list("epsilon_after", flat=True).first()
    if not has_local_dp(federation):
        return None
    return PrivacyLedgerEntry.objects.filter(round__federation=federation, round__number__lte=training_round.number).aggregate(epsilon=Max("epsilon_after"))["epsilon"]


def list_nodes(federation: Federation, *, status: str = "", search: str = "", sort: str = "name", descending: bool = False) -> list[dict]:
    """Return the federation's nodes for the nodes table, filtered by status and name, sorted by a NODE_SORTS key."""
    nodes = federation.nodes.select_related("reputation", "privacy_budget")
    if status in Node.Status.values:
        nodes = nodes.filter(status=status)
    if search:
        nodes = nodes.filter(display_name__icontains=search)
    ordering = NODE_SORTS.get(sort, NODE_SORTS["name"])
    nodes = nodes.order_by(*(f"-{field}" if descending else field for field in ordering))
    return [_describe_node_row(node) for node in nodes]


def get_round(federation: Federation, number: int) -> TrainingRound:
    """Return the federation's round `number` or raise Http404."""
    return get_object_or_404(TrainingRound.objects.select_related("base_version", "result_version").defer("base_version__weights", "result_version__weights"), federation=federation, number=number)


def list_round_updates(training_round: TrainingRound) -> list[dict]:
    """Return a round's updates with their node, status and rejection reason."""
    updates = training_round.updates.select_related("node", "round").order_by("received_at")
    return [_describe_update(update) for update in updates]


def list_selected_nodes(training_round: TrainingRound) -> QuerySet:
    """Return the nodes the round selected, by name."""
    return training_round.selected_nodes.order_by("display_name")


def federation_updates(federation: Federation) -> QuerySet:
    """Return the federation's updates, newest first, without their payloads."""
    return ModelUpdate.objects.filter(round__federation=federation).select_related("node", "round").order_by("-received_at", "-id")


def list_ledger(federation: Federation) -> dict:
    """Return the newest LOG_PAGE_ROWS central releases and node spends of the federation."""
    central = FederationPrivacyLedgerEntry.objects.filter(federation=federation).select_related("round").order_by("-id")[:LOG_PAGE_ROWS]
    local = PrivacyLedgerEntry.objects.filter(round__federation=federation).select_related("round", "node").order_by("-id")[:LOG_PAGE_ROWS]
    return {"central": list(central), "local": list(local)}


def list_audit_entries(*, federation: Federation | None = None, action: str = "") -> QuerySet:
    """Return the newest LOG_PAGE_ROWS audit entries, optionally of one federation and action prefix."""
    entries = AuditEntry.objects.select_related("federation")
    if federation is not None:
        entries = entries.filter(federation=federation)
    if action:
        entries = entries.filter(action__startswith=action)
    return entries.order_by("-created_at", "-id")[:LOG_PAGE_ROWS]


def _count_nodes(federation: Federation, current: TrainingRound | None) -> dict:
    by_status = dict(federation.nodes.values_list("status").annotate(count=Count("id")).order_by())
    is_in_flight = current is not None and current.state in (TrainingRound.State.OPEN, TrainingRound.State.AGGREGATING)
    return {
        "active": by_status.get(Node.Status.ACTIVE, 0),
        "quarantined": by_status.get(Node.Status.QUARANTINED, 0),
        "revoked": by_status.get(Node.Status.REVOKED, 0),
        "selected": current.selected_nodes.count() if is_in_flight else 0,
        "responding": current.updates.count() if is_in_flight else 0,
    }


def _count_exhausted_budgets(federation: Federation) -> int:
    # NOTE: counts budgets with less than 1% of their allocation left, an
    # approximation of "cannot afford one more round" that needs no accounting per node.
    return sum(
        1
        for spent, allocated in PrivacyBudget.objects.filter(node__federation=federation).values_list("epsilon_spent", "epsilon_allocated")
        if allocated - spent < 0.01 * allocated
    )


def _describe_node_row(node: Node) -> dict:
    reputation = getattr(node, "reputation", None)
    budget = getattr(node, "privacy_budget", None)
    return {
        "id": str(node.id),
        "display_name": node.display_name,
        "status": node.status,
        "status_reason": node.status_reason,
        "sensitivity_class": node.sensitivity_class,
        "reputation": reputation.score if reputation else None,
        "rejections": reputation.rejected_count if reputation else 0,
        "epsilon_spent": budget.epsilon_spent if budget else None,
        "epsilon_remaining": budget.epsilon_remaining if budget else None,
        "last_seen_at": node.last_seen_at,
    }


def _describe_update(update: ModelUpdate) -> dict:
    return {
        "round": update.round.number,
        "node_id": str(update.node_id),
        "display_name": update.node.display_name,
        "status": update.status,
        "rejection_reason": update.rejection_reason,
        "num_examples": update.num_examples,
        "l2_norm": update.l2_norm,
        "received_at": update.received_at.isoformat(),
    }
