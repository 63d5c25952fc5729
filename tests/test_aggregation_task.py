"""The aggregation task reading stored payloads: extreme values, file descriptor limits, copies instead of mappings."""

import errno
import os
import resource

import numpy as np
import pytest

from federation.models import TrainingRound
from federation.services import update_store
from federation.services.federations import start_federation
from federation.services.weights import load_weights
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
    """Make mapping payloads into one range fail, as off Linux, so the task maps each payload on its own."""

    def unavailable(names, expected_bytes):
        raise OSError(errno.ENOSYS, "no payload range in this test")

    monkeypatch.setattr(update_store, "PayloadRange", unavailable)


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
