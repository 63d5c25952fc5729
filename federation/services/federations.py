"""Creating and starting federations."""

import logging
import math

import numpy as np
from django.db import transaction

from federation.exceptions import InvalidFederationConfig
from federation.models import Federation
from federation.services.audit import record_audit
from federation.services.rounds import open_next_round
from federation.services.weights import store_model_version
from flo_client.models import initial_weights, validate_model_spec
from flo_client.training import TrainingPlan

logger = logging.getLogger(__name__)

# Above this delta an (epsilon, delta) guarantee allows a noticeable chance
# of total disclosure; the usual rule is delta well below 1/population.
MAX_DP_DELTA = 1e-3


def create_federation(
    *,
    name: str,
    model_spec: dict,
    training_plan: dict,
    round_size: int,
    min_updates: int,
    round_deadline_seconds: int = 600,
    max_rounds: int = 100,
    dp_delta: float = 1e-5,
    node_epsilon_budget: float | None = None,
    node_liveness_seconds: int = 3600,
    selection_seed: int = 0,
    actor=None,
) -> Federation:
    """Validate a configuration and store a draft federation with its initial model (version 0).

    Raises:
        InvalidFederationConfig: naming the invalid setting.
    """
    try:
        model_spec = validate_model_spec(model_spec)
        plan = TrainingPlan.from_dict(training_plan)
    except ValueError as error:
        raise InvalidFederationConfig(str(error)) from error
    _check_round_settings(round_size=round_size, min_updates=min_updates, round_deadline_seconds=round_deadline_seconds, max_rounds=max_rounds)
    _check_privacy_settings(plan=plan, dp_delta=dp_delta, node_epsilon_budget=node_epsilon_budget)

    with transaction.atomic():
        federation = Federation.objects.create(
            name=name,
            model_spec=model_spec,
            training_plan=plan.to_dict(),
            round_size=round_size,
            min_updates=min_updates,
            round_deadline_seconds=round_deadline_seconds,
            max_rounds=max_rounds,
            dp_delta=dp_delta,
            node_epsilon_budget=node_epsilon_budget if plan.dp is not None else None,
            node_liveness_seconds=node_liveness_seconds,
            selection_seed=selection_seed,
        )
        weights = initial_weights(model_spec, np.random.default_rng(selection_seed))
        store_model_version(federation, version=0, weights=weights)
        record_audit("federation.created", federation=federation, actor=actor, target=f"federation:{federation.id}", details={"name": name})
    logger.info("federation created federation=%s name=%s", federation.id, name)
    return federation


def start_federation(federation: Federation, *, actor=None) -> None:
    """Move a draft or paused federation to running and open its next round."""
    with transaction.atomic():
        updated = Federation.objects.filter(id=federation.id, status__in=[Federation.Status.DRAFT, Federation.Status.PAUSED]).update(
            status=Federation.Status.RUNNING, status_reason=""
        )
        if not updated:
            federation.refresh_from_db()
            raise InvalidFederationConfig(f"Federation {federation.id} is {federation.status}; only a draft or paused federation can start.")
        record_audit("federation.started", federation=federation, actor=actor, target=f"federation:{federation.id}")
        transaction.on_commit(lambda: open_next_round(federation.id))
    logger.info("federation started federation=%s", federation.id)


def _check_round_settings(*, round_size: int, min_updates: int, round_deadline_seconds: int, max_rounds: int) -> None:
    for label, value in (("round_size", round_size), ("min_updates", min_updates), ("round_deadline_seconds", round_deadline_seconds), ("max_rounds", max_rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidFederationConfig(f"{label} must be a positive integer, got {value!r}.")
    if min_updates > round_size:
        raise InvalidFederationConfig(f"min_updates ({min_updates}) cannot exceed round_size ({round_size}).")


def _check_privacy_settings(*, plan: TrainingPlan, dp_delta: float, node_epsilon_budget: float | None) -> None:
    if not (isinstance(dp_delta, float | int) and 0 < dp_delta <= MAX_DP_DELTA):
        raise InvalidFederationConfig(f"dp_delta must be in (0, {MAX_DP_DELTA}], got {dp_delta!r}.")
    if plan.dp is None:
        return
    if node_epsilon_budget is None or not (math.isfinite(node_epsilon_budget) and node_epsilon_budget > 0):
        raise InvalidFederationConfig(f"A federation with local DP needs a positive finite node_epsilon_budget, got {node_epsilon_budget!r}.")
