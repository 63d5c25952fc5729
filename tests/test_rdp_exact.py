"""RDP of the Poisson-subsampled Gaussian against dp-accounting, brute-force series and quadrature (no database)."""

import itertools
import logging
import math
import subprocess
import sys
import warnings
from functools import cache

import dp_accounting
import numpy as np
import pytest
from scipy import integrate, special

from privacy.accounting import RDP_ORDERS
from privacy.rdp import compute_rdp_sampled_gaussian

NOISE_MULTIPLIERS = (0.5, 0.8, 1.1, 2.0, 4.0)
SAMPLING_RATES = (0.001, 0.01, 0.1, 0.5)
MECHANISMS = list(itertools.product(NOISE_MULTIPLIERS, SAMPLING_RATES))
CHECKED_INTEGER_ORDERS = [*range(2, 129), 256, 1024, 4096, 8192]
CHECKED_FRACTIONAL_ORDERS = [1.01, 1.02, 1.05, 1.1, 1.25, 1.5, 1.75, 1.99, 2.5, 3.3, 7.5, 20.25]


def dp_accounting_rdp(noise_multiplier: float, sampling_rate: float, orders: list[float]) -> np.ndarray:
    """RDP of one step from dp-accounting's RdpAccountant; inf where its fractional series failed."""
    accountant = dp_accounting.rdp.RdpAccountant(orders)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)))
    return accountant.rdp


@cache
def leibniz_bracket(noise_multiplier: float, sampling_rate: float, order: float, num_terms: int = 200_000) -> tuple[float, float]:
    """Return (lower, upper) bounds on A_alpha from partial sums of the Section 3.3 series.

    Written independently of privacy/rdp.py: the terms are those of
    Mironov, Talwar and Zhang 2019 (arXiv:1908.10530), Section 3.3, in the
    direct form, with the signs of the binomial coefficients. From
    k = floor(alpha) + 1 the terms alternate with decreasing magnitudes,
    so consecutive partial sums that end on a negative and on a positive
    term bracket the sum. math.fsum adds them with a single rounding.
    """
    sigma, q, alpha = noise_multiplier, sampling_rate, order
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    k = np.arange(num_terms, dtype=np.float64)
    j = alpha - k
    log_binomial = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
    steps_past_start = np.maximum(k - math.floor(alpha) - 1, 0)
    sign = np.where(steps_past_start % 2 == 1, -1.0, 1.0)
    left = log_binomial + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2) + special.log_ndtr((z0 - k) / sigma)
    right = log_binomial + j * math.log(q) + k * math.log1p(-q) + (j * j - j) / (2 * sigma**2) + special.log_ndtr((j - z0) / sigma)
    terms = sign * (np.exp(left) + np.exp(right))

    last_positive = num_terms - 1 if steps_past_start[-1] % 2 == 0 else num_terms - 2
    upper = math.fsum(terms[: last_positive + 1])
    lower = upper + terms[last_positive + 1]
    return lower, upper


def quadrature_log_a(noise_multiplier: float, sampling_rate: float, order: float) -> float:
    """Return log(A_alpha) by integrating A_alpha - 1 = E_{z ~ N(0, sigma^2)}[(1 - q + q L(z))^alpha - 1] with scipy."""
    sigma, q, alpha = noise_multiplier, sampling_rate, order

    def integrand(z: float) -> float:
        log_likelihood_ratio = (2 * z - 1) / (2 * sigma**2)
        if log_likelihood_ratio < 30:
            log_mixture = math.log1p(q * math.expm1(log_likelihood_ratio))
        else:
            log_mixture = math.log(q) + log_likelihood_ratio + math.log1p((1 - q) * math.exp(-log_likelihood_ratio) / q)
        log_density = -(z**2) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
        if alpha * log_mixture < 1:
            return math.exp(log_density) * math.expm1(alpha * log_mixture)
        return math.exp(log_density + alpha * log_mixture) - math.exp(log_density)

    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    breakpoints = sorted({-40 * sigma, 0.0, 1.0, z0, 40 * sigma + abs(z0) + alpha})
    edges = [-math.inf, *breakpoints, math.inf]
    # quad warns when rounding stops it short of 1e-12; the comparisons allow 1e-8.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        a_minus_one = sum(integrate.quad(integrand, low, high, epsabs=0, epsrel=1e-12, limit=1000)[0] for low, high in itertools.pairwise(edges))
    return math.log1p(a_minus_one)


def test_rdp_module_imports_without_django():
    code = "import sys, privacy.rdp; sys.exit(1 if 'django' in sys.modules else 0)"
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}

    completed = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize(("noise_multiplier", "sampling_rate"), MECHANISMS)
def test_integer_orders_equal_dp_accounting(noise_multiplier, sampling_rate):
    expected = dp_accounting_rdp(noise_multiplier, sampling_rate, CHECKED_INTEGER_ORDERS)

    ours = compute_rdp_sampled_gaussian(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, orders=CHECKED_INTEGER_ORDERS)

    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize(("noise_multiplier", "sampling_rate"), MECHANISMS)
def test_fractional_orders_never_exceed_dp_accounting(noise_multiplier, sampling_rate, caplog):
    # dp-accounting 0.6.0 sums the absolute values of the series terms (an
    # upper bound) and returns inf for an order whose series it cannot finish.
    # Above alpha ~ 3 the negative terms fall below float64 rounding, so both
    # values are A_alpha up to rounding, and ours adds a rounding margin.
    # The comparison therefore allows 1e-12 on log(A_alpha) = (alpha - 1) * RDP.
    orders = np.array(CHECKED_FRACTIONAL_ORDERS)
    with caplog.at_level(logging.ERROR):
        reference = dp_accounting_rdp(noise_multiplier, sampling_rate, CHECKED_FRACTIONAL_ORDERS)
    converged = np.isfinite(reference)

    ours = compute_rdp_sampled_gaussian(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, orders=orders)

    assert np.all(np.isfinite(ours))
    excess_log_a = (ours - reference)[converged] * (orders[converged] - 1)
    assert np.all(excess_log_a <= 1e-12)


@pytest.mark.parametrize(("noise_multiplier", "sampling_rate"), [*MECHANISMS, (1.0, 0.9), (0.3, 0.2), (10.0, 0.05)])
@pytest.mark.parametrize("order", [1.01, 1.1, 1.5, 1.99, 3.3])
def test_fractional_orders_within_brute_force_bracket(noise_multiplier, sampling_rate, order):
    lower, upper = leibniz_bracket(noise_multiplier, sampling_rate, order)

    [rdp] = compute_rdp_sampled_gaussian(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, orders=[order])
    log_a = rdp * (order - 1)

    # Never below the lower bound, and above the upper bound only by the
    # float64 rounding margin (relative 1e-13 on A_alpha).
    assert log_a >= math.log(lower)
    assert log_a <= math.log(upper) + 1e-13


@pytest.mark.parametrize(("noise_multiplier", "sampling_rate"), [(0.5, 0.1), (1.1, 0.01), (2.0, 0.5), (4.0, 0.9)])
@pytest.mark.parametrize("order", [1.02, 1.3, 1.77, 4.5])
def test_fractional_orders_match_quadrature(noise_multiplier, sampling_rate, order):
    expected = quadrature_log_a(noise_multiplier, sampling_rate, order)

    [rdp] = compute_rdp_sampled_gaussian(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, orders=[order])

    assert rdp * (order - 1) == pytest.approx(expected, rel=1e-8, abs=1e-13)


def test_converges_where_dp_accounting_drops_the_order(caplog):
    # At q = 0.5 the series terms near alpha = 1 shrink like k^-3, too slowly
    # for dp-accounting's 1,000 terms, so it reports inf for this order.
    with caplog.at_level(logging.ERROR):
        [reference] = dp_accounting_rdp(2.0, 0.5, [1.01])
    lower, upper = leibniz_bracket(2.0, 0.5, 1.01)

    [rdp] = compute_rdp_sampled_gaussian(noise_multiplier=2.0, sampling_rate=0.5, orders=[1.01])

    assert reference == math.inf
    assert math.log(lower) / 0.01 <= rdp <= math.log(upper) / 0.01 + 1e-11


@pytest.mark.parametrize(("noise_multiplier", "sampling_rate"), [*MECHANISMS, (0.2, 0.3), (50.0, 0.5), (1.0, 1e-6), (1.0, 0.999)])
def test_rdp_is_finite_and_grows_with_order(noise_multiplier, sampling_rate):
    orders = sorted(RDP_ORDERS)

    rdp = compute_rdp_sampled_gaussian(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, orders=orders)

    # Renyi divergence is non-decreasing in the order, across the integer
    # and fractional formulas alike. The fractional orders carry a float64
    # rounding margin near 1e-14 / (alpha - 1), which shows when the RDP
    # itself is that small (q = 1e-6), hence the absolute slack.
    assert np.all(np.isfinite(rdp))
    assert np.all(rdp >= 0)
    assert np.all(np.diff(rdp) >= -(2e-12 + 1e-15 * rdp[1:]))


def test_integer_and_fractional_formulas_agree_around_two():
    rdp = compute_rdp_sampled_gaussian(noise_multiplier=1.1, sampling_rate=0.05, orders=[1.999999, 2.0, 2.000001])

    assert rdp[0] <= rdp[1] <= rdp[2]
    assert rdp[2] - rdp[0] < 1e-6


def test_full_sampling_is_the_plain_gaussian():
    orders = [1.5, 2.0, 32.0]

    rdp = compute_rdp_sampled_gaussian(noise_multiplier=2.0, sampling_rate=1.0, orders=orders)

    np.testing.assert_allclose(rdp, [1.5 / 8, 2.0 / 8, 32.0 / 8], rtol=1e-15)


def test_zero_sampling_rate_costs_nothing():
    rdp = compute_rdp_sampled_gaussian(noise_multiplier=1.0, sampling_rate=0.0, orders=[1.5, 2.0])

    np.testing.assert_array_equal(rdp, [0.0, 0.0])


def test_zero_noise_is_unbounded():
    rdp = compute_rdp_sampled_gaussian(noise_multiplier=0.0, sampling_rate=0.01, orders=[1.5, 2.0])

    np.testing.assert_array_equal(rdp, [math.inf, math.inf])


def test_second_order_matches_hand_calculation():
    # A_2 = 1 + q^2 (exp(1 / sigma^2) - 1) from the binomial expansion.
    sigma, q = 1.5, 0.02
    expected = math.log1p(q**2 * math.expm1(1 / sigma**2))

    [rdp] = compute_rdp_sampled_gaussian(noise_multiplier=sigma, sampling_rate=q, orders=[2])

    assert rdp == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"noise_multiplier": 1.0, "sampling_rate": 1.5, "orders": [2]}, "sampling_rate"),
        ({"noise_multiplier": 1.0, "sampling_rate": -0.1, "orders": [2]}, "sampling_rate"),
        ({"noise_multiplier": -1.0, "sampling_rate": 0.1, "orders": [2]}, "noise_multiplier"),
        ({"noise_multiplier": math.nan, "sampling_rate": 0.1, "orders": [2]}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "orders": [1.0]}, "order"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "orders": [0.5, 2]}, "order"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "orders": [math.inf]}, "order"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "orders": [[2, 3]]}, "1-D"),
    ],
)
def test_invalid_arguments_are_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        compute_rdp_sampled_gaussian(**arguments)
