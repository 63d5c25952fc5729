"""Per-node privacy budgets: planned cost of a round, checks and spends."""

import logging
from collections import defaultdict
from collections.abc import Iterable

from privacy.accounting import DpSgdEvent, compose_epsilon
from privacy.exceptions import BudgetExhausted
from privacy.models import PrivacyBudget, PrivacyLedgerEntry

logger = logging.getLogger(__name__)


def planned_event(federation) -> DpSgdEvent | None:
    """Return the DP-SGD event one participation costs, or None without local DP."""
    dp = (federation.training_plan or {}).get("dp")
    if not dp:
        return None
    return DpSgdEvent(
        noise_multiplier=float(dp["noise_multiplier"]),
        sampling_rate=float(dp["sampling_rate"]),
        steps=int(dp["local_steps"]),
    )


def create_budget(node) -> PrivacyBudget | None:
    """Create the node's budget from its federation's allocation, if it has local DP."""
    federation = node.federation
    if planned_event(federation) is None or federation.node_epsilon_budget is None:
        return None
    return PrivacyBudget.objects.create(node=node, epsilon_allocated=federation.node_epsilon_budget, delta=federation.dp_delta)


def find_nodes_that_can_afford_next_round(federation, nodes: Iterable) -> set:
    """Return the ids of `nodes` whose budget covers one more participation.

    Without local DP every node qualifies. The check composes each node's
    ledger with the planned event, the same computation `record_spend` makes.
    """
    nodes = list(nodes)
    event = planned_event(federation)
    if event is None:
        return {node.id for node in nodes}
    budgets = {budget.node_id: budget for budget in PrivacyBudget.objects.filter(node__in=nodes)}
    events_by_node = _ledger_events_by_node([node.id for node in nodes])
    affordable = set()
    for node in nodes:
        budget = budgets.get(node.id)
        if budget is None:
            continue
        epsilon_after = compose_epsilon([*events_by_node[node.id], event], delta=budget.delta)
        if epsilon_after <= budget.epsilon_allocated:
            affordable.add(node.id)
    return affordable


def record_spend(*, node, training_round) -> PrivacyLedgerEntry | None:
    """Charge the node for releasing an update in `training_round`.

    Precondition: the caller is inside a transaction that also stores the
    update, so the spend and the update commit together or not at all.

    Raises:
        BudgetExhausted: when the spend would exceed the allocation.
    """
    event = planned_event(node.federation)
    if event is None:
        return None
    budget = PrivacyBudget.objects.select_for_update().filter(node=node).first()
    if budget is None:
        raise BudgetExhausted(f"Node {node.id} has no privacy budget in a federation with record-level DP.")
    events = _ledger_events_by_node([node.id])[node.id]
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
    rows = PrivacyLedgerEntry.objects.filter(node_id__in=node_ids).values_list("node_id", "noise_multiplier", "sampling_rate", "steps")
    for node_id, noise_multiplier, sampling_rate, steps in rows:
        events[node_id].append(DpSgdEvent(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps))
    return events
