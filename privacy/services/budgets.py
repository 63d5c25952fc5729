"""Per-node privacy budgets for record-level DP: allocation, planned cost, checks and spends."""

import logging
from collections import defaultdict
from collections.abc import Iterable

from privacy.accounting import DpSgdEvent, compose_epsilon
from privacy.exceptions import BudgetExhausted
from privacy.models import PrivacyBudget, PrivacyLedgerEntry
from privacy.schedules import noise_schedule

logger = logging.getLogger(__name__)


def has_local_dp(federation) -> bool:
    return bool((federation.training_plan or {}).get("dp"))


def epsilon_allocation(federation, sensitivity_class: str) -> float | None:
    """Return the epsilon a node of this class may spend, or None if the federation sets none."""
    return federation.sensitivity_budgets.get(sensitivity_class, federation.node_epsilon_budget)


def planned_event(federation, *, allocation: float | None = None, participation_index: int = 0) -> DpSgdEvent | None:
    """Return the DP-SGD event of a node's next participation, or None without local DP.

    Without planned_participations every participation uses the training
    plan's noise multiplier, and the allocation caps how many a node gets.
    With it, the noise follows the federation's spending schedule so that
    the node's allocation lasts exactly that many participations; a node
    past them gets None, as its budget is spent.
    """
    dp = (federation.training_plan or {}).get("dp")
    if not dp:
        return None
    sampling_rate = float(dp["sampling_rate"])
    steps = int(dp["local_steps"])
    if federation.planned_participations is None or allocation is None:
        return DpSgdEvent(noise_multiplier=float(dp["noise_multiplier"]), sampling_rate=sampling_rate, steps=steps)
    if participation_index >= federation.planned_participations:
        return None
    schedule = noise_schedule(
        epsilon=allocation,
        delta=federation.dp_delta,
        sampling_rate=sampling_rate,
        steps=steps,
        participations=federation.planned_participations,
        schedule=federation.spending_schedule,
    )
    return DpSgdEvent(noise_multiplier=schedule[participation_index], sampling_rate=sampling_rate, steps=steps)


def next_event_for_node(node) -> DpSgdEvent | None:
    """Return the event a node's next participation would cost (its noise is sent in its task)."""
    federation = node.federation
    # Only a spending schedule depends on the node's allocation and past
    # participations; without one, no query is needed.
    if not has_local_dp(federation) or federation.planned_participations is None:
        return planned_event(federation)
    budget = PrivacyBudget.objects.filter(node=node).first()
    allocation = budget.epsilon_allocated if budget else None
    return planned_event(federation, allocation=allocation, participation_index=PrivacyLedgerEntry.objects.filter(node=node).count())


def create_budget(node) -> PrivacyBudget | None:
    """Create the node's budget from its class's allocation, if the federation has local DP."""
    federation = node.federation
    allocation = epsilon_allocation(federation, node.sensitivity_class)
    if not has_local_dp(federation) or allocation is None:
        return None
    return PrivacyBudget.objects.create(node=node, epsilon_allocated=allocation, delta=federation.dp_delta)


def find_nodes_that_can_afford_next_round(federation, nodes: Iterable) -> set:
    """Return the ids of `nodes` whose budget covers one more participation.

    Without local DP every node qualifies. The check composes each node's
    ledger with its next planned event, the same computation `record_spend` makes.
    """
    nodes = list(nodes)
    if not has_local_dp(federation):
        return {node.id for node in nodes}
    budgets = {budget.node_id: budget for budget in PrivacyBudget.objects.filter(node__in=nodes)}
    events_by_node = _ledger_events_by_node([node.id for node in nodes])
    affordable = set()
    for node in nodes:
        budget = budgets.get(node.id)
        if budget is None:
            continue
        events = events_by_node[node.id]
        event = planned_event(federation, allocation=budget.epsilon_allocated, participation_index=len(events))
        if event is not None and compose_epsilon([*events, event], delta=budget.delta) <= budget.epsilon_allocated:
            affordable.add(node.id)
    return affordable


def record_spend(*, node, training_round) -> PrivacyLedgerEntry | None:
    """Charge the node for releasing an update in `training_round`.

    Precondition: the caller is inside a transaction that also stores the
    update, so the spend and the update commit together. The budget row is
    locked first, so concurrent spends on one node run one after the other.

    Raises:
        BudgetExhausted: when the spend would exceed the allocation.
    """
    federation = node.federation
    if not has_local_dp(federation):
        return None
    budget = PrivacyBudget.objects.select_for_update(no_key=True).filter(node=node).first()
    if budget is None:
        raise BudgetExhausted(f"Node {node.id} has no privacy budget in a federation with record-level DP.")
    events = _ledger_events_by_node([node.id])[node.id]
    event = planned_event(federation, allocation=budget.epsilon_allocated, participation_index=len(events))
    if event is None:
        raise BudgetExhausted(f"Node {node.id} has used all {federation.planned_participations} planned participations of its budget.")
    epsilon_after = compose_epsilon([*events, event], delta=budget.delta)
    if epsilon_after > budget.epsilon_allocated:
        raise BudgetExhausted(
            f"This update would raise node {node.id}'s epsilon to {epsilon_after:.4f}, above its allocation of {budget.epsilon_allocated:.4f}.",
            extra={"epsilon_spent": budget.epsilon_spent, "epsilon_allocated": budget.epsilon_allocated},
        )
    entry = PrivacyLedgerEntry.objects.create(
        node=node,
        round=training_round,
        mechanism=PrivacyLedgerEntry.Mechanism.LOCAL_DP_SGD,
        noise_multiplier=event.noise_multiplier,
        sampling_rate=event.sampling_rate,
        steps=event.steps,
        delta=budget.delta,
        epsilon_after=epsilon_after,
    )
    budget.epsilon_spent = epsilon_after
    budget.save(update_fields=["epsilon_spent", "updated_at"])
    return entry


def _ledger_events_by_node(node_ids: list) -> dict:
    events = defaultdict(list)
    rows = PrivacyLedgerEntry.objects.filter(node_id__in=node_ids).order_by("id").values_list("node_id", "noise_multiplier", "sampling_rate", "steps")
    for node_id, noise_multiplier, sampling_rate, steps in rows:
        events[node_id].append(DpSgdEvent(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps))
    return events
