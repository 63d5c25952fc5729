"""The privacy report of a federation: what was processed, under which guarantees, and how much privacy was spent.

`build_report` reads the database into a plain document (dicts, lists,
numbers and strings) with node ids pseudonymised. The pure modules in
`privacy.reports` render that document as JSON, CSV or PDF, and
`privacy.services.report_exports` records each export in the audit log.
"""

from collections import Counter
from datetime import UTC, datetime

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone

from federation.models import AuditEntry, Federation, ModelUpdate, ModelVersion, Node
from federation.queries import describe_rule, server_optimizer_config_for
from flo_site.version import FLO_VERSION
from privacy.models import ComplianceProfile, FederationPrivacyLedgerEntry, PrivacyBudget, PrivacyLedgerEntry
from privacy.reports.integrity import seal
from privacy.reports.pseudonyms import Pseudonymizer
from privacy.services.budgets import find_nodes_that_can_afford_next_round, has_local_dp
from privacy.services.report_periods import ReportPeriod, local_time_zone
from privacy.services.report_sections import describe_dp, describe_parties, describe_processing, describe_retention, describe_security

SCHEMA_VERSION = "1.0"
# Most recent audit entries of the period printed in the report; the full log stays in the database.
AUDIT_EXCERPT_LIMIT = 200


def build_report(federation: Federation, period: ReportPeriod, *, pseudonym_key: bytes | None = None, now: datetime | None = None) -> dict:
    """Build the sealed report document of a federation over a period.

    Args:
        pseudonym_key: key of the node pseudonyms; None draws a random key
            that is discarded when this call returns. Only tests pass one.
        now: generation time; None takes the current time.
    """
    federation = Federation.objects.get(id=federation.id)
    pseudonymizer = Pseudonymizer(pseudonym_key)
    generated_at = now or timezone.now()
    profile = ComplianceProfile.objects.filter(federation=federation).first()
    nodes = {node.id: node for node in federation.nodes.select_related("privacy_budget")}
    record_entries = list(
        PrivacyLedgerEntry.objects.filter(node__federation=federation, **period.contains_filter("created_at")).select_related("round").order_by("created_at", "id")
    )
    central_entries = list(
        FederationPrivacyLedgerEntry.objects.filter(federation=federation, **period.contains_filter("created_at")).select_related("round").order_by("created_at", "id")
    )
    ledger = {
        "record_level": [_record_entry_row(entry, nodes, pseudonymizer) for entry in record_entries],
        "central": [_central_entry_row(entry) for entry in central_entries],
    }
    node_rows = _node_rows(federation, nodes, period, pseudonymizer)
    document = {
        "schema_version": SCHEMA_VERSION,
        "report": _describe_report(federation, period, generated_at),
        "federation": {
            "id": federation.id,
            "name": federation.name,
            "status": federation.status,
            "status_reason": federation.status_reason,
            "created_at": _iso(federation.created_at),
            "max_rounds": federation.max_rounds,
        },
        "parties": describe_parties(profile),
        "processing": describe_processing(federation, profile),
        "differential_privacy": describe_dp(federation),
        "budgets": _describe_budgets(federation, node_rows, period, pseudonymizer),
        "rounds": _round_rows(federation, period, record_entries, central_entries),
        "ledger": ledger,
        "nodes": node_rows,
        "secure_aggregation": {"used": False, "statement": "not used: the server receives each device's individual model update"},
        "aggregation": _describe_aggregation(federation, period, pseudonymizer),
        "security_measures": describe_security(profile),
        "retention": describe_retention(federation, profile),
        "model_versions": _model_version_rows(federation, period),
        "audit_log": _audit_excerpt(federation, period),
    }
    return seal(pseudonymizer.scrub(document))


def _describe_report(federation: Federation, period: ReportPeriod, generated_at: datetime) -> dict:
    zone = local_time_zone()
    return {
        "title": f"Privacy report of federation {federation.id}",
        "generator": f"FLO {FLO_VERSION}",
        "generated_at_utc": generated_at.astimezone(UTC).isoformat(),
        "generated_at_local": generated_at.astimezone(zone).isoformat(),
        "time_zone": settings.TIME_ZONE,
        "period": {
            "start": period.start.isoformat() if period.start else None,
            "end_exclusive": period.end.isoformat() if period.end else None,
            "covers": "rows created at or after the start and before the end; an open side is unbounded",
        },
        "pseudonymisation": (
            "Node ids are replaced by HMAC-SHA256 pseudonyms under a random key made for this report and discarded after it; "
            "the report does not contain the mapping, and pseudonyms differ between reports. Device display names are left out."
        ),
    }


def _record_entry_row(entry: PrivacyLedgerEntry, nodes: dict, pseudonymizer: Pseudonymizer) -> dict:
    node = nodes.get(entry.node_id)
    return {
        "round": entry.round.number,
        "node": pseudonymizer.pseudonym(str(entry.node_id)),
        "sensitivity_class": node.sensitivity_class if node else None,
        "mechanism": entry.mechanism,
        "noise_multiplier": entry.noise_multiplier,
        "sampling_rate": entry.sampling_rate,
        "steps": entry.steps,
        "delta": entry.delta,
        "epsilon_after": entry.epsilon_after,
        "created_at": _iso(entry.created_at),
    }


def _central_entry_row(entry: FederationPrivacyLedgerEntry) -> dict:
    return {
        "round": entry.round.number,
        "mechanism": "central_dp_fedavg",
        "noise_multiplier": entry.noise_multiplier,
        "sampling_rate": entry.sampling_rate,
        "steps": entry.steps,
        "delta": entry.delta,
        "accountant": entry.accountant,
        "epsilon_after": entry.epsilon_after,
        "created_at": _iso(entry.created_at),
    }


def _node_rows(federation: Federation, nodes: dict, period: ReportPeriod, pseudonymizer: Pseudonymizer) -> list[dict]:
    """Build one row per node: allocation, cumulative epsilon at the period's bounds and now, participations and update counts."""
    affordable = find_nodes_that_can_afford_next_round(federation, nodes.values()) if has_local_dp(federation) else set(nodes)
    entries = PrivacyLedgerEntry.objects.filter(node__federation=federation).order_by("created_at", "id").values_list("node_id", "epsilon_after", "created_at")
    before_start: dict = {}
    before_end: dict = {}
    in_period: Counter = Counter()
    for node_id, epsilon_after, created_at in entries:
        if period.start is not None and created_at < period.start:
            before_start[node_id] = epsilon_after
        if period.end is None or created_at < period.end:
            before_end[node_id] = epsilon_after
        if (period.start is None or created_at >= period.start) and (period.end is None or created_at < period.end):
            in_period[node_id] += 1

    update_counts = Counter(
        (node_id, status) for node_id, status in ModelUpdate.objects.filter(node__federation=federation, **period.contains_filter("received_at")).values_list("node_id", "status")
    )

    rows = []
    for node in nodes.values():
        budget: PrivacyBudget | None = getattr(node, "privacy_budget", None)
        rows.append(
            {
                "node": pseudonymizer.pseudonym(str(node.id)),
                "sensitivity_class": node.sensitivity_class,
                "status": node.status,
                "epsilon_allocated": budget.epsilon_allocated if budget else None,
                "epsilon_at_period_start": before_start.get(node.id, 0.0) if budget else None,
                "epsilon_at_period_end": before_end.get(node.id, 0.0) if budget else None,
                "epsilon_spent_now": budget.epsilon_spent if budget else None,
                "participations_in_period": in_period[node.id],
                "updates_accepted": update_counts[(node.id, ModelUpdate.Status.ACCEPTED)],
                "updates_rejected": update_counts[(node.id, ModelUpdate.Status.REJECTED)],
                "budget_exhausted": budget is not None and node.id not in affordable,
            }
        )
    # Sorted by pseudonym, so the order reveals nothing about enrolment order.
    return sorted(rows, key=lambda row: row["node"])


def _describe_budgets(federation: Federation, node_rows: list[dict], period: ReportPeriod, pseudonymizer: Pseudonymizer) -> dict:
    by_class = []
    for sensitivity_class in Node.SensitivityClass.values:
        rows = [row for row in node_rows if row["sensitivity_class"] == sensitivity_class]
        allocation = federation.sensitivity_budgets.get(sensitivity_class, federation.node_epsilon_budget) if has_local_dp(federation) else None
        if not rows and sensitivity_class not in federation.sensitivity_budgets:
            continue
        spent = [row["epsilon_spent_now"] for row in rows if row["epsilon_spent_now"] is not None]
        by_class.append(
            {
                "sensitivity_class": sensitivity_class,
                "epsilon_allocated": allocation,
                "nodes": len(rows),
                "nodes_exhausted": sum(row["budget_exhausted"] for row in rows),
                "max_epsilon_spent": max(spent) if spent else None,
            }
        )
    return {"by_sensitivity_class": by_class, "exhaustion_events": _exhaustion_events(federation, period, pseudonymizer)}


def _exhaustion_events(federation: Federation, period: ReportPeriod, pseudonymizer: Pseudonymizer) -> list[dict]:
    """List nodes whose budget cannot cover another participation (dated by their last spend) and federations completed by their budget."""
    events = []
    if has_local_dp(federation):
        nodes = list(federation.nodes.filter(privacy_budget__isnull=False))
        affordable = find_nodes_that_can_afford_next_round(federation, nodes)
        for node in nodes:
            if node.id in affordable:
                continue
            last = PrivacyLedgerEntry.objects.filter(node=node).order_by("-created_at", "-id").first()
            if last is None or not _in_period(last.created_at, period):
                continue
            budget = node.privacy_budget
            events.append(
                {
                    "at": _iso(last.created_at),
                    "scope": "node",
                    "node": pseudonymizer.pseudonym(str(node.id)),
                    "detail": f"epsilon {budget.epsilon_spent:.6f} of {budget.epsilon_allocated:.6f} spent after round {last.round.number}; another participation would exceed the allocation",
                }
            )
    completions = AuditEntry.objects.filter(federation=federation, action="federation.completed", **period.contains_filter("created_at")).order_by("created_at")
    for entry in completions:
        reason = str(entry.details.get("reason", ""))
        if "budget" in reason.lower():
            events.append({"at": _iso(entry.created_at), "scope": "federation", "node": None, "detail": reason})
    return sorted(events, key=lambda event: event["at"])


def _round_rows(federation: Federation, period: ReportPeriod, record_entries: list, central_entries: list) -> list[dict]:
    record_counts = Counter(entry.round_id for entry in record_entries)
    central_by_round = {entry.round_id: entry.epsilon_after for entry in central_entries}
    rounds = (
        federation.rounds.filter(**period.contains_filter("opened_at"))
        .select_related("result_version")
        .defer("result_version__weights")
        .annotate(
            num_selected=Count("selected_nodes", distinct=True),
            num_accepted=Count("updates", filter=Q(updates__status=ModelUpdate.Status.ACCEPTED), distinct=True),
            num_rejected=Count("updates", filter=Q(updates__status=ModelUpdate.Status.REJECTED), distinct=True),
        )
        .order_by("number")
    )
    rows = []
    for training_round in rounds:
        rows.append(
            {
                "round": training_round.number,
                "state": training_round.state,
                "opened_at": _iso(training_round.opened_at),
                "closed_at": _iso(training_round.closed_at),
                "selected": training_round.num_selected,
                "accepted": training_round.num_accepted,
                "rejected": training_round.num_rejected,
                "result_version": training_round.result_version.version if training_round.result_version else None,
                "record_level_entries": record_counts[training_round.id],
                "central_epsilon_after": central_by_round.get(training_round.id),
            }
        )
    return rows


def _describe_aggregation(federation: Federation, period: ReportPeriod, pseudonymizer: Pseudonymizer) -> dict:
    updates = ModelUpdate.objects.filter(round__federation=federation, **period.contains_filter("received_at"))
    rejected = Counter(updates.filter(status=ModelUpdate.Status.REJECTED).values_list("rejection_reason", flat=True))
    events = []
    for entry in AuditEntry.objects.filter(federation=federation, action__in=["node.quarantined", "node.reinstated"], **period.contains_filter("created_at")).order_by("created_at"):
        details = entry.details or {}
        events.append(
            {
                "at": _iso(entry.created_at),
                "action": entry.action,
                "node": entry.target.removeprefix("node:"),
                "round": details.get("round"),
                "score": details.get("score"),
                "threshold": details.get("threshold"),
                "reason": details.get("reason", ""),
                "actor": entry.actor_label,
            }
        )
    quarantined_now = [
        {"node": pseudonymizer.pseudonym(str(node_id)), "status_reason": reason}
        for node_id, reason in federation.nodes.filter(status=Node.Status.QUARANTINED).values_list("id", "status_reason")
    ]
    return {
        **describe_rule(federation),
        "rule_label": Federation.AggregationRule(federation.aggregation_rule).label,
        "server_optimizer": server_optimizer_config_for(federation).to_dict(),
        "quarantine_threshold": federation.quarantine_threshold,
        "updates_received": updates.count(),
        "updates_accepted": updates.filter(status=ModelUpdate.Status.ACCEPTED).count(),
        "updates_rejected": sum(rejected.values()),
        "rejections_by_reason": [{"reason": reason or "no reason recorded", "count": count} for reason, count in sorted(rejected.items())],
        "quarantine_events": sorted(events, key=lambda event: event["at"]),
        "nodes_quarantined_now": sorted(quarantined_now, key=lambda row: row["node"]),
    }


def _model_version_rows(federation: Federation, period: ReportPeriod) -> list[dict]:
    versions = ModelVersion.objects.filter(federation=federation, **period.contains_filter("created_at")).order_by("version")
    return [
        {"version": version.version, "created_at": _iso(version.created_at), "num_updates": version.num_updates, "total_examples": version.total_examples, "weights_sha256": version.weights_sha256}
        for version in versions.only("version", "created_at", "num_updates", "total_examples", "weights_sha256")
    ]


def _audit_excerpt(federation: Federation, period: ReportPeriod) -> dict:
    entries = AuditEntry.objects.filter(federation=federation, **period.contains_filter("created_at"))
    latest = list(entries.order_by("-created_at", "-id")[:AUDIT_EXCERPT_LIMIT])
    return {
        "entries_in_period": entries.count(),
        "excerpt_limit": AUDIT_EXCERPT_LIMIT,
        "statement": f"the {AUDIT_EXCERPT_LIMIT} most recent entries of the period, oldest first; client addresses are left out",
        "entries": [
            {"at": _iso(entry.created_at), "actor": entry.actor_label, "action": entry.action, "target": entry.target, "details": entry.details}
            for entry in reversed(latest)
        ],
    }


def _in_period(moment: datetime, period: ReportPeriod) -> bool:
    return (period.start is None or moment >= period.start) and (period.end is None or moment < period.end)


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment else None
