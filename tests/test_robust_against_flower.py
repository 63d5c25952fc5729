"""Robust aggregation rules against Flower 1.42.0's reference functions (no database).

Flower takes a list of (layers, num_examples) pairs and returns layers; our
rules take the flattened (n_clients, n_params) array. Every input here is one
on which both definitions are valid: Flower's `aggregate_krum` does not check
n >= 2f + 3 and scores with max(1, n - f - 2) neighbours, so Krum inputs keep
n >= 2f + 3, where that count is n - f - 2 in both. Flower's median and
trimmed mean ignore example counts, as ours do. The counts are unequal so
that a rule that wrongly weights, or wrongly ignores weights, fails.
"""

import numpy as np
import pytest
from flwr.server.strategy.aggregate import (
    aggregate,
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from federation.aggregation.robust import RuleConfig, aggregate_updates, flatten_tensors, unflatten_vector

LAYER_SHAPES = {"dense.kernel": (3, 2), "dense.bias": (4,), "scale": ()}
LAYER_NAMES = list(LAYER_SHAPES)
SEEDS = range(5)
# Both sides compute in float64 but sum in different orders.
RTOL = 1e-12
ATOL = 1e-12


def make_round(seed, *, num_clients, num_outliers=0):
    """Return Flower's (layers, num_examples) pairs and our (updates, counts) for one random round.

    The first `num_outliers` clients send updates scaled and shifted far from
    the rest. Ties go to the lowest index, so outliers placed first are the
    ones a wrong tie-break or neighbour count would pick.
    """
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(num_clients):
        layers = [rng.normal(size=shape) for shape in LAYER_SHAPES.values()]
        if index < num_outliers:
            layers = [20.0 * layer + 5.0 for layer in layers]
        pairs.append((layers, int(rng.integers(1, 500))))
    updates = np.stack([flatten_tensors(dict(zip(LAYER_NAMES, layers, strict=True)), LAYER_NAMES) for layers, _ in pairs])
    counts = [count for _, count in pairs]
    return pairs, updates, counts


def flatten_flower(layers):
    return np.concatenate([np.ravel(layer) for layer in layers])


@pytest.mark.parametrize("seed", SEEDS)
def test_fedavg_matches_flower_aggregate(seed):
    pairs, updates, counts = make_round(seed, num_clients=6)

    ours = aggregate_updates(updates, num_examples=counts, config=RuleConfig(name="fedavg"))

    np.testing.assert_allclose(ours.aggregate, flatten_flower(aggregate(pairs)), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_clients", [5, 6])
def test_median_matches_flower_median(seed, num_clients):
    pairs, updates, counts = make_round(seed, num_clients=num_clients, num_outliers=1)

    ours = aggregate_updates(updates, num_examples=counts, config=RuleConfig(name="median"))

    np.testing.assert_allclose(ours.aggregate, flatten_flower(aggregate_median(pairs)), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("num_clients", "trim_fraction"), [(10, 0.1), (10, 0.25), (11, 0.2), (7, 0.45), (4, 0.0)])
def test_trimmed_mean_matches_flower_trimmed_avg(seed, num_clients, trim_fraction):
    pairs, updates, counts = make_round(seed, num_clients=num_clients, num_outliers=2)

    ours = aggregate_updates(updates, num_examples=counts, config=RuleConfig(name="trimmed_mean", trim_fraction=trim_fraction))

    expected = aggregate_trimmed_avg(pairs, proportiontocut=trim_fraction)
    np.testing.assert_allclose(ours.aggregate, flatten_flower(expected), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("num_clients", "num_byzantine"), [(5, 1), (8, 2), (9, 3)])
def test_krum_matches_flower_krum(seed, num_clients, num_byzantine):
    pairs, updates, counts = make_round(seed, num_clients=num_clients, num_outliers=num_byzantine)

    ours = aggregate_updates(updates, num_examples=counts, config=RuleConfig(name="krum", num_byzantine=num_byzantine))

    expected = aggregate_krum(pairs, num_malicious=num_byzantine, to_keep=0)
    np.testing.assert_allclose(ours.aggregate, flatten_flower(expected), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("num_clients", "num_byzantine", "num_selected"), [(5, 1, 2), (5, 1, 4), (8, 2, 3), (8, 2, 6), (9, 3, 1)])
def test_multi_krum_matches_flower_to_keep(seed, num_clients, num_byzantine, num_selected):
    pairs, updates, counts = make_round(seed, num_clients=num_clients, num_outliers=num_byzantine)
    config = RuleConfig(name="multi_krum", num_byzantine=num_byzantine, num_selected=num_selected)

    ours = aggregate_updates(updates, num_examples=counts, config=config)

    expected = aggregate_krum(pairs, num_malicious=num_byzantine, to_keep=num_selected)
    np.testing.assert_allclose(ours.aggregate, flatten_flower(expected), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_multi_krum_default_matches_flower_n_minus_f(seed):
    pairs, updates, counts = make_round(seed, num_clients=7, num_outliers=2)

    ours = aggregate_updates(updates, num_examples=counts, config=RuleConfig(name="multi_krum", num_byzantine=2))

    expected = aggregate_krum(pairs, num_malicious=2, to_keep=7 - 2)
    np.testing.assert_allclose(ours.aggregate, flatten_flower(expected), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("num_clients", "num_byzantine"), [(3, 0), (7, 1), (8, 1), (11, 2), (12, 2)])
def test_bulyan_matches_flower_bulyan(seed, num_clients, num_byzantine):
    pairs, updates, counts = make_round(seed, num_clients=num_clients, num_outliers=num_byzantine)

    ours = aggregate_updates(updates, num_examples=counts, config=RuleConfig(name="bulyan", num_byzantine=num_byzantine))

    # aggregate_bulyan removes the selected pairs from the list it is given, so it gets a copy.
    expected = aggregate_bulyan(list(pairs), num_malicious=num_byzantine, aggregation_rule=aggregate_krum, to_keep=0)
    np.testing.assert_allclose(ours.aggregate, flatten_flower(expected), rtol=RTOL, atol=ATOL)


def test_unflattened_aggregate_has_flower_layer_shapes():
    pairs, updates, counts = make_round(0, num_clients=7, num_outliers=1)

    ours = aggregate_updates(updates, num_examples=counts, config=RuleConfig(name="bulyan", num_byzantine=1))
    tensors = unflatten_vector(ours.aggregate, LAYER_SHAPES)

    expected = aggregate_bulyan(list(pairs), num_malicious=1, aggregation_rule=aggregate_krum, to_keep=0)
    for name, layer in zip(LAYER_NAMES, expected, strict=True):
        assert tensors[name].shape == np.shape(layer), name
        np.testing.assert_allclose(tensors[name], layer, rtol=1e-6, atol=1e-6)
