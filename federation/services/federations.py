"""Creating and starting federations."""

import dataclasses
import logging
import math

import numpy as np
from django.db import transaction

from federation.aggregation.robust import RuleConfig, RulePreconditionError, check_preconditions
from federation.aggregation.server_optimizers import ServerOptimizerConfig
from federation.exceptions import InvalidFederationConfig
from federation.models import Federation, Node
from federation.services.audit import record_audit
from federation.services.rounds import describe_too_few_eligible, list_eligible_nodes, open_next_round
from federation.services.weights import store_model_version
from flo_client.models import initial_weights, validate_model_spec
from flo_client.training import TrainingPlan
from monitoring.events import publish_on_commit
from privacy.adaptive_clipping import AdaptiveClippingConfig, update_noise_multiplier_for
from privacy.schedules import noise_schedule
from privacy.services.central import calibrate_central_noise

logger = logging.getLogger(__name__)

# Above this delta an (epsilon, delta) guarantee allows a noticeable chance
# of total disclosure; the usual rule is delta well below 1/population.
MAX_DP_DELTA = 1e-3
SPENDING_SCHEDULES = ("even", "front_loaded")
# Upper bound on planned_participations: the front-loaded schedule composes
# one distinct event per participation when it is calibrated.
MAX_PLANNED_PARTICIPATIONS = 1000


CENTRAL_DP_KEYS = {"target_epsilon", "participation_rate", "clip_norm", "adaptive_clipping", "accountant"}
ACCOUNTANTS = ("pld", "rdp")


def create_federation(
    *,
    name: str,
    model_spec: dict,
    training_plan: dict,
    round_size: int | None = None,
    min_updates: int | None = None,
    target_updates: int | None = None,
    aggregation_rule: str = "fedavg",
    aggregation_params: dict | None = None,
    quarantine_threshold: float | None = None,
    round_deadline_seconds: int = 600,
    max_rounds: int = 100,
    dp_delta: float = 1e-5,
    node_epsilon_budget: float | None = None,
    sensitivity_budgets: dict | None = None,
    spending_schedule: str = "even",
    planned_participations: int | None = None,
    central_dp: dict | None = None,
    server_learning_rate: float = 1.0,
    server_momentum: float = 0.0,
    server_optimizer: str = "fedavgm",
    server_optimizer_params: dict | None = None,
    node_liveness_seconds: int = 3600,
    selection_seed: int = 0,
    max_nodes: int | None = None,
    actor=None,
    remote_addr: str | None = None,
) -> Federation:
    """Validate a configuration and store a draft federation with its initial model (version 0).

    With `central_dp` (keys: target_epsilon, participation_rate, clip_norm,
    and optionally adaptive_clipping and accountant) the
    noise multiplier is calibrated here, so the operator sees it before the
    federation starts. Central DP samples each round's participants with
    probability participation_rate, so round_size and min_updates do not
    apply and may be left out.

    The aggregation rule's preconditions must hold for min_updates, the
    fewest updates a round may aggregate: Krum with f=1, for example,
    needs min_updates >= 5.

    Raises:
        InvalidFederationConfig: naming the invalid setting.
    """
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidFederationConfig(f"name must be a non-empty string of at most 200 characters, got {str(name)[:40]!r}.")
    if Federation.objects.filter(name=name).exists():
        raise InvalidFederationConfig(f"A federation named {name!r} already exists; choose another name.")
    try:
        model_spec = validate_model_spec(model_spec)
        plan = TrainingPlan.from_dict(training_plan)
    except (TypeError, ValueError) as error:
        raise InvalidFederationConfig(str(error)) from error
    if central_dp is not None:
        round_size = 1 if round_size is None else round_size
        min_updates = 1 if min_updates is None else min_updates
    _check_round_settings(
        round_size=round_size,
        min_updates=min_updates,
        round_deadline_seconds=round_deadline_seconds,
        max_rounds=max_rounds,
        node_liveness_seconds=node_liveness_seconds,
    )
    if max_nodes is not None and (isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1):
        raise InvalidFederationConfig(f"max_nodes must be a positive integer or null, got {str(max_nodes)[:40]!r}.")
    if max_nodes is not None and max_nodes < round_size:
        raise InvalidFederationConfig(f"max_nodes ({max_nodes}) cannot be below round_size ({round_size}), or no round could ever be filled.")
    if isinstance(selection_seed, bool) or not isinstance(selection_seed, int):
        raise InvalidFederationConfig(f"selection_seed must be an integer, got {selection_seed!r}.")
    _check_privacy_settings(plan=plan, dp_delta=dp_delta, node_epsilon_budget=node_epsilon_budget, has_class_budgets=bool(sensitivity_budgets))
    sensitivity_budgets = _check_sensitivity_budgets(sensitivity_budgets or {}, plan=plan, spending_schedule=spending_schedule)
    if planned_participations is not None and (isinstance(planned_participations, bool) or not isinstance(planned_participations, int) or planned_participations < 1):
        raise InvalidFederationConfig(f"planned_participations must be a positive integer, got {planned_participations!r}.")
    if planned_participations is not None and plan.dp is None:
        raise InvalidFederationConfig("planned_participations needs record-level DP in the training plan.")
    if planned_participations is not None and planned_participations > MAX_PLANNED_PARTICIPATIONS:
        raise InvalidFederationConfig(f"planned_participations must be at most {MAX_PLANNED_PARTICIPATIONS}, got {planned_participations}.")
    if spending_schedule != "even" and planned_participations is None:
        raise InvalidFederationConfig(f"spending_schedule {spending_schedule!r} needs planned_participations, the number of participations it spreads the budget over.")
    if planned_participations is not None:
        allocations = {*sensitivity_budgets.values(), *([node_epsilon_budget] if node_epsilon_budget is not None else [])}
        _check_schedules_fit(plan, dp_delta=dp_delta, planned_participations=planned_participations, spending_schedule=spending_schedule, allocations=allocations)
    central_fields = _configure_central_dp(central_dp, dp_delta=dp_delta, max_rounds=max_rounds) if central_dp is not None else {}
    if not _is_positive_finite(server_learning_rate):
        raise InvalidFederationConfig(f"server_learning_rate must be a positive finite number, got {server_learning_rate!r}.")
    if not _is_number(server_momentum) or not 0 <= server_momentum < 1:
        raise InvalidFederationConfig(f"server_momentum must be in [0, 1), got {server_momentum!r}.")
    optimizer = _check_server_optimizer(server_optimizer, server_optimizer_params, learning_rate=server_learning_rate, momentum=server_momentum)
    rule = _check_aggregation_rule(aggregation_rule, aggregation_params, min_updates=min_updates, central_dp=central_dp is not None)
    _check_target_updates(target_updates, min_updates=min_updates, round_size=round_size)
    if quarantine_threshold is not None and not (_is_number(quarantine_threshold) and 0 < quarantine_threshold < 1):
        raise InvalidFederationConfig(f"quarantine_threshold must be in (0, 1) or null, got {quarantine_threshold!r}.")

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
            sensitivity_budgets=sensitivity_budgets,
            spending_schedule=spending_schedule,
            planned_participations=planned_participations,
            target_updates=target_updates,
            aggregation_rule=rule.name,
            aggregation_params=rule.parameters(),
            quarantine_threshold=quarantine_threshold,
            server_optimizer=optimizer.name,
            server_learning_rate=optimizer.learning_rate,
            server_momentum=optimizer.momentum,
            server_optimizer_params={key: value for key, value in optimizer.to_dict().items() if key not in ("name", "learning_rate", "momentum")},
            node_liveness_seconds=node_liveness_seconds,
            selection_seed=selection_seed,
            max_nodes=max_nodes,
            **central_fields,
        )
        weights = initial_weights(model_spec, np.random.default_rng(selection_seed))
        store_model_version(federation, version=0, weights=weights)
        record_audit(
            "federation.created",
            federation=federation,
            actor=actor,
            target=f"federation:{federation.id}",
            details={"name": name, "central_noise_multiplier": central_fields.get("central_noise_multiplier")},
            remote_addr=remote_addr,
        )
    logger.info("federation created federation=%s name=%s central_dp=%s", federation.id, name, central_dp is not None)
    return federation


def start_federation(federation: Federation, *, actor=None, remote_addr: str | None = None) -> None:
    """Move a draft or paused federation to running and open its next round."""
    federation.refresh_from_db()
    needed = 1 if federation.central_dp else federation.min_updates
    eligible = len(list_eligible_nodes(federation))
    if federation.status in (Federation.Status.DRAFT, Federation.Status.PAUSED) and eligible < needed:
        raise InvalidFederationConfig(f"Federation {federation.id} cannot open a round: {describe_too_few_eligible(federation, eligible)} Enrol more devices or raise the allocations, then start it.")
    with transaction.atomic():
        updated = Federation.objects.filter(id=federation.id, status__in=[Federation.Status.DRAFT, Federation.Status.PAUSED]).update(
            status=Federation.Status.RUNNING, status_reason=""
        )
        if not updated:
            federation.refresh_from_db()
            raise InvalidFederationConfig(f"Federation {federation.id} is {federation.status}; only a draft or paused federation can start.")
        record_audit("federation.started", federation=federation, actor=actor, target=f"federation:{federation.id}", remote_addr=remote_addr)
        publish_on_commit(federation.id, "federation.status", {"status": Federation.Status.RUNNING, "reason": ""})
        transaction.on_commit(lambda: open_next_round(federation.id))
    logger.info("federation started federation=%s", federation.id)


def _check_round_settings(*, round_size: int, min_updates: int, round_deadline_seconds: int, max_rounds: int, node_liveness_seconds: int) -> None:
    for label, value in (
        ("round_size", round_size),
        ("min_updates", min_updates),
        ("round_deadline_seconds", round_deadline_seconds),
        ("max_rounds", max_rounds),
        ("node_liveness_seconds", node_liveness_seconds),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidFederationConfig(f"{label} must be a positive integer, got {value!r}.")
    if min_updates > round_size:
        raise InvalidFederationConfig(f"min_updates ({min_updates}) cannot exceed round_size ({round_size}).")


def _check_aggregation_rule(name, params, *, min_updates: int, central_dp: bool) -> RuleConfig:
    if not isinstance(params, dict | type(None)):
        raise InvalidFederationConfig(f"aggregation_params must be an object, got {type(params).__name__}.")
    if params and "name" in params:
        raise InvalidFederationConfig("aggregation_params must not contain 'name'; set the rule with aggregation_rule.")
    try:
        rule = RuleConfig.from_dict({"name": name, **(params or {})})
    except (TypeError, ValueError) as error:
        raise InvalidFederationConfig(f"Invalid aggregation rule: {error}") from error
    if central_dp and rule.name != "fedavg":
        raise InvalidFederationConfig(
            f"aggregation_rule {rule.name!r} cannot run with central DP: its sensitivity analysis covers the clipped sum of updates (fedavg) only."
        )
    if not central_dp:
        try:
            check_preconditions(rule, min_updates)
        except RulePreconditionError as error:
            raise InvalidFederationConfig(f"{error} A round may close with min_updates={min_updates} updates; raise min_updates or lower the tolerated f.") from error
    return rule


def _check_server_optimizer(name, params, *, learning_rate: float, momentum: float) -> ServerOptimizerConfig:
    if not isinstance(params, dict | type(None)):
        raise InvalidFederationConfig(f"server_optimizer_params must be an object, got {type(params).__name__}.")
    reserved = {"name", "learning_rate", "momentum"} & set(params or {})
    if reserved:
        raise InvalidFederationConfig(f"Set {', '.join(sorted(reserved))} with server_optimizer, server_learning_rate and server_momentum, not in server_optimizer_params.")
    try:
        return ServerOptimizerConfig.from_dict({"name": name, "learning_rate": learning_rate, "momentum": momentum, **(params or {})})
    except (TypeError, ValueError) as error:
        raise InvalidFederationConfig(f"Invalid server optimizer: {error}") from error


def _check_target_updates(target_updates, *, min_updates: int, round_size: int) -> None:
    if target_updates is None:
        return
    if isinstance(target_updates, bool) or not isinstance(target_updates, int) or not min_updates <= target_updates <= round_size:
        raise InvalidFederationConfig(f"target_updates must be an integer from min_updates ({min_updates}) to round_size ({round_size}), got {target_updates!r}.")


def _check_privacy_settings(*, plan: TrainingPlan, dp_delta: float, node_epsilon_budget: float | None, has_class_budgets: bool) -> None:
    if isinstance(dp_delta, bool) or not (isinstance(dp_delta, float | int) and 0 < dp_delta <= MAX_DP_DELTA):
        raise InvalidFederationConfig(f"dp_delta must be in (0, {MAX_DP_DELTA}], got {dp_delta!r}.")
    if plan.dp is None:
        return
    if node_epsilon_budget is None:
        if not has_class_budgets:
            raise InvalidFederationConfig("A federation with local DP needs node_epsilon_budget or sensitivity_budgets.")
        return
    if not _is_positive_finite(node_epsilon_budget):
        raise InvalidFederationConfig(f"node_epsilon_budget must be a positive finite number, got {node_epsilon_budget!r}.")


def _configure_central_dp(settings: dict, *, dp_delta: float, max_rounds: int) -> dict:
    """Validate central DP settings and calibrate the noise multiplier for them."""
    if not isinstance(settings, dict):
        raise InvalidFederationConfig(f"central_dp must be an object with the keys {', '.join(sorted(CENTRAL_DP_KEYS))}.")
    unknown = set(settings) - CENTRAL_DP_KEYS
    if unknown:
        raise InvalidFederationConfig(f"Unknown central_dp settings: {', '.join(sorted(unknown))}; allowed are {', '.join(sorted(CENTRAL_DP_KEYS))}.")
    target_epsilon = _positive_finite(settings, "target_epsilon")
    participation_rate = _positive_finite(settings, "participation_rate")
    if participation_rate > 1:
        raise InvalidFederationConfig(f"central_dp.participation_rate must be in (0, 1], got {participation_rate}.")
    clip_norm = _positive_finite(settings, "clip_norm")
    accountant = settings.get("accountant", "pld")
    if accountant not in ACCOUNTANTS:
        raise InvalidFederationConfig(f"central_dp.accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}.")

    try:
        noise_multiplier = calibrate_central_noise(
            target_epsilon=target_epsilon, delta=dp_delta, participation_rate=participation_rate, rounds=max_rounds, accountant=accountant
        )
    except ValueError as error:
        raise InvalidFederationConfig(f"Cannot calibrate noise for the central DP target: {error}") from error

    adaptive = settings.get("adaptive_clipping")
    if adaptive is not None:
        adaptive_keys = {field.name for field in dataclasses.fields(AdaptiveClippingConfig)}
        if not isinstance(adaptive, dict) or not set(adaptive) <= adaptive_keys:
            raise InvalidFederationConfig(f"central_dp.adaptive_clipping must be an object with the keys {', '.join(sorted(adaptive_keys))}.")
        try:
            config = AdaptiveClippingConfig(**adaptive)
            update_noise_multiplier_for(target_noise_multiplier=noise_multiplier, count_noise_multiplier=config.count_noise_multiplier)
        except (TypeError, ValueError) as error:
            raise InvalidFederationConfig(f"Invalid central_dp.adaptive_clipping: {error}") from error
        adaptive = dataclasses.asdict(config)
    return {
        "central_dp": True,
        "target_epsilon": target_epsilon,
        "participation_rate": participation_rate,
        "clip_norm": clip_norm,
        "adaptive_clipping": adaptive,
        "accountant": accountant,
        "central_noise_multiplier": noise_multiplier,
    }


def _positive_finite(settings: dict, key: str) -> float:
    value = settings.get(key)
    if not _is_positive_finite(value):
        raise InvalidFederationConfig(f"central_dp.{key} must be a positive finite number, got {value!r}.")
    return float(value)


def _check_sensitivity_budgets(budgets: dict, *, plan: TrainingPlan, spending_schedule: str) -> dict:
    """Validate per-class epsilon allocations (record-level DP) and the spending schedule."""
    if spending_schedule not in SPENDING_SCHEDULES:
        raise InvalidFederationConfig(f"spending_schedule must be one of {', '.join(SPENDING_SCHEDULES)}, got {spending_schedule!r}.")
    if not isinstance(budgets, dict):
        raise InvalidFederationConfig("sensitivity_budgets must map sensitivity classes to epsilon allocations.")
    if budgets and plan.dp is None:
        raise InvalidFederationConfig("sensitivity_budgets need record-level DP in the training plan.")
    classes = set(Node.SensitivityClass.values)
    for sensitivity_class, epsilon in budgets.items():
        if sensitivity_class not in classes:
            raise InvalidFederationConfig(f"Unknown sensitivity class {sensitivity_class!r}; use {', '.join(sorted(classes))}.")
        if not _is_positive_finite(epsilon):
            raise InvalidFederationConfig(f"The epsilon allocation of class {sensitivity_class!r} must be a positive finite number, got {epsilon!r}.")
    return {key: float(value) for key, value in budgets.items()}


def _check_schedules_fit(plan: TrainingPlan, *, dp_delta: float, planned_participations: int, spending_schedule: str, allocations: set) -> None:
    """Calibrate every allocation's noise schedule now, so an impossible one fails at configuration, not at round selection."""
    if plan.dp is None:
        return
    for allocation in sorted(allocations):
        try:
            noise_schedule(
                epsilon=float(allocation),
                delta=dp_delta,
                sampling_rate=plan.dp.sampling_rate,
                steps=plan.dp.local_steps,
                participations=planned_participations,
                schedule=spending_schedule,
            )
        except ValueError as error:
            raise InvalidFederationConfig(f"The allocation epsilon {allocation} cannot follow the {spending_schedule} schedule: {error}") from error


def _is_number(value) -> bool:
    # bool is an int subclass, so True would pass as 1 without this check.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_positive_finite(value) -> bool:
    return _is_number(value) and math.isfinite(value) and value > 0
