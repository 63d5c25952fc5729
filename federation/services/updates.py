"""Accepting device updates: validation, round binding, first-wins storage."""

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from federation import exceptions
from federation.models import Federation, ModelUpdate, Node, TrainingRound
from federation.services import update_store
from federation.services.rounds import close_round_if_ready
from federation.services.weights import expected_update_bytes
from flo_client import wire
from flo_client.models import tensor_specs
from monitoring.events import publish_on_commit
from privacy.services.budgets import record_spend

logger = logging.getLogger(__name__)

UPDATE_META_FIELDS = {"round", "model_version", "num_examples", "metrics"}
MAX_METRICS = 32
MAX_METRIC_NAME_LENGTH = 64
# Metrics are losses, accuracies and counts. The bound keeps every value
# exact in JSON on both databases: PostgreSQL's jsonb stores numbers as
# decimals and would hand 1e40 back as the integer 10**40.
MAX_METRIC_ABS = 1e12


@dataclass(frozen=True)
class UpdateMeta:
    round_number: int
    model_version: int
    num_examples: int
    metrics: dict[str, float]


def accept_update(node: Node, body: bytes) -> ModelUpdate:
    """Validate a signed update body and store it against the node's open round.

    Nothing is stored unless every check passes. On success the privacy
    spend (with local DP) commits in the same transaction as the update.

    Raises:
        federation.exceptions.FloError subclasses, each with its own code.
    """
    federation = node.federation
    limit_bytes = expected_update_bytes(federation.model_spec, settings.FLO_UPDATE_HEADER_ALLOWANCE_BYTES)
    if len(body) > limit_bytes:
        raise exceptions.PayloadTooLarge(f"The update is {len(body)} bytes; this federation's model allows at most {limit_bytes} bytes.")
    try:
        raw_meta, tensors = wire.decode_tensors(body)
    except wire.WireFormatError as error:
        raise exceptions.MalformedUpdate(f"The update is not in the tensor wire format: {error}") from error
    meta = parse_update_meta(raw_meta)
    check_tensors(tensors, federation.model_spec)
    # Squares summed by numpy's own reduction, not BLAS: a multi-threaded BLAS dot
    # runs several times slower on small, busy machines.
    l2_norm = math.sqrt(sum(float(np.square(values, dtype=np.float64).sum()) for values in tensors.values()))

    payload_file = update_store.new_payload_name(federation_id=federation.id, round_number=meta.round_number, node_id=str(node.id))
    try:
        update = _store_update(node, meta, body=body, payload_file=payload_file, l2_norm=l2_norm)
    except BaseException:
        # The row did not commit, so its payload file, if written, must go too.
        update_store.delete_payload(payload_file)
        raise
    logger.info("update accepted federation=%s round=%d node=%s num_examples=%d", federation.id, meta.round_number, node.id, meta.num_examples)
    return update


def _store_update(node: Node, meta: UpdateMeta, *, body: bytes, payload_file: str, l2_norm: float) -> ModelUpdate:
    """Write the payload file and insert the update row, and the local DP spend, if the node may still submit to the open round."""
    duplicate = exceptions.DuplicateUpdate(f"Node {node.id} already submitted an update for round {meta.round_number}; the first submission counts.")
    try:
        with transaction.atomic():
            training_round = _get_open_round(node, meta)
            is_selected, has_submitted = _lock_round_for_submission(training_round, node)
            if not is_selected:
                raise exceptions.NodeNotSelected(f"Node {node.id} was not selected for round {meta.round_number}; wait for a task that selects it.")
            if has_submitted:
                raise duplicate
            record_spend(node=node, training_round=training_round)
            update_store.write_payload(payload_file, body)
            update = ModelUpdate.objects.create(
                round=training_round,
                node=node,
                num_examples=meta.num_examples,
                payload_file=payload_file,
                payload_bytes=len(body),
                payload_sha256=hashlib.sha256(body).hexdigest(),
                l2_norm=l2_norm,
                metrics=meta.metrics,
            )
            publish_on_commit(
                node.federation_id,
                "update.accepted",
                {"round": meta.round_number, "node_id": str(node.id), "display_name": node.display_name, "num_examples": meta.num_examples, "l2_norm": l2_norm},
            )
            round_id = training_round.id
            # robust=True logs a failure here (a broker that is down) instead of
            # raising it, because the update is committed and the deadline check
            # closes the round later.
            transaction.on_commit(lambda: close_round_if_ready(round_id), robust=True)
    except IntegrityError:
        # The unique constraint on (round, node) caught a submission that raced past the check above.
        raise duplicate from None
    return update


def parse_update_meta(meta: dict) -> UpdateMeta:
    """Check the update's metadata fields strictly; unknown fields are rejected."""
    unknown = set(meta) - UPDATE_META_FIELDS
    if unknown:
        raise exceptions.InvalidUpdateField(f"Unknown update fields: {', '.join(sorted(unknown))}; allowed are {', '.join(sorted(UPDATE_META_FIELDS))}.")
    for field in ("round", "model_version", "num_examples"):
        if field not in meta:
            raise exceptions.InvalidUpdateField(f"The update has no {field!r} field; it is required.")
    round_number = _require_int(meta["round"], "round", minimum=1)
    model_version = _require_int(meta["model_version"], "model_version", minimum=0)
    num_examples = meta["num_examples"]
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or not 1 <= num_examples <= settings.FLO_MAX_EXAMPLES:
        raise exceptions.InvalidNumExamples(f"num_examples must be an integer from 1 to {settings.FLO_MAX_EXAMPLES}, got {str(num_examples)[:40]!r}.")
    return UpdateMeta(round_number=round_number, model_version=model_version, num_examples=num_examples, metrics=_check_metrics(meta.get("metrics", {})))


def check_tensors(tensors: dict[str, np.ndarray], model_spec: dict) -> None:
    """Require exactly the model's tensors, with its shapes and dtypes, all finite."""
    specs = {spec.name: spec for spec in tensor_specs(model_spec)}
    missing = sorted(set(specs) - set(tensors))
    if missing:
        raise exceptions.TensorMismatch(f"The update lacks tensor {missing[0]!r} ({_describe(specs[missing[0]])}).")
    extra = sorted(set(tensors) - set(specs))
    if extra:
        raise exceptions.TensorMismatch(f"The update has tensor {extra[0]!r}, which the model does not have; expected tensors: {', '.join(specs)}.")
    for name, spec in specs.items():
        values = tensors[name]
        if values.dtype != np.dtype(spec.dtype):
            raise exceptions.TensorMismatch(f"Tensor {name!r} has dtype {values.dtype}; expected {_describe(spec)}.")
        if tuple(values.shape) != tuple(spec.shape):
            raise exceptions.TensorMismatch(f"Tensor {name!r} has shape {list(values.shape)}; expected {_describe(spec)}.")
        if not np.all(np.isfinite(values)):
            count = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            raise exceptions.NonFiniteValues(f"Tensor {name!r} contains {count} NaN or infinite values; send finite values only.")


def _get_open_round(node: Node, meta: UpdateMeta) -> TrainingRound:
    """Return the federation's open round, with its base version, if it is the round the update names."""
    # The federation was read with the node earlier in this request. The
    # round's state is checked again under its lock before the update is stored.
    federation = node.federation
    open_round = TrainingRound.objects.select_related("base_version").defer("base_version__weights").filter(federation_id=federation.id, state=TrainingRound.State.OPEN).order_by().first()
    if federation.status != Federation.Status.RUNNING:
        raise exceptions.FederationNotRunning(f"Federation {federation.id} is {federation.status}; it accepts no updates.")
    current = open_round.number if open_round else None
    if open_round is None or open_round.number != meta.round_number:
        raise exceptions.RoundNotOpen(
            f"Round {meta.round_number} is not open for updates; the open round is {current if current is not None else 'none'}.",
            extra={"open_round": current},
        )
    if open_round.deadline_at <= timezone.now():
        raise exceptions.RoundNotOpen(f"Round {meta.round_number} passed its deadline at {open_round.deadline_at.isoformat()}.", extra={"open_round": None})
    base_version = open_round.base_version.version
    if meta.model_version != base_version:
        raise exceptions.StaleModelVersion(
            f"The update was trained from model version {meta.model_version}, but round {open_round.number} trains version {base_version}; download it and train again.",
            extra={"model_version": base_version},
        )
    return open_round


def _lock_round_for_submission(training_round: TrainingRound, node: Node) -> tuple[bool, bool]:
    """Hold the round open until this transaction commits and return whether the node is selected and has already submitted.

    On PostgreSQL a shared row lock lets submissions run side by side while
    the conditional UPDATE that claims the round for aggregation waits for
    them, so every update committed as accepted is in the aggregation.
    SQLite runs one writing transaction at a time (BEGIN IMMEDIATE), which
    gives the same order. One statement does the lock and both checks,
    because every round trip counts on this path.

    Raises:
        RoundNotOpen: the round left the open state after it was read.
    """
    selection_table = TrainingRound.selected_nodes.through._meta.db_table
    update_table = ModelUpdate._meta.db_table
    lock = " FOR SHARE" if connection.vendor == "postgresql" else ""
    node_key = Node._meta.pk.get_db_prep_value(node.id, connection)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT state,"
            f" EXISTS (SELECT 1 FROM {selection_table} WHERE traininground_id = %s AND node_id = %s),"
            f" EXISTS (SELECT 1 FROM {update_table} WHERE round_id = %s AND node_id = %s)"
            f" FROM {TrainingRound._meta.db_table} WHERE id = %s{lock}",
            [training_round.id, node_key, training_round.id, node_key, training_round.id],
        )
        state, is_selected, has_submitted = cursor.fetchone()
    if state != TrainingRound.State.OPEN:
        raise exceptions.RoundNotOpen(f"Round {training_round.number} closed while the update was checked; wait for the next task.", extra={"open_round": None})
    return bool(is_selected), bool(has_submitted)


def _require_int(value, field: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < 2**31:
        raise exceptions.InvalidUpdateField(f"{field} must be an integer from {minimum} to {2**31 - 1}, got {str(value)[:40]!r}.")
    return value


def _check_metrics(metrics) -> dict[str, float]:
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise exceptions.InvalidUpdateField(f"metrics must be an object of at most {MAX_METRICS} name-number pairs.")
    checked = {}
    for name, value in metrics.items():
        if not (0 < len(name) <= MAX_METRIC_NAME_LENGTH and name.isascii() and name.replace("_", "").isalnum()):
            raise exceptions.InvalidUpdateField(f"Metric name {name[:80]!r} must be 1 to {MAX_METRIC_NAME_LENGTH} ASCII letters, digits or underscores.")
        number = _as_finite_float(value)
        if number is None:
            raise exceptions.InvalidUpdateField(f"Metric {name!r} must be a number from {-MAX_METRIC_ABS:g} to {MAX_METRIC_ABS:g}, got {str(value)[:40]!r}.")
        checked[name] = number
    return checked


def _as_finite_float(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and abs(number) <= MAX_METRIC_ABS else None


def _describe(spec) -> str:
    return f"{spec.dtype} of shape {list(spec.shape)}"
