"""Rényi DP of the Poisson-subsampled Gaussian mechanism, at integer and fractional orders.

Pure module: numpy and scipy only. It implements Mironov, Talwar and Zhang
2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism"
(arXiv:1908.10530). One step adds N(0, sigma^2) noise to a sum of
sensitivity-1 contributions, each record taking part with probability q.
Under add/remove-one neighbours its RDP at order alpha > 1 is
log(A_alpha) / (alpha - 1), where

    A_alpha = E_{z ~ mu0}[((1 - q) + q * mu1(z) / mu0(z))^alpha],
    mu0 = N(0, sigma^2), mu1 = N(1, sigma^2).

Integer orders use the finite binomial expansion of Section 3.3. Fractional
orders use the two convergent series of Section 3.3 with signed binomial
coefficients. TF Privacy and dp-accounting 0.6.0 sum the absolute values
of those terms, an upper bound, and drop the order when 1,000 terms are
not enough (near alpha = 1, where the terms decay like k^-(alpha + 2)).
Opacus sums the signed terms but may stop right after a negative one,
below the true value. Here the alternating tail is summed with the
Cohen-Villegas-Zagier acceleration, whose error bound applies because the
tail terms are moments of a positive measure. The result is an upper
bound on A_alpha within a relative 1e-18, plus a margin for float64
rounding, from a fixed 24 tail terms per order.
"""

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from scipy import special

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Tail terms summed per fractional order. The accelerated sum of n terms is
# within a relative 1 / T_n(3) < 2 / (3 + sqrt(8))^n of the tail, below 1e-18
# for n = 24.
TAIL_TERMS = 24

# Beyond these noise multipliers sigma^2 or k^2 / sigma^2 overflows float64.
# Below the smaller one the RDP is reported as inf, which is no usable bound.
# Above the larger one the call is rejected, because an RDP rounded to 0
# would be below the true value.
MIN_FINITE_NOISE_MULTIPLIER = 1e-150
MAX_NOISE_MULTIPLIER = 1e150

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_FLOAT64_EPSILON = float(np.finfo(np.float64).eps)


def compute_rdp_sampled_gaussian(*, noise_multiplier: float, sampling_rate: float, orders: npt.ArrayLike) -> FloatArray:
    """Compute the RDP of one step of the Poisson-subsampled Gaussian mechanism.

    Implements Mironov, Talwar and Zhang 2019 (arXiv:1908.10530), Section 3.3:
    the binomial expansion of A_alpha for integer orders and the two-part
    convergent series for fractional orders. Both are summed in log space.

    Args:
        noise_multiplier: sigma, the noise standard deviation divided by the
            L2 sensitivity; 0 means no noise.
        sampling_rate: q, the probability that a record takes part in the step.
        orders: RDP orders alpha, shape (n_orders,), each finite and > 1.

    Returns:
        RDP in nats at each order, shape (n_orders,), float64. It is 0 for
        q = 0, alpha / (2 sigma^2) for q = 1 (the plain Gaussian mechanism)
        and inf for sigma below MIN_FINITE_NOISE_MULTIPLIER (sigma = 0
        included) with q > 0. Integer orders are exact up to float64
        rounding. Fractional orders are upper bounds, within a relative
        1e-18 on A_alpha plus the rounding margin, which is near 1e-14 on
        A_alpha and so dominates when the RDP is below about 1e-10.

    Raises:
        ValueError: on a sampling rate outside [0, 1], a noise multiplier
            outside [0, MAX_NOISE_MULTIPLIER], or orders that are not a 1-D
            array of finite values > 1.
        ArithmeticError: when the fractional-order sum is not finite. No
            valid input is known to cause it; it guards against a silent
            NaN.
    """
    order_array = _validated_orders(orders)
    if not 0 <= sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate}.")
    if not (math.isfinite(noise_multiplier) and 0 <= noise_multiplier <= MAX_NOISE_MULTIPLIER):
        raise ValueError(f"noise_multiplier must be a number in [0, {MAX_NOISE_MULTIPLIER:g}], got {noise_multiplier}.")

    if sampling_rate == 0:
        return np.zeros_like(order_array)
    if noise_multiplier < MIN_FINITE_NOISE_MULTIPLIER:
        return np.full_like(order_array, np.inf)
    if sampling_rate == 1:
        return order_array / (2 * noise_multiplier**2)

    log_a = np.empty_like(order_array)
    is_integer = order_array == np.floor(order_array)
    if np.any(is_integer):
        log_a[is_integer] = _log_a_integer_orders(sampling_rate, noise_multiplier, tuple(order_array[is_integer].astype(np.int64).tolist()))
    if not np.all(is_integer):
        log_a[~is_integer] = _log_a_fractional_orders(sampling_rate, noise_multiplier, order_array[~is_integer])

    # A_alpha >= 1 (Jensen), so a negative log_a comes from rounding, and 0 keeps the bound valid.
    return np.maximum(log_a, 0.0) / (order_array - 1)


def _validated_orders(orders: npt.ArrayLike) -> FloatArray:
    order_array = np.asarray(orders, dtype=np.float64)
    if order_array.ndim != 1:
        raise ValueError(f"orders must be a 1-D array, got shape {order_array.shape}.")
    if not np.all(np.isfinite(order_array) & (order_array > 1)):
        raise ValueError(f"every RDP order must be finite and > 1, got {order_array[~(np.isfinite(order_array) & (order_array > 1))].tolist()}.")
    return order_array


# --- Integer orders --------------------------------------------------------


def _log_a_integer_orders(q: float, sigma: float, orders: tuple[int, ...]) -> FloatArray:
    """Return log(A_alpha) for integer orders alpha >= 2, shape (n_orders,).

    With sum_k C(alpha, k) (1 - q)^(alpha - k) q^k = 1, the binomial expansion
    A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2))
    becomes
    A_alpha - 1 = sum_{k=2}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k expm1((k^2 - k) / (2 sigma^2)),
    a sum of positive terms. Summing A_alpha - 1 keeps its relative accuracy
    when it is far below 1 (small q, large sigma), where summing A_alpha
    would round it away.
    """
    k, alpha, log_binomial, block_starts = _integer_expansion_layout(orders)
    exponent = k * (k - 1) / (2 * sigma**2)
    log_terms = log_binomial + k * math.log(q) + (alpha - k) * math.log1p(-q) + _log_expm1(exponent)

    log_a_minus_one = _segment_logsumexp(log_terms, block_starts)
    # log(A) = log(1 + exp(log(A - 1))).
    return np.logaddexp(0.0, log_a_minus_one)


@lru_cache(maxsize=8)
def _integer_expansion_layout(orders: tuple[int, ...]) -> tuple[FloatArray, FloatArray, FloatArray, IntArray]:
    """Lay out k = 2..alpha for every order in one flat array.

    Returns (k, alpha, log C(alpha, k), start index of each order's block).
    """
    counts = np.array(orders, dtype=np.int64) - 1
    block_starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    alpha = np.repeat(np.array(orders, dtype=np.float64), counts)
    k = (np.arange(alpha.size) - np.repeat(block_starts, counts) + 2).astype(np.float64)
    log_binomial = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
    for array in (k, alpha, log_binomial, block_starts):
        array.setflags(write=False)
    return k, alpha, log_binomial, block_starts


def _log_expm1(x: FloatArray) -> FloatArray:
    """Return log(exp(x) - 1) for x > 0 without overflow."""
    result = np.empty_like(x)
    is_large = x > 1.0
    # log(exp(x) - 1) = x + log(1 - exp(-x)).
    result[is_large] = x[is_large] + np.log1p(-np.exp(-x[is_large]))
    with np.errstate(divide="ignore"):  # a huge sigma underflows x to 0, giving log(0) = -inf
        result[~is_large] = np.log(np.expm1(x[~is_large]))
    return result


def _segment_logsumexp(values: FloatArray, starts: IntArray) -> FloatArray:
    """Return log(sum(exp(values))) over each block values[starts[i]:starts[i + 1]]."""
    block_max = np.maximum.reduceat(values, starts)
    # A block of -inf only (every term 0) is shifted by 0 and sums to log(0) = -inf.
    shift = np.where(np.isfinite(block_max), block_max, 0.0)
    lengths = np.diff(np.append(starts, values.size))
    shifted = np.exp(values - np.repeat(shift, lengths))
    with np.errstate(divide="ignore"):
        return shift + np.log(np.add.reduceat(shifted, starts))


# --- Fractional orders -----------------------------------------------------


def _log_a_fractional_orders(q: float, sigma: float, orders: FloatArray) -> FloatArray:
    """Return an upper bound on log(A_alpha) for non-integer orders alpha > 1, shape (n_orders,).

    Section 3.3 splits the integral at z0 = sigma^2 log(1/q - 1) + 1/2, where
    q mu1 = (1 - q) mu0, and expands the power as a binomial series on each
    side. With Phi the standard normal CDF and j = alpha - k:

        A_alpha = sum_{k>=0} C(alpha, k) [(1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)) Phi((z0 - k) / sigma)
                                          + q^j (1 - q)^k exp((j^2 - j) / (2 sigma^2)) Phi((j - z0) / sigma)].

    Writing Phi(-u) = phi(u) M(u), with M the Mills ratio, both parts share
    the factor c = (1 - q)^alpha exp(-z0^2 / (2 sigma^2)) / sqrt(2 pi):

        A_alpha = c sum_k C(alpha, k) [M((k - z0) / sigma) + M((k - alpha + z0) / sigma)].

    The terms are positive up to k = m = floor(alpha) + 1 and alternate in
    sign after it. For k = m + i the magnitudes are moments of a positive
    measure on [0, 1] in i, because
    |C(alpha, k)| = |sin(pi alpha)| / pi * integral_0^1 x^(k - alpha - 1) (1 - x)^alpha dx
    and M(u) = integral_0^inf exp(-u t - t^2 / 2) dt, a moment in y = exp(-t / sigma),
    and products and sums of moment sequences are moment sequences. That is
    the condition of Cohen, Rodriguez Villegas and Zagier 2000, "Convergence
    acceleration of alternating series" (Experimental Mathematics 9:1),
    Algorithm 1: with P the Chebyshev polynomial T_n(1 - 2x) and
    d = T_n(3), the weighted sum S_n of n terms satisfies
    S - S_n = (1/d) integral P(x) / (1 + x) dmu, so |S - S_n| <= S / d.
    """
    first_alternating_k = np.floor(orders) + 1
    num_head_terms = int(np.max(first_alternating_k))
    k = np.arange(num_head_terms + TAIL_TERMS, dtype=np.float64)[np.newaxis, :]
    alpha = orders[:, np.newaxis]
    tail_index = k - first_alternating_k[:, np.newaxis]

    # Weight 1 on the head, the signed accelerated weights on the n tail terms, 0 beyond.
    weights = np.zeros((orders.size, k.size))
    is_head = tail_index < 0
    weights[is_head] = 1.0
    is_tail = (tail_index >= 0) & (tail_index < TAIL_TERMS)
    weights[is_tail] = _alternating_tail_weights(TAIL_TERMS)[tail_index[is_tail].astype(np.int64)]
    is_used = is_head | is_tail

    log_magnitude = np.full(weights.shape, -np.inf)
    exponent_size = np.zeros(weights.shape)
    alpha_grid, k_grid = np.broadcast_arrays(alpha, k)
    log_magnitude[is_used], exponent_size[is_used] = _log_term_magnitudes(q, sigma, alpha_grid[is_used], k_grid[is_used])
    # The largest term lies in the head or at k = m, since the magnitudes decrease after m.
    log_scale = np.max(log_magnitude, axis=1)
    magnitude = np.exp(log_magnitude - log_scale[:, np.newaxis])

    head_sum = np.sum(np.where(is_head, magnitude, 0.0), axis=1)
    tail_estimate = np.sum(np.where(is_tail, weights * magnitude, 0.0), axis=1)
    # |S - S_n| <= S / d gives S <= S_n / (1 - 1/d).
    tail_upper_bound = np.maximum(tail_estimate, 0.0) / (1 - 1 / _chebyshev_t_at_3(TAIL_TERMS))
    # A term exp(x_1 + ... + x_r - log_scale) has a relative float64 error of
    # at most a few epsilons times |x_1| + ... + |x_r| + |log_scale|, and the
    # sums add a few epsilons per term. Twice that sum bounds the error.
    relative_error = 2 * _FLOAT64_EPSILON * (exponent_size + np.abs(log_scale)[:, np.newaxis] + k.size + 8)
    rounding_margin = np.sum(np.abs(weights) * magnitude * relative_error, axis=1)

    log_a = log_scale + np.log(head_sum + tail_upper_bound + rounding_margin)
    if not np.all(np.isfinite(log_a)):
        raise ArithmeticError(f"A_alpha is not finite at orders {orders[~np.isfinite(log_a)].tolist()} for q={q}, sigma={sigma}.")
    return log_a


def _log_term_magnitudes(q: float, sigma: float, alpha: FloatArray, k: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Return log|t_k| = log|C(alpha, k)| + alpha log(1 - q) + log of the bracketed sum, elementwise.

    The second array is the sum of the absolute values of the logarithms
    added to form log|t_k|, which scales its rounding error.
    """
    z0 = sigma**2 * (math.log1p(-q) - math.log(q)) + 0.5
    gammaln_parts = (special.gammaln(alpha + 1), special.gammaln(k + 1), special.gammaln(alpha - k + 1))
    log_binomial = gammaln_parts[0] - gammaln_parts[1] - gammaln_parts[2]
    j = alpha - k
    first, first_size = _log_series_part(q, sigma, z0, k, (k - z0) / sigma)
    second, second_size = _log_series_part(q, sigma, z0, j, (z0 - j) / sigma)
    log_prefactor = alpha * math.log1p(-q)
    log_bracket = np.logaddexp(first, second)
    # The relative error of a sum of two positive parts is the share-weighted
    # mean of their relative errors.
    bracket_size = np.exp(first - log_bracket) * first_size + np.exp(second - log_bracket) * second_size
    log_magnitude = log_binomial + log_prefactor + log_bracket
    exponent_size = sum(np.abs(part) for part in gammaln_parts) + np.abs(log_prefactor) + bracket_size
    return log_magnitude, exponent_size


def _log_series_part(q: float, sigma: float, z0: float, power: FloatArray, u: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Return log(exp(power * log(q / (1 - q)) + (power^2 - power) / (2 sigma^2)) Phi(-u)) and its exponent size.

    Both forms below are the same number. The direct form is accurate while
    Phi(-u) >= 1/2 (u <= 0). For u > 0 the direct form subtracts two large
    exponents, so the Mills-ratio form -z0^2 / (2 sigma^2) - log(sqrt(2 pi)) + log M(u)
    is used instead.
    """
    result = np.empty(u.shape)
    size = np.empty(u.shape)
    is_left = u <= 0
    p = power[is_left]
    parts = (p * (math.log(q) - math.log1p(-q)), (p * p - p) / (2 * sigma**2), special.log_ndtr(-u[is_left]))
    result[is_left] = parts[0] + parts[1] + parts[2]
    size[is_left] = np.abs(parts[0]) + np.abs(parts[1]) + np.abs(parts[2])
    # M(u) = Phi(-u) / phi(u) = sqrt(pi / 2) erfcx(u / sqrt(2)), stable for u > 0.
    log_mills = 0.5 * math.log(math.pi / 2) + np.log(special.erfcx(u[~is_left] / math.sqrt(2)))
    log_gaussian_factor = -(z0**2) / (2 * sigma**2) - _LOG_SQRT_2PI
    result[~is_left] = log_gaussian_factor + log_mills
    size[~is_left] = abs(log_gaussian_factor) + np.abs(log_mills)
    return result, size


def _chebyshev_t_at_3(n: int) -> float:
    """Return T_n(3) = ((3 + sqrt(8))^n + (3 - sqrt(8))^n) / 2, the d of the acceleration."""
    growth = (3 + math.sqrt(8)) ** n
    return (growth + 1 / growth) / 2


@lru_cache(maxsize=4)
def _alternating_tail_weights(n: int) -> FloatArray:
    """Return w with sum_i w[i] a_i approximating sum_i (-1)^i a_i; w[i] carries the sign (-1)^i.

    Cohen, Rodriguez Villegas and Zagier 2000, Algorithm 1, with the division
    by d folded into the weights.
    """
    d = _chebyshev_t_at_3(n)
    b = -1.0
    c = -d
    weights = np.empty(n)
    for i in range(n):
        c = b - c
        weights[i] = c / d
        b = (i + n) * (i - n) * b / ((i + 0.5) * (i + 1))
    weights.setflags(write=False)
    return weights
