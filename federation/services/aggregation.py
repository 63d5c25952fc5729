"""Aggregating a round exactly once and writing the next model version."""

import logging
import math
import time
from collections import defaultdict

import numpy as np
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from federation.aggregation.fedavg import AggregationError, apply_update
from federation.aggregation.kernels import RowStack, Stack, float32_squared_distances_to
from federation.aggregation.reputation import score_accepted_updates
from federation.aggregation.robust import aggregate_updates, fedavg_with_distances, unflatten_vector
from federation.aggregation.server_optimizers import server_step
from federation.models import Federation, ModelUpdate, ModelVersion, Node, TrainingRound
from federation.queries import describe_rule, rule_config_for, server_optimizer_config_for
from federation.services import update_store
from federation.services.audit import record_audit
from federation.services.locks import lock_federation
from federation.services.reputation import update_reputations
from federation.services.rounds import fail_round, open_next_round
from federation.services.weights import load_weights, store_model_version
from flo_client import wire
from flo_client.models import tensor_specs
from monitoring import metrics
from monitoring.console import round_epsilon
from monitoring.events import publish_on_commit
from privacy.adaptive_clipping import update_clip_norm
from privacy.central_dp import dp_fedavg_aggregate_stack
from privacy.exceptions import CentralBudgetExhausted
from privacy.noise import secure_generator
from privacy.services.central import adaptive_clipping_config, record_central_spend, update_noise_multiplier

logger = logging.getLogger(__name__)

# The columns that locate an update's payload in the update store, with its
# round, which the round's related manager reads on every row it loads.
PAYLOAD_FIELDS = ("round_id", "payload_file", "payload_bytes")
FLOAT32 = np.dtype("<f4")


def aggregate_round(round_id: int) -> ModelVersion | None:
    """Aggregate an AGGREGATING round into a new model version and close it.

    Idempotent: the round row is locked and its state re-read, so a second
    delivery of the same task finds the round closed and does nothing. The
    new version, the round's state and reputations commit in one transaction.

    Returns:
        The new model version, or None when the round was already settled or failed.
    """
    started = time.monotonic()
    with transaction.atomic():
        training_round = TrainingRound.objects.select_for_update(no_key=True).select_related("federation", "base_version").get(id=round_id)
        if training_round.state != TrainingRound.State.AGGREGATING:
            logger.info("round already settled federation=%s round=%d state=%s", training_round.federation_id, training_round.number, training_round.state)
            return None
        federation = training_round.federation
        # Updates from nodes revoked or quarantined after submitting are left out.
        excluded = _reject_updates_from_inactive_nodes(training_round)
        accepted = training_round.updates.filter(status=ModelUpdate.Status.ACCEPTED)
        try:
            distance_by_node = None
            if federation.central_dp:
                average = _aggregate_with_central_dp(training_round, accepted)
                kept_by_node = None
            else:
                average, kept_by_node, distance_by_node = _aggregate_with_rule(federation, accepted)
            weights = _apply_server_optimizer(federation, load_weights(training_round.base_version), average)
        except (AggregationError, CentralBudgetExhausted, ValueError) as error:
            reason = f"Aggregation failed: {error}"
            transaction.on_commit(lambda: fail_round(round_id, reason, from_state=TrainingRound.State.AGGREGATING))
            logger.warning("aggregation failed federation=%s round=%d reason=%s", federation.id, training_round.number, error)
            return None

        counts = list(accepted.values_list("num_examples", flat=True))
        evaluation = _record_federated_evaluation(training_round.base_version, accepted)
        latest = ModelVersion.objects.filter(federation=federation).order_by("-version").values_list("version", flat=True).first()
        version = store_model_version(federation, version=latest + 1, weights=weights, num_updates=len(counts), total_examples=sum(counts))
        quarantined = update_reputations(training_round, _score_updates(training_round, accepted, kept_by_node, distance_by_node))
        training_round.state = TrainingRound.State.CLOSED
        training_round.result_version = version
        training_round.closed_at = timezone.now()
        training_round.aggregation_report = _report(federation, kept_by_node, quarantined)
        training_round.save(update_fields=["state", "result_version", "closed_at", "aggregation_report"])
        record_audit(
            "round.closed",
            federation=federation,
            target=f"round:{training_round.number}",
            details={"version": version.version, "updates": len(counts), "excluded": excluded, "total_examples": sum(counts), **training_round.aggregation_report},
        )
        _publish_round_closed(training_round, version, evaluation=evaluation, excluded=excluded)
        transaction.on_commit(lambda: open_next_round(federation.id))
        if settings.FLO_FAULT_AGGREGATION_PAUSE_SECONDS:
            # Everything is written but not committed: a worker killed now must leave no trace.
            logger.warning("aggregation paused for a fault test round_id=%d seconds=%d", round_id, settings.FLO_FAULT_AGGREGATION_PAUSE_SECONDS)
            time.sleep(settings.FLO_FAULT_AGGREGATION_PAUSE_SECONDS)

    duration_ms = (time.monotonic() - started) * 1000
    metrics.AGGREGATION_SECONDS.observe(duration_ms / 1000)
    logger.info(
        "round closed federation=%s round=%d version=%d updates=%d duration_ms=%.1f",
        federation.id,
        training_round.number,
        version.version,
        len(counts),
        duration_ms,
    )
    return version


def _record_federated_evaluation(base_version: ModelVersion, accepted) -> dict[str, float]:
    """Store the example-weighted mean of the metrics that devices reported with their updates on the round's base version.

    Devices evaluate the model version they downloaded on their own
    held-out data before training, so the mean describes the base version,
    and version N gets its metrics when round N + 1 closes. Metrics already
    stored on the version are kept.

    NOTE: these metrics come from the devices unnoised, so no DP guarantee
    covers them, as for the per-update metrics the server already stores.
    """
    totals: dict[str, float] = defaultdict(float)
    examples: dict[str, int] = defaultdict(int)
    for num_examples, reported in accepted.values_list("num_examples", "metrics"):
        for name, value in (reported or {}).items():
            totals[name] += value * num_examples
            examples[name] += num_examples
    evaluation = {name: totals[name] / examples[name] for name in sorted(totals)}
    if evaluation:
        base_version.metrics = {**evaluation, **base_version.metrics}
        base_version.save(update_fields=["metrics"])
    return evaluation


def _publish_round_closed(training_round: TrainingRound, version: ModelVersion, *, evaluation: dict[str, float], excluded: int) -> None:
    """Publish round.closed and model_version.written once the round's transaction commits."""
    federation_id = training_round.federation_id
    base_version = training_round.base_version.version
    publish_on_commit(
        federation_id,
        "round.closed",
        lambda: {
            "round": training_round.number,
            "version": version.version,
            "updates": version.num_updates,
            "excluded": excluded,
            "evaluated_version": base_version,
            "metrics": evaluation,
            "epsilon": round_epsilon(training_round),
            "quarantined_node_ids": training_round.aggregation_report.get("quarantined_node_ids", []),
        },
    )
    publish_on_commit(
        federation_id,
        "model_version.written",
        {"version": version.version, "num_updates": version.num_updates, "total_examples": version.total_examples},
    )


def _aggregate_with_central_dp(training_round: TrainingRound, accepted) -> dict:
    """User-level DP-FedAvg: clip, sum, noise once, divide by q * population, charge the federation.

    Precondition: the caller holds the round lock in the transaction that
    writes the model version; this takes the federation lock as well, so
    the clip-norm update and the spend are serialised per federation.
    """
    federation = lock_federation(training_round.federation_id)
    specs = tensor_specs(federation.model_spec)
    _, _, stack = _read_updates_or_none(accepted, specs)
    # Poisson sampling can leave a round without updates; it still releases noise.
    if stack is None:
        stack = np.zeros((0, sum(math.prod(spec.shape) for spec in specs)), dtype=np.float32)
    rng = secure_generator()
    result = dp_fedavg_aggregate_stack(
        stack,
        tensor_shapes={spec.name: spec.shape for spec in specs},
        clip_norm=training_round.clip_norm,
        noise_multiplier=update_noise_multiplier(federation),
        expected_participants=training_round.expected_participants,
        rng=rng,
    )
    config = adaptive_clipping_config(federation)
    if config is not None:
        new_clip_norm = update_clip_norm(
            clip_norm=training_round.clip_norm, norms=result.norms, config=config, expected_participants=training_round.expected_participants, rng=rng
        )
        Federation.objects.filter(id=federation.id).update(clip_norm=new_clip_norm)
    training_round.num_clipped = result.num_clipped
    training_round.save(update_fields=["num_clipped"])
    record_central_spend(federation=federation, training_round=training_round)
    return result.mean


def _aggregate_with_rule(federation: Federation, accepted) -> tuple[dict, dict | None, dict]:
    """Aggregate with the federation's rule.

    Returns:
        (average, kept_by_node, distance_by_node): the new average; each
        node's kept share, or None when the rule credits no one; and each
        node's L2 distance to the average.

    Every rule, FedAvg included, reads the memory-mapped payloads as one
    strided array over the mappings or as the rows of a `RowStack`, row by
    row or one column block at a time, so no update is copied whole and no
    (n_updates, n_params) array is allocated.
    """
    specs = tensor_specs(federation.model_spec)
    names = [spec.name for spec in specs]
    node_ids, counts, stack = _read_update_stack(accepted, specs)
    config = rule_config_for(federation)
    shapes = {spec.name: spec.shape for spec in specs}
    if config.name == Federation.AggregationRule.FEDAVG:
        # The average and the distances, without gathering the payloads (kernels.weighted_mean_and_distances).
        result, squared_distances = fedavg_with_distances(stack, num_examples=counts)
        average = unflatten_vector(result.aggregate, shapes)
    else:
        result = aggregate_updates(stack, num_examples=counts, config=config)
        average = unflatten_vector(result.aggregate, shapes)
        # The average is float32, so the float32 differences are exact to one rounding; reputation needs no more.
        squared_distances, _ = float32_squared_distances_to(stack, np.concatenate([average[name].reshape(-1) for name in names]))
    distances = np.sqrt(squared_distances)
    distance_by_node = dict(zip(node_ids, (float(value) for value in distances), strict=True))
    if result.kept_fraction is None:
        return average, None, distance_by_node
    return average, dict(zip(node_ids, (float(value) for value in result.kept_fraction), strict=True)), distance_by_node


def _read_update_stack(accepted, specs: list) -> tuple[list, list[int], Stack]:
    """Map the accepted updates, ordered by node, as the float32 rows of one array or of a RowStack.

    A payload that contains the model's tensors in the model's order as
    float32, as devices send them, becomes a row without a copy: a view of
    its mapped file. Any other valid payload is checked tensor by tensor and
    copied into a float32 row. On Linux the payloads are mapped into one
    address range (`update_store.PayloadRange`), and where every row is a
    view at the same offset of its payload, the rows form one strided array,
    which the kernels read faster than a RowStack.

    Precondition: the caller holds the round lock, so no update is added while this reads.

    Raises:
        AggregationError: no updates, or an update whose payload cannot be
            read or whose tensors differ from the model's.
    """
    node_ids, counts, stack = _read_updates_or_none(accepted, specs)
    if stack is None:
        raise AggregationError("No updates to aggregate.")
    return node_ids, counts, stack


def _read_updates_or_none(accepted, specs: list) -> tuple[list, list[int], Stack | None]:
    """Return the node ids, example counts and stack of the accepted updates as `_read_update_stack` does, with None for no updates."""
    layout = [(spec.name, tuple(spec.shape)) for spec in specs]
    updates = list(accepted.only("node_id", *PAYLOAD_FIELDS, "num_examples").order_by("node_id"))
    if not updates:
        return [], [], None
    node_ids = [update.node_id for update in updates]
    counts = [update.num_examples for update in updates]
    payloads = _map_payload_range(updates)
    if payloads is not None:
        rows = [_read_flat_update(update, specs, layout, payloads.payload(index)) for index, update in enumerate(updates)]
        array = _rows_as_array(payloads, rows)
        return node_ids, counts, array if array is not None else RowStack(rows)
    # Every mapping keeps a file descriptor open while the rows are in use.
    # Without room for all of them, the payloads are read into memory.
    mapped = update_store.reserve_descriptors(len(updates))
    rows = [_read_flat_update(update, specs, layout, _read_payload(update, mapped=mapped)) for update in updates]
    return node_ids, counts, RowStack(rows)


def _map_payload_range(updates: list[ModelUpdate]) -> update_store.PayloadRange | None:
    """Map the updates' payloads into one address range, or return None where that fails or the platform lacks it, so each is mapped on its own."""
    if not update_store.PayloadRange.available():
        return None
    try:
        return update_store.PayloadRange([update.payload_file for update in updates], [update.payload_bytes for update in updates])
    except (update_store.PayloadMissing, OSError) as error:
        # Mapping each payload on its own names the update whose payload is missing, or works where the range does not.
        federation_id, round_number = TrainingRound.objects.values_list("federation_id", "number").get(id=updates[0].round_id)
        logger.warning("payloads not mapped into one range federation=%s round=%s updates=%d error=%s", federation_id, round_number, len(updates), error)
        return None


def _rows_as_array(payloads: update_store.PayloadRange, rows: list[np.ndarray]) -> np.ndarray | None:
    """Return the rows as one strided array over `payloads` when each is a view at the same offset of its payload, else None."""
    offsets = {row.__array_interface__["data"][0] - payloads.base - index * payloads.stride for index, row in enumerate(rows)}
    if len(offsets) != 1:
        return None
    offset = offsets.pop()
    # Another encoder may leave the data unaligned, and PayloadRange.rows takes only whole float32 values.
    if not 0 <= offset < payloads.stride or offset % FLOAT32.itemsize:
        return None
    return payloads.rows(offset, rows[0].size, FLOAT32)


def _read_flat_update(update: ModelUpdate, specs: list, layout: list, payload) -> np.ndarray:
    """Return the values of an update's payload as one flat float32 array, in the order of `specs`."""
    try:
        _, flat = wire.decode_flat(payload, tensors=layout, dtype=FLOAT32)
        if flat is not None:
            return flat
        _, tensors = wire.decode_tensors(payload)
    except wire.WireFormatError as error:
        raise AggregationError(f"The payload of the update from node {update.node_id} cannot be read: {error}") from error
    if set(tensors) != {spec.name for spec in specs}:
        raise AggregationError(f"Update from node {update.node_id} has tensors {sorted(tensors)}, expected {sorted(spec.name for spec in specs)}.")
    for spec in specs:
        if tensors[spec.name].shape != spec.shape:
            raise AggregationError(f"Update from node {update.node_id} has tensor {spec.name!r} of shape {tensors[spec.name].shape}, expected {spec.shape}.")
    # A float64 value beyond the float32 range becomes inf, which the rules reject.
    with np.errstate(over="ignore"):
        return np.concatenate([tensors[spec.name].reshape(-1).astype(np.float32) for spec in specs])


def _score_updates(training_round: TrainingRound, accepted, kept_by_node: dict | None, distance_by_node: dict | None) -> dict:
    """Return node id -> UpdateOutcome for the accepted updates, from their distance to the average, kept share and arrival time.

    Distances come from the aggregation (`distance_by_node`); central DP
    gives none, and its updates are scored by arrival time only.
    """
    window_seconds = max((training_round.deadline_at - training_round.opened_at).total_seconds(), 1e-3)
    node_ids, distances, elapsed = [], [], []
    for update in accepted.only("round_id", "node_id", "received_at").order_by("node_id").iterator(chunk_size=256):
        node_ids.append(update.node_id)
        elapsed.append(min(1.0, max(0.0, (update.received_at - training_round.opened_at).total_seconds() / window_seconds)))
        if distance_by_node is not None:
            distances.append(distance_by_node[update.node_id])
    if not node_ids:
        return {}
    # FedAvg keeps every update whole, so its kept share is the same for every node and carries no signal.
    kept = None if kept_by_node is None or training_round.federation.aggregation_rule == Federation.AggregationRule.FEDAVG else np.array([kept_by_node[node_id] for node_id in node_ids])
    outcomes = score_accepted_updates(distances=np.array(distances) if distances else None, kept_fraction=kept, elapsed_fraction=np.array(elapsed))
    return dict(zip(node_ids, outcomes, strict=True))


def _report(federation: Federation, kept_by_node: dict | None, quarantined: list[str]) -> dict:
    description = describe_rule(federation)
    selected = None
    if description["selects_updates"] and kept_by_node is not None:
        selected = sorted(str(node_id) for node_id, kept in kept_by_node.items() if kept > 0)
    return {**description, "selected_node_ids": selected, "quarantined_node_ids": quarantined}


def _apply_server_optimizer(federation: Federation, base: dict, average: dict) -> dict:
    """Move the base weights by the server optimizer's step and store its new state.

    Precondition: inside the round's transaction, so the state commits
    with the model version it produced.
    """
    stored = Federation.objects.values_list("server_optimizer_state", flat=True).get(id=federation.id)
    state = None
    if stored is not None:
        _, state = wire.decode_tensors(bytes(stored))
    step, new_state = server_step(server_optimizer_config_for(federation), average, state)
    weights = apply_update(base, step)
    Federation.objects.filter(id=federation.id).update(server_optimizer_state=wire.encode_tensors(new_state) if new_state else None)
    return weights


def _read_payload(update: ModelUpdate, *, mapped: bool):
    try:
        return update_store.read_payload(update.payload_file, expected_bytes=update.payload_bytes, mapped=mapped)
    except (update_store.PayloadMissing, OSError) as error:
        raise AggregationError(f"The payload of the update from node {update.node_id} cannot be read: {error}") from error


def _reject_updates_from_inactive_nodes(training_round: TrainingRound) -> int:
    return (
        training_round.updates.filter(status=ModelUpdate.Status.ACCEPTED)
        .exclude(node__status=Node.Status.ACTIVE)
        .update(status=ModelUpdate.Status.REJECTED, rejection_reason="The node was revoked or quarantined before aggregation.")
    )
