"""Krum scores and the Krum, Multi-Krum and Bulyan selections on flattened updates.

Pure module: numpy only; the Gram matrix is in `federation.aggregation.kernels`
and the closest-to-median mean in `federation.aggregation.order_statistics`. The rule contract (configuration, preconditions,
input checks) is in `federation.aggregation.robust`. These functions
assume valid shapes and leave precondition checks to their callers.

Every selection orders updates by (Krum score, client index), so ties go to
the lowest index, as `np.argmin` does in Flower 1.42.0's `aggregate_krum`.
An update with a NaN or infinite value gets an infinite score and is never
selected. When a selection cannot be filled with finite scores, the
functions raise instead of choosing among infinite scores.
"""

import numpy as np
import numpy.typing as npt

from federation.aggregation.fedavg import AggregationError, FloatArray
from federation.aggregation.kernels import Stack, find_non_finite_rows, pairwise_squared_distances
from federation.aggregation.order_statistics import closest_to_median_mean

IntArray = npt.NDArray[np.integer]

# Flower 1.42.0's aggregate_krum scores with max(1, n - f - 2) neighbours, so
# inside Bulyan, once fewer than f + 3 updates remain, each update is still
# scored by its nearest neighbour rather than by no neighbour at all.
BULYAN_MIN_NEIGHBOURS = 1


def score_updates(distances: FloatArray, *, num_neighbours: int) -> FloatArray:
    """Compute each update's Krum score: the sum of its `num_neighbours` smallest distances to the others.

    Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent" (NeurIPS), define the score with
    num_neighbours = n - f - 2.

    Args:
        distances: (n_clients, n_clients) output of `pairwise_squared_distances`.
        num_neighbours: neighbours summed per update, from 0 to n_clients - 1.

    Returns:
        (n_clients,) float64 scores. A non-finite update (inf on the diagonal)
        scores inf, and so does a finite one with fewer than
        `num_neighbours` finite distances.
    """
    others = distances.copy()
    np.fill_diagonal(others, np.inf)
    scores = np.zeros(distances.shape[0])
    if num_neighbours > 0:
        # A partition finds the smallest values in linear time per row, and their order does not matter for the sum.
        scores = np.partition(others, num_neighbours - 1, axis=1)[:, :num_neighbours].sum(axis=1)
    scores[np.isinf(np.diagonal(distances))] = np.inf
    return scores


def select_multi_krum(points: Stack, *, num_byzantine: int, num_selected: int, rule_label: str) -> IntArray:
    """Select the `num_selected` updates with the lowest Krum scores, computed once.

    Args:
        points: (n_clients, n_params) updates, n_clients >= 2 * num_byzantine + 3.
        num_byzantine: f, the number of Byzantine updates tolerated.
        num_selected: m, from 1 to n_clients - num_byzantine; 1 is Krum.
        rule_label: rule name used in error messages.

    Returns:
        (num_selected,) indices of the selected updates, ascending.

    Raises:
        AggregationError: fewer than `num_selected` updates have a finite score.
    """
    num_clients = points.shape[0]
    scores = score_updates(pairwise_squared_distances(points), num_neighbours=num_clients - num_byzantine - 2)
    num_finite_scores = int(np.count_nonzero(np.isfinite(scores)))
    if num_finite_scores < num_selected:
        raise AggregationError(
            f"{rule_label} must select {num_selected} update(s) with a finite Krum score, but only {num_finite_scores} of {num_clients} "
            f"have one ({_count_finite(points)} updates are finite, f={num_byzantine}). A finite update gets a score only with "
            f"{num_clients - num_byzantine - 2} finite neighbours, so reject the non-finite updates before aggregating."
        )

    # A stable sort keeps the lower index first among equal scores.
    return np.sort(np.argsort(scores, kind="stable")[:num_selected])


def select_bulyan(points: Stack, *, num_byzantine: int) -> IntArray:
    """Select Bulyan's set of theta = n - 2f updates by applying Krum repeatedly.

    El Mhamdi, Guerraoui and Rouault 2018, "The Hidden Vulnerability of
    Distributed Learning in Byzantium" (ICML): each step scores the updates
    still remaining with the same f, moves the one with the lowest score into
    the selection set, and repeats until the set contains theta updates.

    With s updates remaining, a step sums max(1, s - f - 2) neighbours (at
    most s - 1), as Flower 1.42.0's `aggregate_bulyan` does with
    `aggregate_krum` as its inner rule. In the last steps s falls to 2f + 1,
    below Krum's own requirement s >= 2f + 3, so this inner Krum is not held
    to that precondition. Bulyan as a whole requires n >= 4f + 3.

    Args:
        points: (n_clients, n_params) updates, n_clients >= 4 * num_byzantine + 3.
        num_byzantine: f, the number of Byzantine updates tolerated.

    Returns:
        (theta,) indices of the selected updates, ascending.

    Raises:
        AggregationError: a step finds no remaining update with a finite score.
    """
    num_clients = points.shape[0]
    num_to_select = num_clients - 2 * num_byzantine
    distances = pairwise_squared_distances(points)
    remaining = list(range(num_clients))
    selected: list[int] = []
    # Each step depends on the previous one, so the loop runs theta times, and the work inside each step is vectorised.
    for _ in range(num_to_select):
        num_remaining = len(remaining)
        num_neighbours = min(max(BULYAN_MIN_NEIGHBOURS, num_remaining - num_byzantine - 2), num_remaining - 1)
        scores = score_updates(distances[np.ix_(remaining, remaining)], num_neighbours=num_neighbours)
        best = int(np.argmin(scores))
        if not np.isfinite(scores[best]):
            raise AggregationError(
                f"Bulyan cannot fill its selection set of {num_to_select}: after {len(selected)} selections no remaining update "
                f"has a finite Krum score ({_count_finite(points)} of {num_clients} updates are finite, f={num_byzantine})."
            )
        selected.append(remaining.pop(best))
    return np.array(sorted(selected), dtype=np.int64)


def average_closest_to_median(points: Stack, *, rows: IntArray, num_closest: int) -> tuple[FloatArray, FloatArray]:
    """Average, per coordinate, the `num_closest` values of `rows` nearest their coordinate-wise median.

    The second phase of Bulyan (El Mhamdi et al. 2018), with beta =
    `num_closest`. The median of an even count is the mean of the two middle
    values, as in `np.median`. Among values equally far from the median the
    one from the lower row is taken first. Works on column blocks, so the
    selection set is never copied whole.

    Args:
        points: (n_clients, n_params) updates; the rows in `rows` are finite.
        rows: (n_selected,) ascending indices of the selection set.
        num_closest: beta, from 1 to n_selected.

    Returns:
        (aggregate, averaged_fraction): the (n_params,) float64 unweighted mean
        of the chosen values, and per entry of `rows` the fraction of
        coordinates at which its value entered it.
    """
    aggregate, averaged_counts = closest_to_median_mean(points, rows=rows, num_closest=num_closest)
    return aggregate, averaged_counts / points.shape[1]


def _count_finite(points: Stack) -> int:
    return points.shape[0] - find_non_finite_rows(points).size
