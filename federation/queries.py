"""Read helpers for the device API and the demo."""

from django.db.models import Exists, OuterRef

from federation.aggregation.robust import RuleConfig
from federation.aggregation.server_optimizers import ServerOptimizerConfig
from federation.exceptions import ModelVersionNotFound
from federation.models import Federation, ModelUpdate, ModelVersion, Node, TrainingRound
from privacy.services.budgets import next_event_for_node
from privacy.services.central import federation_epsilon, update_noise_multiplier

# Largest model version number: ModelVersion.version is a PositiveIntegerField (32-bit on every database).
MAX_MODEL_VERSION = 2**31 - 1
# Seconds a device should wait before polling for a task again.
TASK_POLL_SECONDS = 1
# Rules whose result is built coordinate by coordinate, so it need not equal any node's update.
COORDINATE_WISE_RULES = {"median", "trimmed_mean", "bulyan"}
# Rules that keep some whole updates and drop the others.
SELECTION_RULES = {"krum", "multi_krum", "bulyan"}


def rule_config_for(federation: Federation) -> RuleConfig:
    """Return the federation's aggregation rule with its parameters (validated when the federation was created)."""
    return RuleConfig.from_dict({"name": federation.aggregation_rule, **federation.aggregation_params})


def server_optimizer_config_for(federation: Federation) -> ServerOptimizerConfig:
    """Return the federation's server optimizer settings."""
    return ServerOptimizerConfig.from_dict(
        {
            "name": federation.server_optimizer,
            "learning_rate": federation.server_learning_rate,
            "momentum": federation.server_momentum,
            **federation.server_optimizer_params,
        }
    )


def describe_rule(federation: Federation) -> dict:
    """Return the aggregation rule, its parameters and how its result relates to the updates."""
    return {
        "rule": federation.aggregation_rule,
        "rule_params": dict(federation.aggregation_params),
        "coordinate_wise": federation.aggregation_rule in COORDINATE_WISE_RULES,
        "selects_updates": federation.aggregation_rule in SELECTION_RULES,
    }


def get_model_version(federation: Federation, version: int) -> ModelVersion:
    """Return a stored version of the federation's model or raise ModelVersionNotFound."""
    if not 0 <= version <= MAX_MODEL_VERSION:
        # A larger number cannot be stored, and the database would fail to compare it with the column.
        raise ModelVersionNotFound(f"Model versions range from 0 to {MAX_MODEL_VERSION}; there is no version {version}.")
    model_version = ModelVersion.objects.filter(federation=federation, version=version).first()
    if model_version is None:
        raise ModelVersionNotFound(f"Federation {federation.id} has no model version {version}.")
    return model_version


def describe_task(node: Node) -> dict:
    """Tell a device what to do now: train for the open round, wait, or stop.

    status is "train" when the node is selected for the open round and has
    not submitted yet, "wait" while there is nothing for it to do, and
    "done" when the federation no longer runs.
    """
    federation = node.federation
    active = (
        federation.rounds.filter(state__in=[TrainingRound.State.OPEN, TrainingRound.State.AGGREGATING])
        .select_related("base_version")
        .defer("base_version__weights")
        .annotate(
            is_selected=Exists(TrainingRound.selected_nodes.through.objects.filter(traininground_id=OuterRef("pk"), node_id=node.id)),
            has_submitted=Exists(ModelUpdate.objects.filter(round_id=OuterRef("pk"), node_id=node.id)),
        )
        .first()
    )
    # A round in flight trains the latest version, so the extra query is needed only between rounds.
    if active is not None:
        latest = active.base_version.version
    else:
        latest = ModelVersion.objects.filter(federation=federation).order_by("-version").values_list("version", flat=True).first()
    task = {
        "federation": {"id": federation.id, "name": federation.name, "status": federation.status, "status_reason": federation.status_reason},
        "latest_model_version": latest,
        "model_spec": federation.model_spec,
        "retry_after_seconds": TASK_POLL_SECONDS,
        "round": None,
    }
    if federation.status in (Federation.Status.COMPLETED, Federation.Status.STOPPED):
        return {**task, "status": "done"}

    if active is None:
        return {**task, "status": "wait"}
    is_selected = active.is_selected
    has_submitted = active.has_submitted
    task["round"] = {
        "number": active.number,
        "state": active.state,
        "deadline": active.deadline_at.isoformat(),
        "model_version": active.base_version.version,
        "selected": is_selected,
        "submitted": has_submitted,
    }
    if active.state != TrainingRound.State.OPEN or not is_selected or has_submitted or federation.status != Federation.Status.RUNNING:
        return {**task, "status": "wait"}
    return {
        **task,
        "status": "train",
        "training_plan": training_plan_for(node),
        "weights_path": f"/api/v1/models/{active.base_version.version}/weights",
    }


def describe_node(node: Node) -> dict:
    """Return a node's own status, reputation and privacy budget."""
    budget = getattr(node, "privacy_budget", None)
    reputation = getattr(node, "reputation", None)
    last_update = node.updates.select_related("round").order_by("-received_at").first()
    return {
        "node_id": str(node.id),
        "display_name": node.display_name,
        "federation_id": node.federation_id,
        "status": node.status,
        "status_reason": node.status_reason,
        "last_seen_at": node.last_seen_at.isoformat() if node.last_seen_at else None,
        "updates_submitted": node.updates.count(),
        "last_update": (
            {"round": last_update.round.number, "status": last_update.status, "rejection_reason": last_update.rejection_reason}
            if last_update
            else None
        ),
        "reputation": reputation.score if reputation else None,
        "reputation_detail": (
            {
                "accepted": reputation.accepted_count,
                "rejected": reputation.rejected_count,
                "dropouts": reputation.dropout_count,
                "last_round": reputation.last_round_number,
                "last_outcome": reputation.last_outcome,
                "last_components": reputation.last_components,
            }
            if reputation
            else None
        ),
        "privacy_budget": (
            {
                "epsilon_allocated": budget.epsilon_allocated,
                "epsilon_spent": budget.epsilon_spent,
                "epsilon_remaining": budget.epsilon_remaining,
                "delta": budget.delta,
            }
            if budget
            else None
        ),
    }


def describe_federation(federation: Federation) -> dict:
    """Return a federation's status, its rounds with update counts, and its nodes with budgets."""
    rounds = []
    for training_round in federation.rounds.select_related("result_version", "base_version").defer("result_version__weights", "base_version__weights").order_by("number"):
        rounds.append(
            {
                "round": training_round.number,
                "state": training_round.state,
                "selected": training_round.selected_nodes.count(),
                "accepted": training_round.updates.filter(status=ModelUpdate.Status.ACCEPTED).count(),
                "rejected": training_round.updates.filter(status=ModelUpdate.Status.REJECTED).count(),
                "base_version": training_round.base_version.version,
                "result_version": training_round.result_version.version if training_round.result_version else None,
                "failure_reason": training_round.failure_reason,
                "aggregation": training_round.aggregation_report or None,
            }
        )
    nodes = [describe_node(node) for node in federation.nodes.select_related("privacy_budget", "reputation").order_by("display_name")]
    central = None
    if federation.central_dp:
        central = {
            "target_epsilon": federation.target_epsilon,
            "epsilon_spent": federation_epsilon(federation),
            "delta": federation.dp_delta,
            "accountant": federation.accountant,
            "participation_rate": federation.participation_rate,
            "noise_multiplier": federation.central_noise_multiplier,
            "update_noise_multiplier": update_noise_multiplier(federation),
            "clip_norm": federation.clip_norm,
            "adaptive_clipping": federation.adaptive_clipping,
        }
    return {
        "federation_id": federation.id,
        "name": federation.name,
        "status": federation.status,
        "status_reason": federation.status_reason,
        "central_dp": central,
        "aggregation": describe_rule(federation),
        "server_optimizer": server_optimizer_config_for(federation).to_dict(),
        "quarantine_threshold": federation.quarantine_threshold,
        "model_versions": federation.model_versions.count(),
        "rounds": rounds,
        "nodes": nodes,
    }


def training_plan_for(node: Node) -> dict:
    """Return the federation's training plan with the node's own DP-SGD noise for its next participation.

    With planned participations the noise follows the node's class and the
    spending schedule; the ledger charges exactly this event on acceptance.
    """
    plan = dict(node.federation.training_plan)
    event = next_event_for_node(node)
    if plan.get("dp") and event is not None:
        plan["dp"] = {**plan["dp"], "noise_multiplier": event.noise_multiplier}
    return plan
