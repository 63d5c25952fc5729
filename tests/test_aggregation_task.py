"""The aggregation task reading stored payloads: extreme values, file descriptor limits, copies instead of mappings."""

import os
import resource

import numpy as np
import pytest

from federation.aggregation.fedavg import AggregationError
from federation.aggregation.kernels import RowStack
from federation.models import ModelUpdate, TrainingRound
from federation.services import update_store
from federation.services.aggregation import _read_update_stack
from federation.services.federations import start_federation
from federation.services.weights import load_weights
from flo_client.models import tensor_specs
from tests.conftest import enrol, make_federation, zero_update


def submit_all(nodes, fills, counts):
    for node, fill, count in zip(nodes, fills, counts, strict=True):
        assert node.submit(round_number=1, model_version=0, tensors=zero_update(fill=fill), num_examples=count).status_code == 202


@pytest.mark.parametrize("rule", ["fedavg", "trimmed_mean"])
def test_round_with_opposite_extreme_updates_closes(transactional_db, rule):
    # The average is near -1.2e38, and 3.3e38 minus it passes float32's range: those distances fall back to float64.
    federation = make_federation(round_size=3, min_updates=3, aggregation_rule=rule)
    nodes = enrol(federation, 3)
    start_federation(federation)

    submit_all(nodes, [3.3e38, -3.3e38, -3.3e38], [3, 3, 4])

    assert TrainingRound.objects.get(federation=federation, number=1).state == TrainingRound.State.CLOSED


@pytest.fixture
def without_payload_range(monkeypatch):
    """Make the platform lack the payload range, as off Linux, so the task maps each payload on its own."""
    monkeypatch.setattr(update_store, "_libc", lambda: None)


def close_round_under_low_file_limit(num_nodes: int) -> tuple[int, int]:
    """Submit num_nodes updates, the last one with room for only half as many more descriptors, and return the file limit before and after it."""
    federation = make_federation(round_size=num_nodes, min_updates=num_nodes)
    nodes = enrol(federation, num_nodes)
    start_federation(federation)
    submit_all(nodes[:-1], [1.0] * (num_nodes - 1), [10] * (num_nodes - 1))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for the last request, not for one mapping per update.
    low_limit = len(os.listdir("/proc/self/fd")) + num_nodes // 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (low_limit, hard))
    try:
        submit_all(nodes[-1:], [1.0], [10])
        return low_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_round_in_one_range_keeps_file_limit(transactional_db):
    low_limit, limit_after = close_round_under_low_file_limit(40)

    assert TrainingRound.objects.get(number=1).state == TrainingRound.State.CLOSED
    assert limit_after == low_limit


def test_round_mapping_each_payload_raises_file_limit(transactional_db, without_payload_range):
    low_limit, limit_after = close_round_under_low_file_limit(40)

    assert TrainingRound.objects.get(number=1).state == TrainingRound.State.CLOSED
    assert limit_after > low_limit


def open_round_updates(fills):
    """Submit one update per fill to a round that waits for one more, and return the round's accepted updates and the model's tensor specs."""
    federation = make_federation(round_size=len(fills) + 1, min_updates=len(fills) + 1)
    nodes = enrol(federation, len(fills) + 1)
    start_federation(federation)
    submit_all(nodes[: len(fills)], fills, [10] * len(fills))
    return ModelUpdate.objects.filter(round__federation=federation, status=ModelUpdate.Status.ACCEPTED), tensor_specs(federation.model_spec)


def read_open_round(fills):
    """Return the stack of an open round's updates, one per fill, as the task reads it."""
    return _read_update_stack(*open_round_updates(fills))[2]


@pytest.mark.parametrize("range_available", [True, False], ids=["range", "per-file"])
def test_missing_payload_names_its_node(transactional_db, request, range_available):
    if not range_available:
        request.getfixturevalue("without_payload_range")
    accepted, specs = open_round_updates([1.0, 2.0])
    missing = accepted.order_by("node_id").last()
    (update_store.store_dir() / missing.payload_file).unlink()

    with pytest.raises(AggregationError, match=f"from node {missing.node_id} cannot be read"):
        _read_update_stack(accepted, specs)


def test_round_payloads_read_as_one_array(transactional_db):
    stack = read_open_round([1.0, 2.0])

    assert isinstance(stack, np.ndarray)
    assert sorted(float(row.mean()) for row in stack) == [1.0, 2.0]


def test_round_payloads_without_range_read_as_rows(transactional_db, without_payload_range):
    stack = read_open_round([1.0, 2.0])

    assert isinstance(stack, RowStack)
    assert sorted(float(row.mean()) for row in stack.rows) == [1.0, 2.0]


def test_round_reads_payloads_without_mapping(transactional_db, monkeypatch, without_payload_range):
    monkeypatch.setattr(update_store, "reserve_descriptors", lambda count: False)
    federation = make_federation(round_size=2, min_updates=2)
    nodes = enrol(federation, 2)
    start_federation(federation)

    submit_all(nodes, [1.0, 4.0], [10, 30])

    first = TrainingRound.objects.get(federation=federation, number=1)
    assert first.state == TrainingRound.State.CLOSED
    np.testing.assert_array_equal(load_weights(first.result_version)["bias"], [3.25, 3.25])


def test_reserve_descriptors_raises_soft_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 10, hard))
    try:
        reserved = update_store.reserve_descriptors(200)
        raised_to = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    assert reserved
    assert raised_to >= open_now + 200 + update_store.DESCRIPTOR_RESERVE


def test_reserve_descriptors_refuses_beyond_hard_limit(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (100, 200))

    assert not update_store.reserve_descriptors(10_000)


def test_read_payload_into_memory_equals_mapped_payload(settings, tmp_path):
    settings.FLO_UPDATE_STORE_DIR = str(tmp_path)
    update_store.write_payload("a/b/c.flo", b"payload bytes")

    copied = update_store.read_payload("a/b/c.flo", expected_bytes=13, mapped=False)
    mapped = update_store.read_payload("a/b/c.flo", expected_bytes=13)

    assert copied == b"payload bytes"
    assert bytes(mapped) == copied
