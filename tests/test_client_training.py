"""Tests of the device SDK's models, local training (plain SGD and DP-SGD) and datasets.

These tests need no database and no Django settings.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flo_client.datasets import (
    DATASET_NAMES,
    dirichlet_partition,
    load_dataset,
    split_train_test,
)
from flo_client.models import (
    MAX_PARAMETERS,
    TensorSpec,
    compute_gradient_factors,
    compute_loss,
    compute_per_example_gradient_norms,
    compute_per_example_gradients,
    evaluate_accuracy,
    initial_weights,
    predict_logits,
    sum_gradients,
    tensor_specs,
    validate_model_spec,
)
from flo_client.training import (
    LocalDpConfig,
    TrainingPlan,
    clip_and_sum_gradients,
    compute_update,
    train_locally,
)

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SOFTMAX_SPEC = {"kind": "softmax_regression", "num_features": 5, "num_classes": 3}
MLP_SPEC = {"kind": "mlp", "num_features": 5, "hidden_units": 7, "num_classes": 3}


def make_examples(spec: dict, num_examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_examples, spec["num_features"])).astype(np.float32)
    labels = rng.integers(0, spec["num_classes"], size=num_examples).astype(np.int64)
    return features, labels


def make_random_weights(spec: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights with every tensor random, so that no gradient is trivially zero."""
    rng = np.random.default_rng(seed)
    return {tensor.name: rng.normal(0.0, 0.5, size=tensor.shape) for tensor in tensor_specs(spec)}


def finite_difference_gradients(spec, weights, features, labels, step=1e-6) -> dict[str, np.ndarray]:
    """Central differences of the mean loss, one coordinate at a time."""
    gradients = {}
    for name, array in weights.items():
        gradient = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            shifted_up = {key: value.copy() for key, value in weights.items()}
            shifted_down = {key: value.copy() for key, value in weights.items()}
            shifted_up[name][index] += step
            shifted_down[name][index] -= step
            loss_up = compute_loss(spec, shifted_up, features, labels)
            loss_down = compute_loss(spec, shifted_down, features, labels)
            gradient[index] = (loss_up - loss_down) / (2 * step)
        gradients[name] = gradient
    return gradients


def dp_plan(*, learning_rate, clip_norm, noise_multiplier, sampling_rate, local_steps) -> TrainingPlan:
    dp = LocalDpConfig(
        clip_norm=clip_norm, noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, local_steps=local_steps
    )
    return TrainingPlan(learning_rate=learning_rate, batch_size=1, local_epochs=1, dp=dp)


class NoSamplingGenerator:
    """Stand-in for np.random.Generator whose Poisson draws select no example and whose noise is +1 std.

    It records the shape of every noise draw.
    """

    def __init__(self):
        self.noise_shapes = []

    def random(self, size):
        return np.ones(size)

    def normal(self, loc, scale, size):
        self.noise_shapes.append(tuple(size))
        return np.full(size, loc + scale)


# Gradients


@pytest.mark.parametrize("spec", [SOFTMAX_SPEC, MLP_SPEC], ids=["softmax_regression", "mlp"])
def test_gradient_matches_finite_differences(spec):
    weights = make_random_weights(spec)
    features, labels = make_examples(spec, 6)

    factors = compute_gradient_factors(spec, weights, features, labels)
    gradients = {name: value / labels.size for name, value in sum_gradients(factors).items()}
    expected = finite_difference_gradients(spec, weights, features, labels)

    for name in expected:
        np.testing.assert_allclose(gradients[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("spec", [SOFTMAX_SPEC, MLP_SPEC], ids=["softmax_regression", "mlp"])
def test_per_example_gradients_match_single_example_batches(spec):
    weights = make_random_weights(spec)
    features, labels = make_examples(spec, 4)

    per_example = compute_per_example_gradients(compute_gradient_factors(spec, weights, features, labels))
    norms = compute_per_example_gradient_norms(compute_gradient_factors(spec, weights, features, labels))

    for i in range(labels.size):
        single = sum_gradients(compute_gradient_factors(spec, weights, features[i : i + 1], labels[i : i + 1]))
        for name in single:
            np.testing.assert_allclose(per_example[name][i], single[name], rtol=1e-12, atol=1e-12, err_msg=name)
        expected_norm = np.sqrt(sum(np.sum(single[name] ** 2) for name in single))
        np.testing.assert_allclose(norms[i], expected_norm, rtol=1e-12)


# DP-SGD clipping and noise


def test_clip_and_sum_gradients_matches_explicit_clipping():
    weights = make_random_weights(MLP_SPEC)
    features, labels = make_examples(MLP_SPEC, 8)
    factors = compute_gradient_factors(MLP_SPEC, weights, features, labels)
    per_example = compute_per_example_gradients(factors)
    norms = compute_per_example_gradient_norms(factors)
    clip_norm = float(np.median(norms))

    clipped_sum = clip_and_sum_gradients(factors, clip_norm=clip_norm)

    scales = np.minimum(1.0, clip_norm / norms)
    assert np.any(scales < 1.0)
    assert np.any(scales == 1.0)
    for name, gradients in per_example.items():
        expected = np.tensordot(scales, gradients, axes=1)
        np.testing.assert_allclose(clipped_sum[name], expected, rtol=1e-10, atol=1e-12, err_msg=name)


def test_clipped_gradient_norm_equals_clip_norm():
    # Zero weights predict uniformly, so with large features every gradient norm is far above clip_norm.
    weights = initial_weights(SOFTMAX_SPEC, np.random.default_rng(0))
    features, labels = make_examples(SOFTMAX_SPEC, 5)
    features *= 100.0
    clip_norm = 0.3

    for i in range(labels.size):
        factors = compute_gradient_factors(SOFTMAX_SPEC, weights, features[i : i + 1], labels[i : i + 1])
        clipped = clip_and_sum_gradients(factors, clip_norm=clip_norm)
        norm = np.sqrt(sum(np.sum(value**2) for value in clipped.values()))
        assert norm == pytest.approx(clip_norm, rel=1e-9)


def test_dp_sgd_clips_step_with_huge_learning_rate():
    weights = initial_weights(SOFTMAX_SPEC, np.random.default_rng(0))
    features, labels = make_examples(SOFTMAX_SPEC, 1)
    features *= 1000.0
    plan = dp_plan(learning_rate=1e6, clip_norm=0.5, noise_multiplier=0.0, sampling_rate=1.0, local_steps=1)

    new_weights = train_locally(SOFTMAX_SPEC, weights, features, labels, plan, rng=np.random.default_rng(0))

    update = compute_update(new_weights, weights)
    update_norm = np.sqrt(sum(np.sum(value.astype(np.float64) ** 2) for value in update.values()))
    # One example, q = 1: the step is learning_rate * clipped gradient / 1.
    assert update_norm == pytest.approx(1e6 * 0.5, rel=1e-5)


def test_dp_sgd_noise_std_matches_calibration():
    """The noise std of the step is noise_multiplier * clip_norm / (sampling_rate * n)."""
    spec = {"kind": "softmax_regression", "num_features": 1000, "num_classes": 4}
    num_examples = 8
    features = np.zeros((num_examples, spec["num_features"]), dtype=np.float32)
    labels = np.zeros(num_examples, dtype=np.int64)
    # Zero features make every weight gradient exactly zero, so the weight update is pure noise.
    weights = initial_weights(spec, np.random.default_rng(0))
    plan = dp_plan(learning_rate=1.0, clip_norm=2.0, noise_multiplier=1.5, sampling_rate=0.5, local_steps=1)

    new_weights = train_locally(spec, weights, features, labels, plan, rng=np.random.default_rng(1))

    noise = compute_update(new_weights, weights)["weight"].astype(np.float64).ravel()
    expected_std = 1.5 * 2.0 / (0.5 * num_examples)
    assert np.std(noise) == pytest.approx(expected_std, rel=0.05)
    assert abs(np.mean(noise)) < 4 * expected_std / np.sqrt(noise.size)


def test_dp_sgd_divides_by_expected_batch_size():
    """The step divides by sampling_rate * n, not by the realised Poisson batch size."""
    num_examples = 10
    sampling_rate = 0.5
    clip_norm = 1e-3
    learning_rate = 2.0
    features = np.ones((num_examples, SOFTMAX_SPEC["num_features"]), dtype=np.float32)
    labels = np.zeros(num_examples, dtype=np.int64)
    weights = initial_weights(SOFTMAX_SPEC, np.random.default_rng(0))
    plan = dp_plan(
        learning_rate=learning_rate, clip_norm=clip_norm, noise_multiplier=0.0, sampling_rate=sampling_rate, local_steps=1
    )

    implied_batch_sizes = []
    for seed in range(20):
        new_weights = train_locally(SOFTMAX_SPEC, weights, features, labels, plan, rng=np.random.default_rng(seed))
        update = compute_update(new_weights, weights)
        update_norm = np.sqrt(sum(np.sum(value.astype(np.float64) ** 2) for value in update.values()))
        # Identical examples, all clipped to norm C: ||update|| = lr * |batch| * C / (q * n).
        implied_batch_sizes.append(update_norm * sampling_rate * num_examples / (learning_rate * clip_norm))

    np.testing.assert_allclose(implied_batch_sizes, np.round(implied_batch_sizes), atol=1e-3)
    assert len(set(np.round(implied_batch_sizes))) > 1


def test_dp_sgd_empty_batch_still_steps():
    """An empty Poisson batch still adds noise and counts as one of local_steps."""
    weights = initial_weights(SOFTMAX_SPEC, np.random.default_rng(0))
    features, labels = make_examples(SOFTMAX_SPEC, 4)
    plan = dp_plan(learning_rate=0.1, clip_norm=2.0, noise_multiplier=1.5, sampling_rate=0.5, local_steps=3)
    rng = NoSamplingGenerator()

    new_weights = train_locally(SOFTMAX_SPEC, weights, features, labels, plan, rng=rng)

    assert len(rng.noise_shapes) == 3 * len(tensor_specs(SOFTMAX_SPEC))
    # Each step adds +sigma * C / (q * n) noise and steps by -learning_rate times it.
    expected_change = -3 * 0.1 * 1.5 * 2.0 / (0.5 * 4)
    for name, array in compute_update(new_weights, weights).items():
        np.testing.assert_allclose(array, expected_change, rtol=1e-6, err_msg=name)


# Local training


@pytest.mark.parametrize("use_dp", [False, True], ids=["sgd", "dp_sgd"])
def test_train_locally_does_not_mutate_inputs(use_dp):
    weights = make_random_weights(MLP_SPEC)
    weights = {name: value.astype(np.float32) for name, value in weights.items()}
    features, labels = make_examples(MLP_SPEC, 12)
    weights_before = {name: value.copy() for name, value in weights.items()}
    features_before = features.copy()
    labels_before = labels.copy()
    if use_dp:
        plan = dp_plan(learning_rate=0.5, clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5, local_steps=2)
    else:
        plan = TrainingPlan(learning_rate=0.5, batch_size=4, local_epochs=2)

    new_weights = train_locally(MLP_SPEC, weights, features, labels, plan, rng=np.random.default_rng(0))

    for name in weights:
        np.testing.assert_array_equal(weights[name], weights_before[name], err_msg=name)
        assert new_weights[name] is not weights[name]
        assert new_weights[name].dtype == np.float32
        assert not np.array_equal(new_weights[name], weights[name]), name
    np.testing.assert_array_equal(features, features_before)
    np.testing.assert_array_equal(labels, labels_before)


def test_train_locally_reduces_loss_without_dp():
    features, labels = make_examples(SOFTMAX_SPEC, 60)
    # Make the classes learnable: shift each example along its own class's axis.
    features[np.arange(labels.size), labels] += 3.0
    weights = initial_weights(SOFTMAX_SPEC, np.random.default_rng(0))
    plan = TrainingPlan(learning_rate=0.5, batch_size=8, local_epochs=5)

    new_weights = train_locally(SOFTMAX_SPEC, weights, features, labels, plan, rng=np.random.default_rng(0))

    assert compute_loss(SOFTMAX_SPEC, new_weights, features, labels) < 0.5 * np.log(3)
    assert evaluate_accuracy(SOFTMAX_SPEC, new_weights, features, labels) > 0.9


def test_train_locally_is_deterministic_for_a_seed():
    features, labels = make_examples(MLP_SPEC, 20)
    weights = initial_weights(MLP_SPEC, np.random.default_rng(0))
    plan = dp_plan(learning_rate=0.5, clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.3, local_steps=4)

    first = train_locally(MLP_SPEC, weights, features, labels, plan, rng=np.random.default_rng(5))
    second = train_locally(MLP_SPEC, weights, features, labels, plan, rng=np.random.default_rng(5))

    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def _invalid_example_cases() -> list:
    features, labels = make_examples(SOFTMAX_SPEC, 4)
    nan_features = features.copy()
    nan_features[1, 2] = np.nan
    return [
        pytest.param(features[:, :4], labels, "Features have shape", id="wrong_feature_count"),
        pytest.param(features, np.array([0, 1, 2, 3]), "Labels range", id="label_out_of_range"),
        pytest.param(features, labels.astype(np.float64), "integer dtype", id="float_labels"),
        pytest.param(features, labels[:3], "Labels have shape", id="label_count_mismatch"),
        pytest.param(features[:0], labels[:0], "zero local examples", id="no_examples"),
        pytest.param(nan_features, labels, "NaN", id="nan_feature"),
    ]


@pytest.mark.parametrize(("features", "labels", "message"), _invalid_example_cases())
def test_train_locally_rejects_invalid_examples(features, labels, message):
    weights = initial_weights(SOFTMAX_SPEC, np.random.default_rng(0))
    plan = TrainingPlan(learning_rate=0.1, batch_size=2, local_epochs=1)

    with pytest.raises(ValueError, match=message):
        train_locally(SOFTMAX_SPEC, weights, features, labels, plan, rng=np.random.default_rng(0))


def test_train_locally_rejects_wrong_weight_shape():
    weights = initial_weights(SOFTMAX_SPEC, np.random.default_rng(0))
    weights["bias"] = np.zeros(4, dtype=np.float32)
    features, labels = make_examples(SOFTMAX_SPEC, 4)
    plan = TrainingPlan(learning_rate=0.1, batch_size=2, local_epochs=1)

    with pytest.raises(ValueError, match="'bias' has shape"):
        train_locally(SOFTMAX_SPEC, weights, features, labels, plan, rng=np.random.default_rng(0))


def test_compute_update_returns_float32_difference():
    base = {"weight": np.array([[1.0, 2.0]], dtype=np.float32)}
    new = {"weight": np.array([[1.5, 1.0]], dtype=np.float32)}

    update = compute_update(new, base)

    assert update["weight"].dtype == np.float32
    np.testing.assert_array_equal(update["weight"], np.array([[0.5, -1.0]], dtype=np.float32))


def test_compute_update_rejects_mismatched_tensors():
    base = {"weight": np.zeros((1, 2), dtype=np.float32)}

    with pytest.raises(ValueError):
        compute_update({"other": np.zeros((1, 2), dtype=np.float32)}, base)
    with pytest.raises(ValueError):
        compute_update({"weight": np.zeros((2, 1), dtype=np.float32)}, base)


# Model specs and weights


def test_tensor_specs_lists_tensors_in_fixed_order():
    softmax = tensor_specs(SOFTMAX_SPEC)
    mlp = tensor_specs(MLP_SPEC)

    assert softmax == [TensorSpec("weight", (5, 3)), TensorSpec("bias", (3,))]
    assert mlp == [
        TensorSpec("hidden.weight", (5, 7)),
        TensorSpec("hidden.bias", (7,)),
        TensorSpec("output.weight", (7, 3)),
        TensorSpec("output.bias", (3,)),
    ]


def test_initial_weights_float32_and_initialised():
    softmax = initial_weights(SOFTMAX_SPEC, np.random.default_rng(0))
    mlp = initial_weights(MLP_SPEC, np.random.default_rng(0))

    for weights in (softmax, mlp):
        for name, array in weights.items():
            assert array.dtype == np.float32, name
    assert not np.any(softmax["weight"])
    assert np.all(mlp["hidden.weight"] != 0)
    assert not np.any(mlp["hidden.bias"])


def test_predict_logits_returns_one_row_per_example():
    weights = make_random_weights(MLP_SPEC)
    features, _ = make_examples(MLP_SPEC, 9)

    logits = predict_logits(MLP_SPEC, weights, features)

    assert logits.shape == (9, 3)


def test_validate_model_spec_normalises_numpy_integers():
    spec = {"kind": "mlp", "num_features": np.int64(4), "hidden_units": 8, "num_classes": np.int32(2)}

    normalised = validate_model_spec(spec)

    assert normalised == {"kind": "mlp", "num_features": 4, "hidden_units": 8, "num_classes": 2}
    assert type(normalised["num_features"]) is int


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "cnn", "num_features": 4, "num_classes": 2}, "kind"),
        ({"num_features": 4, "num_classes": 2}, "kind"),
        ({"kind": "softmax_regression", "num_features": 4, "num_classes": 2, "hidden_units": 3}, "unknown keys"),
        ({"kind": "softmax_regression", "num_features": 4}, "num_classes"),
        ({"kind": "softmax_regression", "num_features": True, "num_classes": 2}, "num_features"),
        ({"kind": "softmax_regression", "num_features": 4.0, "num_classes": 2}, "num_features"),
        ({"kind": "softmax_regression", "num_features": 0, "num_classes": 2}, "num_features"),
        ({"kind": "softmax_regression", "num_features": 4, "num_classes": 1}, "num_classes"),
        ({"kind": "mlp", "num_features": 4, "hidden_units": -1, "num_classes": 2}, "hidden_units"),
        ({"kind": "mlp", "num_features": 10_000, "hidden_units": 10_000, "num_classes": 2}, "parameters"),
        ("softmax_regression", "mapping"),
    ],
)
def test_validate_model_spec_rejects_invalid_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        validate_model_spec(spec)


def test_validate_model_spec_accepts_max_parameters():
    # (F + 1) * C parameters for softmax regression.
    spec = {"kind": "softmax_regression", "num_features": MAX_PARAMETERS // 2 - 1, "num_classes": 2}

    assert validate_model_spec(spec)["num_features"] == MAX_PARAMETERS // 2 - 1


# Training plans


def test_training_plan_round_trips_through_json():
    plan = dp_plan(learning_rate=0.2, clip_norm=1.0, noise_multiplier=1.8, sampling_rate=0.2, local_steps=5)

    restored = TrainingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))

    assert restored == plan


def test_training_plan_dp_defaults_to_none():
    plan = TrainingPlan.from_dict({"learning_rate": 1, "batch_size": 8, "local_epochs": 2})

    assert plan.dp is None
    assert plan.learning_rate == 1.0
    assert type(plan.learning_rate) is float


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"learning_rate": 0.1, "batch_size": 8, "local_epochs": 1, "momentum": 0.9}, "unknown keys"),
        ({"learning_rate": 0.1, "batch_size": 8}, "local_epochs"),
        ({"learning_rate": 0.0, "batch_size": 8, "local_epochs": 1}, "learning_rate"),
        ({"learning_rate": float("nan"), "batch_size": 8, "local_epochs": 1}, "learning_rate"),
        ({"learning_rate": "0.1", "batch_size": 8, "local_epochs": 1}, "learning_rate"),
        ({"learning_rate": 0.1, "batch_size": True, "local_epochs": 1}, "batch_size"),
        ({"learning_rate": 0.1, "batch_size": 8, "local_epochs": 0}, "local_epochs"),
        ({"learning_rate": 0.1, "batch_size": 8, "local_epochs": 1, "dp": [1.0]}, "dp"),
        ({"learning_rate": 0.1, "batch_size": 8, "local_epochs": 1, "dp": {"clip_norm": 1.0}}, "missing"),
        (
            {
                "learning_rate": 0.1,
                "batch_size": 8,
                "local_epochs": 1,
                "dp": {"clip_norm": 1.0, "noise_multiplier": 1.0, "sampling_rate": 0.1, "local_steps": 1, "delta": 1e-5},
            },
            "unknown keys",
        ),
        ([("learning_rate", 0.1)], "mapping"),
    ],
)
def test_training_plan_from_dict_rejects_invalid_data(data, message):
    with pytest.raises(ValueError, match=message):
        TrainingPlan.from_dict(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("clip_norm", 0.0),
        ("clip_norm", float("inf")),
        ("noise_multiplier", -0.1),
        ("sampling_rate", 0.0),
        ("sampling_rate", 1.5),
        ("local_steps", 0),
        ("local_steps", 2.0),
        ("local_steps", True),
    ],
)
def test_local_dp_config_rejects_invalid_field(field, value):
    arguments = {"clip_norm": 1.0, "noise_multiplier": 1.0, "sampling_rate": 0.2, "local_steps": 5}
    arguments[field] = value

    with pytest.raises(ValueError, match=field):
        LocalDpConfig(**arguments)


# Datasets


@pytest.mark.parametrize(("name", "shape", "num_classes"), [("digits", (1797, 64), 10), ("breast_cancer", (569, 30), 2)])
def test_load_dataset_returns_scaled_float32_features(name, shape, num_classes):
    features, labels = load_dataset(name)

    assert features.shape == shape
    assert features.dtype == np.float32
    assert labels.dtype == np.int64
    assert features.min() >= 0.0
    # Breast cancer maxima are rounded in the dataset description, so values reach just above 1.
    assert features.max() <= 1.01
    assert set(np.unique(labels)) == set(range(num_classes))


def test_load_dataset_rejects_unknown_name():
    with pytest.raises(ValueError) as error:
        load_dataset("mnist")

    for name in DATASET_NAMES:
        assert name in str(error.value)


def test_split_train_test_is_stratified_and_disjoint():
    features, labels = load_dataset("digits")
    row_ids = np.arange(labels.size, dtype=np.float32)[:, np.newaxis]

    train_ids, train_labels, test_ids, test_labels = split_train_test(row_ids, labels, test_fraction=0.2, seed=0)

    assert test_labels.size == 360
    assert train_labels.size + test_labels.size == labels.size
    assert not set(train_ids.ravel()) & set(test_ids.ravel())
    test_class_fractions = np.bincount(test_labels) / test_labels.size
    all_class_fractions = np.bincount(labels) / labels.size
    np.testing.assert_allclose(test_class_fractions, all_class_fractions, atol=0.01)


def test_split_train_test_rejects_invalid_fraction():
    features, labels = make_examples(SOFTMAX_SPEC, 10)

    with pytest.raises(ValueError, match="test_fraction"):
        split_train_test(features, labels, test_fraction=1.0, seed=0)


def test_dirichlet_partition_uses_every_index_exactly_once():
    labels = np.random.default_rng(0).integers(0, 10, size=500)

    partition = dirichlet_partition(labels, num_devices=20, alpha=0.5, rng=np.random.default_rng(0), min_examples=5)

    all_indices = np.concatenate(partition)
    assert len(partition) == 20
    assert all_indices.size == labels.size
    np.testing.assert_array_equal(np.sort(all_indices), np.arange(labels.size))
    assert min(indices.size for indices in partition) >= 5
    assert all(indices.dtype == np.int64 for indices in partition)


def test_dirichlet_partition_meets_min_examples_for_tiny_alpha():
    labels = np.repeat(np.arange(10), 30)

    partition = dirichlet_partition(labels, num_devices=30, alpha=0.01, rng=np.random.default_rng(3), min_examples=10)

    assert [indices.size for indices in partition] == [10] * 30
    np.testing.assert_array_equal(np.sort(np.concatenate(partition)), np.arange(labels.size))


def test_dirichlet_partition_is_deterministic_for_a_seed():
    labels = np.random.default_rng(0).integers(0, 10, size=500)

    first = dirichlet_partition(labels, num_devices=20, alpha=0.5, rng=np.random.default_rng(7))
    second = dirichlet_partition(labels, num_devices=20, alpha=0.5, rng=np.random.default_rng(7))
    other_seed = dirichlet_partition(labels, num_devices=20, alpha=0.5, rng=np.random.default_rng(8))

    for first_indices, second_indices in zip(first, second, strict=True):
        np.testing.assert_array_equal(first_indices, second_indices)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other_seed, strict=True))


def test_dirichlet_partition_skews_labels_for_small_alpha():
    labels = np.repeat(np.arange(10), 100)

    partition = dirichlet_partition(labels, num_devices=10, alpha=0.1, rng=np.random.default_rng(0))

    # Share of each device's examples in its most common class. IID devices would have about 0.1.
    top_class_shares = [np.bincount(labels[indices]).max() / indices.size for indices in partition]
    assert np.mean(top_class_shares) > 0.5


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_devices": 0, "alpha": 0.5}, "num_devices"),
        ({"num_devices": True, "alpha": 0.5}, "num_devices"),
        ({"num_devices": 4, "alpha": 0.0}, "alpha"),
        ({"num_devices": 4, "alpha": float("inf")}, "alpha"),
        ({"num_devices": 4, "alpha": 0.5, "min_examples": -1}, "min_examples"),
        ({"num_devices": 4, "alpha": 0.5, "min_examples": 6}, "need 24 examples"),
    ],
)
def test_dirichlet_partition_rejects_invalid_arguments(arguments, message):
    labels = np.arange(20) % 3

    with pytest.raises(ValueError, match=message):
        dirichlet_partition(labels, rng=np.random.default_rng(0), **arguments)


def test_dirichlet_partition_rejects_float_labels():
    with pytest.raises(ValueError, match="labels"):
        dirichlet_partition(np.zeros(10), num_devices=2, alpha=1.0, rng=np.random.default_rng(0))


# Imports


def test_training_modules_import_no_sklearn_or_django():
    code = (
        "import sys, flo_client.models, flo_client.training; "
        "print(sorted(name for name in ('sklearn', 'django', 'dp_accounting', 'scipy') if name in sys.modules))"
    )

    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY_ROOT, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"
