"""Adaptive clip norm (geometric update of Andrew et al. 2021) and its noise accounting (no database)."""

import math

import numpy as np
import pytest

from privacy.adaptive_clipping import (
    AdaptiveClippingConfig,
    combined_noise_multiplier,
    update_clip_norm,
    update_noise_multiplier_for,
)

# Synthetic update norms: log-normal with median exp(mu) = 1 and log-scale
# sigma = 0.5, so the q-quantile is exp(sigma * Phi^-1(q)).
LOG_NORM_SCALE = 0.5
NORMAL_QUANTILE_90 = 1.2815515655446004  # Phi^-1(0.9)
COHORT_SIZE = 100
NUM_ROUNDS = 400
# The clip norm fluctuates from round to round, so the check averages log C
# over the last rounds instead of reading the last value.
NUM_AVERAGED_ROUNDS = 100


def track_quantile(target_quantile, *, seed):
    rng = np.random.default_rng(seed)
    config = AdaptiveClippingConfig(
        count_noise_multiplier=COHORT_SIZE / 20,
        target_quantile=target_quantile,
        learning_rate=0.2,
    )
    clip_norm = 0.1
    log_clip_norms = []
    for _ in range(NUM_ROUNDS):
        norms = rng.lognormal(mean=0.0, sigma=LOG_NORM_SCALE, size=COHORT_SIZE)
        clip_norm = update_clip_norm(
            clip_norm=clip_norm, norms=norms, config=config, expected_participants=COHORT_SIZE, rng=rng
        )
        log_clip_norms.append(math.log(clip_norm))
    return math.exp(float(np.mean(log_clip_norms[-NUM_AVERAGED_ROUNDS:])))


@pytest.mark.parametrize(
    ("target_quantile", "true_quantile"),
    [(0.5, 1.0), (0.9, math.exp(LOG_NORM_SCALE * NORMAL_QUANTILE_90))],
    ids=["median", "quantile_90"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_norm_tracks_target_quantile(target_quantile, true_quantile, seed):
    tracked = track_quantile(target_quantile, seed=seed)

    assert tracked == pytest.approx(true_quantile, rel=0.10)


def test_update_matches_hand_computation_without_noise():
    # 3 of 4 norms are <= 1: b_bar = (3 - 4/2) / 4 + 1/2 = 0.75, so C = exp(-0.2 * (0.75 - 0.5)).
    config = AdaptiveClippingConfig(count_noise_multiplier=0.0, target_quantile=0.5, learning_rate=0.2)

    new_clip_norm = update_clip_norm(
        clip_norm=1.0, norms=[0.2, 0.9, 1.0, 1.5], config=config, expected_participants=4.0, rng=np.random.default_rng(0)
    )

    assert new_clip_norm == pytest.approx(math.exp(-0.05), rel=1e-12)


def test_update_divides_by_expected_not_received_count():
    # 2 norms <= 1 of 2 received, m = 4: b_bar = (2 - 2/2) / 4 + 1/2 = 0.75.
    config = AdaptiveClippingConfig(count_noise_multiplier=0.0, target_quantile=0.5, learning_rate=0.2)

    new_clip_norm = update_clip_norm(
        clip_norm=1.0, norms=[0.5, 0.7], config=config, expected_participants=4.0, rng=np.random.default_rng(0)
    )

    assert new_clip_norm == pytest.approx(math.exp(-0.05), rel=1e-12)


def test_update_adds_count_noise_with_std_sigma_b():
    # 5 of 10 norms are <= 1, so the centred count is 0 and b_bar = 1/2 + N(0, (sigma_b / m)^2).
    # With sigma_b = 1 and m = 10 its std is 0.1, and b_bar - 1/2 = -log(C_new / C) / eta_C.
    config = AdaptiveClippingConfig(count_noise_multiplier=1.0, target_quantile=0.5, learning_rate=0.2)
    norms = np.array([0.5] * 5 + [2.0] * 5)
    rng = np.random.default_rng(1)

    fraction_offsets = np.array(
        [
            -math.log(update_clip_norm(clip_norm=1.0, norms=norms, config=config, expected_participants=10.0, rng=rng)) / 0.2
            for _ in range(4000)
        ]
    )

    assert float(np.std(fraction_offsets)) == pytest.approx(0.1, rel=0.05)
    assert abs(float(np.mean(fraction_offsets))) < 0.01


def test_empty_cohort_keeps_median_clip_norm_on_average():
    # The centred count of an empty cohort is 0, so b_bar = 1/2 + noise and gamma = 1/2 gives no drift.
    config = AdaptiveClippingConfig(count_noise_multiplier=0.0, target_quantile=0.5, learning_rate=0.2)

    new_clip_norm = update_clip_norm(
        clip_norm=0.3, norms=np.zeros(0), config=config, expected_participants=10.0, rng=np.random.default_rng(0)
    )

    assert new_clip_norm == pytest.approx(0.3, rel=1e-12)


def test_change_per_round_is_bounded():
    # Count noise of std 1000 pushes b_bar out of [0, 1] in almost every round. Limited to
    # [0, 1], b_bar - gamma stays within +-1/2, so C changes by at most a factor exp(0.2 / 2).
    config = AdaptiveClippingConfig(count_noise_multiplier=1000.0, target_quantile=0.5, learning_rate=0.2)
    rng = np.random.default_rng(2)

    ratios = [
        update_clip_norm(clip_norm=1.0, norms=[0.5, 2.0], config=config, expected_participants=2.0, rng=rng) for _ in range(200)
    ]

    assert max(ratios) <= math.exp(0.2 * 0.5) * (1 + 1e-12)
    assert min(ratios) >= math.exp(-0.2 * 0.5) * (1 - 1e-12)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"clip_norm": 0.0}, "clip_norm must be positive"),
        ({"clip_norm": math.nan}, "clip_norm must be finite"),
        ({"expected_participants": 0.0}, "expected_participants must be positive"),
        ({"norms": [[1.0]]}, r"norms must have shape \(k,\)"),
        ({"norms": [-1.0]}, "norms must be finite and at least 0"),
        ({"norms": [math.inf]}, "norms must be finite and at least 0"),
    ],
)
def test_update_clip_norm_rejects_invalid_arguments(arguments, message):
    valid = {
        "clip_norm": 1.0,
        "norms": [1.0],
        "config": AdaptiveClippingConfig(count_noise_multiplier=1.0),
        "expected_participants": 1.0,
        "rng": np.random.default_rng(0),
    }

    with pytest.raises(ValueError, match=message):
        update_clip_norm(**{**valid, **arguments})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"count_noise_multiplier": -1.0}, "count_noise_multiplier must be at least 0"),
        ({"count_noise_multiplier": 1.0, "target_quantile": 1.5}, r"target_quantile must be in \[0, 1\]"),
        ({"count_noise_multiplier": 1.0, "learning_rate": -0.1}, "learning_rate must be at least 0"),
        ({"count_noise_multiplier": math.inf}, "count_noise_multiplier must be finite"),
    ],
)
def test_config_rejects_invalid_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveClippingConfig(**fields)


def test_config_defaults_match_paper():
    config = AdaptiveClippingConfig(count_noise_multiplier=5.0)

    assert config.target_quantile == 0.5
    assert config.learning_rate == 0.2


# Noise multipliers of the update sum and the count released together.


def test_combined_noise_multiplier_matches_hand_computation():
    # (1^-2 + (2 * 0.5)^-2)^(-1/2) = 2^(-1/2)
    assert combined_noise_multiplier(update_noise_multiplier=1.0, count_noise_multiplier=0.5) == pytest.approx(
        1 / math.sqrt(2), rel=1e-12
    )
    # (1^-2 + 10^-2)^(-1/2) = 1.01^(-1/2) = 0.99503719...
    assert combined_noise_multiplier(update_noise_multiplier=1.0, count_noise_multiplier=5.0) == pytest.approx(
        0.9950371902099892, rel=1e-12
    )
    # (2^-2 + 4^-2)^(-1/2) = (0.3125)^(-1/2) = 1.78885438...
    assert combined_noise_multiplier(update_noise_multiplier=2.0, count_noise_multiplier=2.0) == pytest.approx(
        1.7888543819998317, rel=1e-12
    )


def test_update_noise_multiplier_for_matches_hand_computation():
    # (1^-2 - 10^-2)^(-1/2) = 0.99^(-1/2) = 1.00503782...
    assert update_noise_multiplier_for(target_noise_multiplier=1.0, count_noise_multiplier=5.0) == pytest.approx(
        1.005037815259212, rel=1e-12
    )
    # 200 expected clients give sigma_b = 200 / 20 = 10. With z = 3: (3^-2 - 20^-2)^(-1/2) = 3.0343...
    assert update_noise_multiplier_for(target_noise_multiplier=3.0, count_noise_multiplier=10.0) == pytest.approx(
        (1 / 9 - 1 / 400) ** -0.5, rel=1e-12
    )


@pytest.mark.parametrize(("target", "count_std"), [(0.5, 0.3), (1.0, 5.0), (4.0, 2.5), (10.0, 50.0)])
def test_update_noise_multiplier_inverts_combination(target, count_std):
    update_noise_multiplier = update_noise_multiplier_for(target_noise_multiplier=target, count_noise_multiplier=count_std)

    combined = combined_noise_multiplier(update_noise_multiplier=update_noise_multiplier, count_noise_multiplier=count_std)

    assert update_noise_multiplier > target
    assert combined == pytest.approx(target, rel=1e-12)


@pytest.mark.parametrize("count_std", [0.5, 0.4, 0.0])
def test_update_noise_multiplier_rejects_too_small_count_noise(count_std):
    with pytest.raises(ValueError, match="count_noise_multiplier .* is too small for target_noise_multiplier 1.0"):
        update_noise_multiplier_for(target_noise_multiplier=1.0, count_noise_multiplier=count_std)


def test_combined_noise_multiplier_is_zero_without_count_noise():
    assert combined_noise_multiplier(update_noise_multiplier=3.0, count_noise_multiplier=0.0) == 0.0


def test_combined_noise_multiplier_is_zero_without_update_noise():
    assert combined_noise_multiplier(update_noise_multiplier=0.0, count_noise_multiplier=3.0) == 0.0


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_combined_noise_multiplier_rejects_invalid_values(value):
    with pytest.raises(ValueError, match="update_noise_multiplier must be"):
        combined_noise_multiplier(update_noise_multiplier=value, count_noise_multiplier=1.0)


@pytest.mark.parametrize("value", [-1.0, 0.0, math.nan, math.inf])
def test_update_noise_multiplier_for_rejects_invalid_target(value):
    with pytest.raises(ValueError, match="target_noise_multiplier must be"):
        update_noise_multiplier_for(target_noise_multiplier=value, count_noise_multiplier=1.0)
