"""Per-round reputation outcomes and the moving-average score (pure module)."""

import numpy as np
import pytest

from federation.aggregation.reputation import distances_to, next_score, score_accepted_updates


def test_distance_scores_mark_far_outlier():
    # Median distance 1: ratios 1, 1, 1, 10 score 1, 1, 1 and 0.
    outcomes = score_accepted_updates(distances=np.array([1.0, 1.0, 1.0, 10.0]), kept_fraction=None, elapsed_fraction=np.zeros(4))

    assert [outcome.distance_score for outcome in outcomes] == [1.0, 1.0, 1.0, 0.0]


def test_distance_score_is_linear_between_ratios():
    # Median 1; ratio 3 lies halfway between 2 and 4.
    outcomes = score_accepted_updates(distances=np.array([1.0, 1.0, 3.0]), kept_fraction=None, elapsed_fraction=np.zeros(3))

    assert outcomes[2].distance_score == pytest.approx(0.5)


def test_kept_scores_relative_to_median_share():
    # Median share 0.6: 0.8 / 0.6 caps at 1, 0.4 / 0.6 = 2/3, 0 stays 0.
    outcomes = score_accepted_updates(distances=np.ones(4), kept_fraction=np.array([0.8, 0.8, 0.4, 0.0]), elapsed_fraction=np.zeros(4))

    assert [outcome.kept_score for outcome in outcomes] == pytest.approx([1.0, 1.0, 2 / 3, 0.0])


def test_outcome_multiplies_distance_and_kept_factor():
    outcomes = score_accepted_updates(distances=np.array([1.0, 1.0, 3.0]), kept_fraction=np.array([1.0, 1.0, 0.25]), elapsed_fraction=np.zeros(3))

    # Distance ratio 3 scores 0.5; kept share 0.25 against a median of 1 gives 0.5 + 0.5 * 0.25.
    assert outcomes[2].outcome == pytest.approx(0.5 * 0.625)


def test_dropped_update_near_aggregate_keeps_half():
    outcomes = score_accepted_updates(distances=np.ones(3), kept_fraction=np.array([1.0, 1.0, 0.0]), elapsed_fraction=np.zeros(3))

    assert outcomes[2].outcome == pytest.approx(0.5)


def test_late_update_scales_outcome():
    # Three quarters of the window: 1 - 0.5 * (0.75 - 0.5) / 0.5 = 0.75.
    outcomes = score_accepted_updates(distances=np.ones(2), kept_fraction=None, elapsed_fraction=np.array([0.1, 0.75]))

    assert outcomes[0].timeliness == 1.0
    assert outcomes[1].timeliness == pytest.approx(0.75)
    assert outcomes[1].outcome == pytest.approx(0.75)


def test_identical_updates_all_score_one():
    outcomes = score_accepted_updates(distances=np.zeros(3), kept_fraction=None, elapsed_fraction=np.zeros(3))

    assert [outcome.outcome for outcome in outcomes] == [1.0, 1.0, 1.0]


def test_timeliness_only_without_distances():
    outcomes = score_accepted_updates(distances=None, kept_fraction=None, elapsed_fraction=np.array([1.0]))

    assert outcomes[0].outcome == pytest.approx(0.5)


def test_persistent_outlier_falls_below_threshold_in_third_round():
    scores = [1.0]
    for _ in range(3):
        scores.append(next_score(scores[-1], 0.0))

    assert scores[1:] == pytest.approx([0.7, 0.49, 0.343])


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"distances": np.array([1.0, -1.0]), "kept_fraction": None, "elapsed_fraction": np.zeros(2)}, "non-negative"),
        ({"distances": np.array([1.0, np.nan]), "kept_fraction": None, "elapsed_fraction": np.zeros(2)}, "finite"),
        ({"distances": np.ones(3), "kept_fraction": None, "elapsed_fraction": np.zeros(2)}, "shape"),
        ({"distances": np.ones(2), "kept_fraction": np.array([0.5, 1.5]), "elapsed_fraction": np.zeros(2)}, "kept_fraction"),
        ({"distances": np.ones(2), "kept_fraction": None, "elapsed_fraction": np.array([0.0, 2.0])}, "elapsed_fraction"),
        ({"distances": None, "kept_fraction": None, "elapsed_fraction": np.zeros(0)}, "non-empty"),
    ],
)
def test_score_rejects_invalid_inputs(arguments, fragment):
    with pytest.raises(ValueError, match=fragment):
        score_accepted_updates(**arguments)


def test_next_score_rejects_outcome_above_one():
    with pytest.raises(ValueError, match="outcome"):
        next_score(1.0, 1.5)


def test_distances_to_aggregate():
    updates = np.array([[0.0, 0.0], [3.0, 4.0]])

    np.testing.assert_allclose(distances_to(updates, np.zeros(2)), [0.0, 5.0])
