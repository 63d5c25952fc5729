"""FedProx's proximal term in local training (TrainingPlan.proximal_mu).

These tests need no database and no Django settings.
"""

import json

import numpy as np
import pytest

from flo_client.training import LocalDpConfig, TrainingPlan, compute_update, train_locally

SOFTMAX_SPEC = {"kind": "softmax_regression", "num_features": 3, "num_classes": 2}
ONE_FEATURE_SPEC = {"kind": "softmax_regression", "num_features": 1, "num_classes": 2}


class NoSamplingGenerator:
    """Stand-in for np.random.Generator whose Poisson draws select no example and whose noise is +1 std."""

    def random(self, size):
        return np.ones(size)

    def normal(self, loc, scale, size):
        return np.full(size, loc + scale)


def golden_examples() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    features = np.array(
        [
            [1.2301534e-03, 2.9874554e-01, -2.7413785e-01],
            [-8.9059186e-01, -4.5467079e-01, -9.9164653e-01],
            [6.0143601e-02, 1.3402152e00, -4.9220651e-01],
            [-6.2047487e-01, 4.8984206e-01, 3.5688701e-01],
            [1.0541425e-01, -9.3046802e-01, -2.9251823e-02],
            [6.9530320e-01, -1.3442146e00, -4.5761576e-01],
        ],
        dtype=np.float32,
    )
    labels = np.array([0, 1, 1, 0, 1, 0])
    weights = {"weight": np.full((3, 2), 0.25, dtype=np.float32), "bias": np.array([0.5, -0.5], dtype=np.float32)}
    return features, labels, weights


def update_norm(new_weights, base_weights) -> float:
    update = compute_update(new_weights, base_weights)
    return float(np.sqrt(sum(np.sum(np.square(values, dtype=np.float64)) for values in update.values())))


# Training with mu = 0 is unchanged


# Golden weights recorded from train_locally before proximal_mu existed, with
# numpy 2.4.6 and np.random.default_rng(3). A different numpy may draw a
# different shuffle or noise and needs new golden values.
@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        pytest.param(
            TrainingPlan(learning_rate=0.5, batch_size=4, local_epochs=2),
            {
                "weight": [[0.4097041, 0.090295926], [0.3931728, 0.10682721], [0.57775515, -0.077755146]],
                "bias": [0.12146885, -0.12146885],
            },
            id="sgd",
        ),
        pytest.param(
            TrainingPlan(
                learning_rate=0.5,
                batch_size=1,
                local_epochs=1,
                dp=LocalDpConfig(clip_norm=1.0, noise_multiplier=0.5, sampling_rate=0.5, local_steps=3),
            ),
            {
                "weight": [[0.44451225, 0.056318693], [0.0697435, 0.40195605], [0.24473728, 0.23088738]],
                "bias": [0.49020642, -0.43386975],
            },
            id="dp_sgd",
        ),
    ],
)
def test_zero_mu_matches_golden_weights(plan, expected):
    features, labels, weights = golden_examples()

    trained = train_locally(SOFTMAX_SPEC, weights, features, labels, plan, rng=np.random.default_rng(3))

    assert plan.proximal_mu == 0.0
    for name, values in expected.items():
        np.testing.assert_array_equal(trained[name], np.array(values, dtype=np.float32), err_msg=name)


# Steps with mu > 0


def test_sgd_steps_with_mu_by_hand():
    # One example x = [1] of class 0, zero weights, full-batch steps with learning rate 1 and mu = 0.5.
    features = np.array([[1.0]], dtype=np.float32)
    labels = np.array([0])
    weights = {"weight": np.zeros((1, 2), dtype=np.float32), "bias": np.zeros(2, dtype=np.float32)}
    plan = TrainingPlan(learning_rate=1.0, batch_size=1, local_epochs=2, proximal_mu=0.5)

    trained = train_locally(ONE_FEATURE_SPEC, weights, features, labels, plan, rng=np.random.default_rng(0))

    # Step 1 starts at w_global, so the proximal gradient mu * (w - w_global) is 0. Logits [0, 0] give
    # p = [0.5, 0.5], the loss gradient for the logits is p - onehot(0) = [-0.5, 0.5], and weight and bias
    # gradients are both x * [-0.5, 0.5], so w = 0 - [-0.5, 0.5] = [0.5, -0.5] for weight and bias.
    # Step 2: logits = x * weight + bias = [1, -1], so p = [1 / (1 + e^-2), 1 / (1 + e^2)] = [0.8807971, 0.1192029]
    # and the loss gradient is [-0.1192029, 0.1192029]. The proximal gradient is 0.5 * ([0.5, -0.5] - 0) = [0.25, -0.25].
    # w = [0.5, -0.5] - ([-0.1192029, 0.1192029] + [0.25, -0.25]) = [0.3692029, -0.3692029].
    # Without mu, step 2 would end at [0.6192029, -0.6192029].
    np.testing.assert_allclose(trained["weight"], [[0.3692029, -0.3692029]], rtol=1e-6)
    np.testing.assert_allclose(trained["bias"], [0.3692029, -0.3692029], rtol=1e-6)


def test_dp_sgd_adds_proximal_gradient_after_noise():
    # No example is sampled and every noise draw is +sigma * C = 1. There are n = 4 examples
    # and q = 0.5, so the noisy sum is divided by q * n = 2. Learning rate 0.5, mu = 1.
    features = np.zeros((4, 1), dtype=np.float32)
    labels = np.zeros(4, dtype=np.int64)
    weights = {"weight": np.zeros((1, 2), dtype=np.float32), "bias": np.zeros(2, dtype=np.float32)}
    dp = LocalDpConfig(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5, local_steps=2)
    plan = TrainingPlan(learning_rate=0.5, batch_size=1, local_epochs=1, dp=dp, proximal_mu=1.0)

    trained = train_locally(ONE_FEATURE_SPEC, weights, features, labels, plan, rng=NoSamplingGenerator())

    # Step 1: w = 0 - 0.5 * (1 / 2 + 1 * 0) = -0.25.
    # Step 2: w = -0.25 - 0.5 * (1 / 2 + 1 * (-0.25 - 0)) = -0.375.
    # Had the proximal gradient gone into the noisy sum, it would have been divided by 2 as well, giving -0.4375.
    np.testing.assert_allclose(trained["weight"], [[-0.375, -0.375]], rtol=1e-6)
    np.testing.assert_allclose(trained["bias"], [-0.375, -0.375], rtol=1e-6)


@pytest.mark.parametrize("use_dp", [False, True], ids=["sgd", "dp_sgd"])
def test_large_mu_keeps_weights_near_global(use_dp):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(40, 3)).astype(np.float32)
    labels = rng.integers(0, 2, size=40)
    weights = {"weight": np.zeros((3, 2), dtype=np.float32), "bias": np.zeros(2, dtype=np.float32)}
    dp = LocalDpConfig(clip_norm=1.0, noise_multiplier=0.5, sampling_rate=0.25, local_steps=20) if use_dp else None

    norms = {}
    for mu in (0.0, 5.0):
        plan = TrainingPlan(learning_rate=0.1, batch_size=4, local_epochs=3, dp=dp, proximal_mu=mu)
        trained = train_locally(SOFTMAX_SPEC, weights, features, labels, plan, rng=np.random.default_rng(2))
        norms[mu] = update_norm(trained, weights)

    assert norms[0.0] > 0
    assert norms[5.0] < 0.5 * norms[0.0]


# Training plans


def test_plan_round_trips_mu():
    plan = TrainingPlan(learning_rate=0.1, batch_size=8, local_epochs=2, proximal_mu=0.01)

    data = json.loads(json.dumps(plan.to_dict()))
    restored = TrainingPlan.from_dict(data)

    assert data["proximal_mu"] == 0.01
    assert restored == plan


def test_plan_without_mu_omits_key():
    plan = TrainingPlan.from_dict({"learning_rate": 0.1, "batch_size": 8, "local_epochs": 2, "dp": None})

    assert plan.proximal_mu == 0.0
    assert "proximal_mu" not in plan.to_dict()


def test_plan_normalises_integer_mu():
    plan = TrainingPlan.from_dict({"learning_rate": 0.1, "batch_size": 8, "local_epochs": 2, "proximal_mu": 1})

    assert plan.proximal_mu == 1.0
    assert type(plan.proximal_mu) is float


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-0.1, "proximal_mu must be at least 0, got -0.1"),
        (float("nan"), "proximal_mu must be finite, got nan"),
        (float("inf"), "proximal_mu must be finite, got inf"),
        (True, "proximal_mu must be a real number, got True"),
        ("0.1", "proximal_mu must be a real number, got '0.1'"),
        (None, "proximal_mu must be a real number, got None"),
        (20.0, r"learning_rate \* proximal_mu is 0.1 \* 20.0 = 2.0, but local training is unstable unless it is below 2"),
    ],
)
def test_plan_rejects_invalid_mu(value, message):
    data = {"learning_rate": 0.1, "batch_size": 8, "local_epochs": 1, "proximal_mu": value}

    with pytest.raises(ValueError, match=message):
        TrainingPlan.from_dict(data)
