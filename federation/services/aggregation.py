"""Aggregating a round exactly once and writing the next model version."""

import logging
import time

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from federation.aggregation.fedavg import (
    AggregationError,
    apply_update,
    weighted_average,
)
from federation.aggregation.server_optimizers import momentum_step
from federation.models import Federation, ModelUpdate, ModelVersion, Node, Reputation, TrainingRound
from federation.services.audit import record_audit
from federation.services.rounds import fail_round, open_next_round
from federation.services.weights import load_weights, store_model_version
from flo_client import wire
from flo_client.models import tensor_specs
from privacy.adaptive_clipping import update_clip_norm
from privacy.central_dp import dp_fedavg_aggregate
from privacy.exceptions import CentralBudgetExhausted
from privacy.noise import secure_generator
from privacy.services.central import adaptive_clipping_config, record_central_spend, update_noise_multiplier

logger = logging.getLogger(__name__)

# Exponential moving average weight of the newest round in a reputation score.
REPUTATION_SMOOTHING = 0.2


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
        training_round = TrainingRound.objects.select_for_update().select_related("federation", "base_version").get(id=round_id)
        if training_round.state != TrainingRound.State.AGGREGATING:
            logger.info("round already settled federation=%s round=%d state=%s", training_round.federation_id, training_round.number, training_round.state)
            return None
        federation = training_round.federation
        # Updates from nodes revoked or quarantined after submitting are left out.
        excluded = _reject_updates_from_inactive_nodes(training_round)
        accepted = training_round.updates.filter(status=ModelUpdate.Status.ACCEPTED)
        names = [spec.name for spec in tensor_specs(federation.model_spec)]
        try:
            if federation.central_dp:
                average = _aggregate_with_central_dp(training_round, accepted)
            else:
                average = weighted_average(_stream_updates(accepted), tensor_names=names)
            weights = _apply_server_optimizer(federation, load_weights(training_round.base_version), average)
        except (AggregationError, CentralBudgetExhausted, ValueError) as error:
            reason = f"Aggregation failed: {error}"
            transaction.on_commit(lambda: fail_round(round_id, reason, from_state=TrainingRound.State.AGGREGATING))
            logger.warning("aggregation failed federation=%s round=%d reason=%s", federation.id, training_round.number, error)
            return None

        counts = list(accepted.values_list("num_examples", flat=True))
        latest = ModelVersion.objects.filter(federation=federation).order_by("-version").values_list("version", flat=True).first()
        version = store_model_version(federation, version=latest + 1, weights=weights, num_updates=len(counts), total_examples=sum(counts))
        training_round.state = TrainingRound.State.CLOSED
        training_round.result_version = version
        training_round.closed_at = timezone.now()
        training_round.save(update_fields=["state", "result_version", "closed_at"])
        _update_reputations(training_round)
        record_audit(
            "round.closed",
            federation=federation,
            target=f"round:{training_round.number}",
            details={"version": version.version, "updates": len(counts), "excluded": excluded, "total_examples": sum(counts)},
        )
        transaction.on_commit(lambda: open_next_round(federation.id))

    duration_ms = (time.monotonic() - started) * 1000
    logger.info(
        "round closed federation=%s round=%d version=%d updates=%d duration_ms=%.1f",
        federation.id,
        training_round.number,
        version.version,
        len(counts),
        duration_ms,
    )
    return version


def _aggregate_with_central_dp(training_round: TrainingRound, accepted) -> dict:
    """User-level DP-FedAvg: clip, sum, noise once, divide by q * population, charge the federation.

    Precondition: the caller holds the round lock in the transaction that
    writes the model version; this takes the federation lock as well, so
    the clip-norm update and the spend are serialised per federation.
    """
    federation = Federation.objects.select_for_update().get(id=training_round.federation_id)
    shapes = {spec.name: spec.shape for spec in tensor_specs(federation.model_spec)}
    rng = secure_generator()
    result = dp_fedavg_aggregate(
        (tensors for tensors, _ in _stream_updates(accepted)),
        tensor_shapes=shapes,
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


def _apply_server_optimizer(federation: Federation, base: dict, average: dict) -> dict:
    """Move the base weights by the server optimizer's step and store its new velocity.

    Precondition: inside the round's transaction, so the velocity commits
    with the model version it produced.
    """
    settings = Federation.objects.values("server_learning_rate", "server_momentum", "server_velocity").get(id=federation.id)
    velocity = None
    if settings["server_velocity"] is not None:
        _, velocity = wire.decode_tensors(bytes(settings["server_velocity"]))
    step, new_velocity = momentum_step(average, velocity, momentum=settings["server_momentum"], learning_rate=settings["server_learning_rate"])
    weights = apply_update(base, step)
    if settings["server_momentum"] > 0:
        Federation.objects.filter(id=federation.id).update(server_velocity=wire.encode_tensors(new_velocity))
    return weights


def _stream_updates(updates):
    # iterator() keeps one row's payload in memory at a time.
    for update in updates.only("payload", "num_examples").iterator(chunk_size=1):
        _, tensors = wire.decode_tensors(bytes(update.payload))
        yield tensors, update.num_examples


def _reject_updates_from_inactive_nodes(training_round: TrainingRound) -> int:
    return (
        training_round.updates.filter(status=ModelUpdate.Status.ACCEPTED)
        .exclude(node__status=Node.Status.ACTIVE)
        .update(status=ModelUpdate.Status.REJECTED, rejection_reason="The node was revoked or quarantined before aggregation.")
    )


def _update_reputations(training_round: TrainingRound) -> None:
    """Move each selected node's score towards 1 if its update was used, towards 0 otherwise."""
    used = set(training_round.updates.filter(status=ModelUpdate.Status.ACCEPTED).values_list("node_id", flat=True))
    rejected = set(training_round.updates.filter(status=ModelUpdate.Status.REJECTED).values_list("node_id", flat=True))
    for node_id in training_round.selected_nodes.values_list("id", flat=True):
        outcome = 1.0 if node_id in used else 0.0
        Reputation.objects.filter(node_id=node_id).update(
            score=(1 - REPUTATION_SMOOTHING) * F("score") + REPUTATION_SMOOTHING * outcome,
            accepted_count=F("accepted_count") + (1 if node_id in used else 0),
            rejected_count=F("rejected_count") + (1 if node_id in rejected else 0),
        )
