"""Simulated model-poisoning attacks (flo_client.attacks) and the simulator's crafting phase.

These tests need no database, no Django settings and no server.
"""

import numpy as np
import pytest

from flo_client.attacks import ATTACK_NAMES, AttackConfig, craft_update, flip_labels, little_is_enough_z
from flo_client.simulator import FleetConfig, craft_attacker_updates, run_fleet

# Phi^{-1}(13 / 20): n = 20, f = 4, s = floor(20 / 2 + 1) - 4 = 7, (n - s) / n = 0.65.
Z_20_DEVICES_4_ATTACKERS = 0.38532047


class ConstantNormalGenerator:
    """Stand-in for np.random.Generator whose normal draws are all loc + scale."""

    def normal(self, loc, scale, size):
        return np.full(size, loc + scale)


def honest_update() -> dict[str, np.ndarray]:
    return {"weight": np.array([[1.0, -2.0]], dtype=np.float32), "bias": np.array([0.5], dtype=np.float32)}


def craft(config, update, *, colluding_updates=(), num_devices=20, num_attackers=4, rng=None):
    return craft_update(
        config,
        update,
        colluding_updates=list(colluding_updates),
        num_devices=num_devices,
        num_attackers=num_attackers,
        rng=rng if rng is not None else np.random.default_rng(0),
    )


# craft_update


def test_sign_flip_sends_negative_scaled_update():
    crafted = craft(AttackConfig("sign_flip", scale=3.0), honest_update())

    np.testing.assert_array_equal(crafted["weight"], [[-3.0, 6.0]])
    np.testing.assert_array_equal(crafted["bias"], [-1.5])


def test_boost_sends_scaled_update():
    crafted = craft(AttackConfig("boost", scale=3.0), honest_update())

    np.testing.assert_array_equal(crafted["weight"], [[3.0, -6.0]])
    np.testing.assert_array_equal(crafted["bias"], [1.5])


def test_gaussian_noise_replaces_update():
    crafted = craft(AttackConfig("gaussian_noise", noise_std=2.5), honest_update(), rng=ConstantNormalGenerator())

    # Every draw is 0 + 2.5, whatever the honest value was.
    np.testing.assert_array_equal(crafted["weight"], [[2.5, 2.5]])
    np.testing.assert_array_equal(crafted["bias"], [2.5])


def test_gaussian_noise_follows_rng_order():
    expected_rng = np.random.default_rng(4)
    expected_weight = expected_rng.normal(0.0, 2.5, size=(1, 2))
    expected_bias = expected_rng.normal(0.0, 2.5, size=(1,))

    crafted = craft(AttackConfig("gaussian_noise", noise_std=2.5), honest_update(), rng=np.random.default_rng(4))

    np.testing.assert_array_equal(crafted["weight"], expected_weight.astype(np.float32))
    np.testing.assert_array_equal(crafted["bias"], expected_bias.astype(np.float32))


def test_gaussian_noise_has_requested_std():
    update = {"w": np.zeros(100_000, dtype=np.float32)}

    crafted = craft(AttackConfig("gaussian_noise", noise_std=10.0), update, rng=np.random.default_rng(0))

    # Standard errors are 10 / sqrt(2e5) = 0.022 for the sample std and 10 / sqrt(1e5) = 0.032 for the mean.
    assert abs(float(np.std(crafted["w"])) - 10.0) < 0.1
    assert abs(float(np.mean(crafted["w"]))) < 0.1


def test_label_flip_sends_honest_update():
    update = honest_update()

    crafted = craft(AttackConfig("label_flip"), update)

    np.testing.assert_array_equal(crafted["weight"], update["weight"])
    np.testing.assert_array_equal(crafted["bias"], update["bias"])
    assert crafted["weight"] is not update["weight"]


def test_little_is_enough_by_hand():
    colluding = [
        {"weight": np.array([[1.0, 0.0]]), "bias": np.array([5.0])},
        {"weight": np.array([[3.0, 4.0]]), "bias": np.array([5.0])},
    ]

    crafted = craft(AttackConfig("little_is_enough"), colluding[0], colluding_updates=colluding, num_devices=20, num_attackers=4)

    # mean = [2, 2] and population std = [1, 2] for the weight; the bias has mean 5 and std 0.
    # With z = 0.3853205: [2 - 0.3853205, 2 - 2 * 0.3853205] = [1.6146795, 1.2293590].
    np.testing.assert_allclose(crafted["weight"], [[1.6146795, 1.2293590]], rtol=1e-6)
    np.testing.assert_allclose(crafted["bias"], [5.0], rtol=1e-6)


def test_little_is_enough_alone_sends_own_update():
    update = honest_update()

    crafted = craft(AttackConfig("little_is_enough"), update, colluding_updates=[update])

    np.testing.assert_allclose(crafted["weight"], update["weight"], rtol=1e-6)
    np.testing.assert_allclose(crafted["bias"], update["bias"], rtol=1e-6)


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_craft_update_keeps_inputs(name):
    update = {"weight": np.array([[1.0, -2.0]]), "bias": np.array([0.5])}
    other = {"weight": np.array([[0.0, 1.0]]), "bias": np.array([2.0])}
    update_before = {key: value.copy() for key, value in update.items()}
    other_before = {key: value.copy() for key, value in other.items()}

    crafted = craft(AttackConfig(name), update, colluding_updates=[update, other])

    for key in update:
        np.testing.assert_array_equal(update[key], update_before[key])
        np.testing.assert_array_equal(other[key], other_before[key])
        assert crafted[key].dtype == np.float32
        assert crafted[key].shape == update[key].shape


def test_little_is_enough_needs_colluding_updates():
    with pytest.raises(ValueError, match="at least one colluding update"):
        craft(AttackConfig("little_is_enough"), honest_update(), colluding_updates=[])


def test_little_is_enough_rejects_mismatched_updates():
    missing_bias = {"weight": np.zeros((1, 2))}
    wrong_shape = {"weight": np.zeros((2, 1)), "bias": np.zeros(1)}

    with pytest.raises(ValueError, match=r"Colluding update 1 has tensors \['weight'\]"):
        craft(AttackConfig("little_is_enough"), honest_update(), colluding_updates=[honest_update(), missing_bias])
    with pytest.raises(ValueError, match=r"Colluding update 0 has tensor 'weight' of shape \(2, 1\), expected \(1, 2\)"):
        craft(AttackConfig("little_is_enough"), honest_update(), colluding_updates=[wrong_shape])


# little_is_enough_z


@pytest.mark.parametrize(
    ("num_devices", "num_attackers", "expected"),
    [
        # s = 11 - 4 = 7, Phi^{-1}(13 / 20) = Phi^{-1}(0.65).
        (20, 4, Z_20_DEVICES_4_ATTACKERS),
        # s = 26 - 12 = 14, Phi^{-1}(36 / 50) = Phi^{-1}(0.72).
        (50, 12, 0.58284151),
        # s = 11 - 10 = 1, Phi^{-1}(19 / 20) = Phi^{-1}(0.95).
        (20, 10, 1.64485363),
        # Even n with one attacker: s = n / 2, Phi^{-1}(0.5) = 0, so the attack sends the mean.
        (10, 1, 0.0),
        # s = 6 - 1 = 5, Phi^{-1}(6 / 11) = Phi^{-1}(0.5454545).
        (11, 1, 0.11418529),
    ],
)
def test_little_is_enough_z_values(num_devices, num_attackers, expected):
    z = little_is_enough_z(num_devices=num_devices, num_attackers=num_attackers)

    assert z == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize(
    ("num_devices", "num_attackers", "message"),
    [
        (20, 11, "11 attackers among 20 devices already form a majority"),
        (21, 11, "Use at most 10 attackers"),
        (20, 0, r"num_attackers must be in \(0, num_devices\) = \(0, 20\), got 0"),
        (20, 20, "got 20"),
        (20, True, "num_attackers must be an integer, got True"),
        (20.0, 4, "num_devices must be an integer, got 20.0"),
    ],
)
def test_little_is_enough_z_rejects_invalid_counts(num_devices, num_attackers, message):
    with pytest.raises(ValueError, match=message):
        little_is_enough_z(num_devices=num_devices, num_attackers=num_attackers)


# flip_labels


def test_flip_labels_reverses_class_ids():
    labels = np.array([0, 1, 2, 9], dtype=np.int32)

    flipped = flip_labels(labels, num_classes=10)

    np.testing.assert_array_equal(flipped, [9, 8, 7, 0])
    assert flipped.dtype == np.int32
    np.testing.assert_array_equal(labels, [0, 1, 2, 9])


def test_flip_labels_accepts_no_labels():
    flipped = flip_labels(np.array([], dtype=np.int64), num_classes=2)

    assert flipped.shape == (0,)


@pytest.mark.parametrize(
    ("labels", "num_classes", "message"),
    [
        (np.array([0, 3]), 3, r"outside \[0, 3\)"),
        (np.array([-1, 0]), 3, r"outside \[0, 3\)"),
        (np.array([0.0, 1.0]), 3, "integer dtype"),
        (np.array([0, 1]), 1, "num_classes must be an integer of at least 2, got 1"),
        (np.array([0, 1]), True, "num_classes must be an integer of at least 2, got True"),
    ],
)
def test_flip_labels_rejects_invalid_input(labels, num_classes, message):
    with pytest.raises(ValueError, match=message):
        flip_labels(labels, num_classes=num_classes)


# AttackConfig


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "backdoor"}, "name must be one of sign_flip, gaussian_noise, boost, label_flip, little_is_enough, got 'backdoor'"),
        ({"name": None}, "name must be one of"),
        ({"name": "boost", "scale": 0.0}, "scale must be positive, got 0.0"),
        ({"name": "boost", "scale": -1.0}, "scale must be positive, got -1.0"),
        ({"name": "boost", "scale": float("nan")}, "scale must be finite, got nan"),
        ({"name": "boost", "scale": True}, "scale must be a real number, got True"),
        ({"name": "gaussian_noise", "noise_std": float("inf")}, "noise_std must be finite, got inf"),
        ({"name": "gaussian_noise", "noise_std": 0}, "noise_std must be positive, got 0.0"),
    ],
)
def test_attack_config_rejects_invalid_field(fields, message):
    with pytest.raises(ValueError, match=message):
        AttackConfig(**fields)


def test_attack_config_normalises_integers():
    config = AttackConfig("boost", scale=2)

    assert config.scale == 2.0
    assert type(config.scale) is float


# Simulator: crafting phase and attacker validation


def test_crafting_phase_attackers_collude():
    honest_updates = {
        "device-001": {"w": np.array([1.0, 0.0])},
        "device-003": {"w": np.array([3.0, 4.0])},
    }
    rngs = {name: np.random.default_rng(0) for name in honest_updates}

    crafted = craft_attacker_updates(AttackConfig("little_is_enough"), honest_updates, num_devices=20, num_attackers=4, rngs=rngs)

    # Both attackers send mean - z * std over the two honest updates: [2 - z, 2 - 2z].
    assert set(crafted) == {"device-001", "device-003"}
    expected = [2.0 - Z_20_DEVICES_4_ATTACKERS, 2.0 - 2 * Z_20_DEVICES_4_ATTACKERS]
    np.testing.assert_allclose(crafted["device-001"]["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(crafted["device-003"]["w"], expected, rtol=1e-6)


def test_crafting_phase_uses_each_device_rng():
    honest_updates = {"device-000": {"w": np.zeros(3)}, "device-002": {"w": np.zeros(3)}}
    rngs = {"device-000": np.random.default_rng(1), "device-002": np.random.default_rng(2)}

    crafted = craft_attacker_updates(AttackConfig("gaussian_noise", noise_std=1.0), honest_updates, num_devices=5, num_attackers=2, rngs=rngs)

    np.testing.assert_array_equal(crafted["device-000"]["w"], np.random.default_rng(1).normal(0.0, 1.0, size=3).astype(np.float32))
    np.testing.assert_array_equal(crafted["device-002"]["w"], np.random.default_rng(2).normal(0.0, 1.0, size=3).astype(np.float32))


def test_crafting_phase_flips_each_update_separately():
    honest_updates = {"device-000": {"w": np.array([1.0])}, "device-001": {"w": np.array([-2.0])}}
    rngs = {name: np.random.default_rng(0) for name in honest_updates}

    crafted = craft_attacker_updates(AttackConfig("sign_flip", scale=2.0), honest_updates, num_devices=5, num_attackers=2, rngs=rngs)

    np.testing.assert_array_equal(crafted["device-000"]["w"], [-2.0])
    np.testing.assert_array_equal(crafted["device-001"]["w"], [4.0])


@pytest.mark.parametrize(
    ("attack", "attacker_indices", "message"),
    [
        (AttackConfig("boost"), (0, 4), r"attacker_indices contains 4, but device indices are integers from 0 to 3"),
        (AttackConfig("boost"), (-1,), "attacker_indices contains -1"),
        (AttackConfig("boost"), (True,), "attacker_indices contains True"),
        (AttackConfig("boost"), (1, 2, 1), r"attacker_indices repeats \[1\]"),
        (AttackConfig("boost"), (), "attack is boost but attacker_indices is empty"),
        (None, (1,), r"attacker_indices is \(1,\) but attack is None"),
        (AttackConfig("little_is_enough"), (0, 1, 2), "3 attackers among 4 devices already form a majority"),
    ],
)
def test_run_fleet_rejects_invalid_attackers(attack, attacker_indices, message):
    # The check runs before any request, so the base URL is never contacted.
    config = FleetConfig(num_devices=4, attack=attack, attacker_indices=attacker_indices)

    with pytest.raises(ValueError, match=message):
        run_fleet("http://127.0.0.1:9", ["token"] * 4, config)
