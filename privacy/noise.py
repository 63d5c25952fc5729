"""Gaussian noise for the central DP mechanisms, and the generator that draws it.

Pure module: numpy only.

Sampler: `gaussian_noise` calls `np.random.Generator.normal`, which draws
standard normals with numpy's ziggurat method and scales them by `std`. The
bits come from the generator's bit generator. `secure_generator` returns a
PCG64DXSM stream, numpy's variant of PCG64 with the stronger DXSM output
function, seeded with 256 bits from the operating system's CSPRNG
(`secrets.token_bytes`).

NOTE: this is a floating-point Gaussian, and it has two known limits.

1. PCG64DXSM is a statistical generator, not a cryptographic one. It is not
   designed to resist recovery of its state from its outputs, after which
   later noise is predictable. An observer receives only noisy sums, never
   raw draws, and we know of no practical attack of this kind on such output.
2. Floating-point noise leaks through its low-order bits. Mironov 2012, "On
   Significance of the Least Significant Bits for Differential Privacy" (ACM
   CCS), showed that the set of doubles a textbook floating-point Laplace
   sampler can output differs between neighbouring inputs, so some outputs
   reveal the input exactly. The same class of attack applies to
   floating-point Gaussian samplers, including the ziggurat.
   Removing it takes exact sampling on a discrete grid: the discrete Gaussian
   of Canonne, Kamath and Steinke 2020, "The Discrete Gaussian for
   Differential Privacy" (NeurIPS), drawn with integer arithmetic from a
   cryptographic source, added to updates that clients quantise to the same
   grid, with privacy accounting for the discrete distribution.
"""

import math
import numbers
import secrets

import numpy as np
import numpy.typing as npt

Float64Array = npt.NDArray[np.float64]

# PCG64DXSM's state is two 128-bit integers (the LCG state and its
# increment), so 256 bits of seed entropy can reach every state. SeedSequence
# keeps only pool_size 32-bit words of entropy, 4 (128 bits) by default.
SEED_BYTES = 32
SEED_POOL_WORDS = SEED_BYTES // 4


def secure_generator() -> np.random.Generator:
    """Create a generator seeded from the operating system's CSPRNG.

    Each call reads 256 fresh bits from `secrets.token_bytes`, mixes them
    with a 256-bit `np.random.SeedSequence` and starts a PCG64DXSM stream. Use it for
    noise that protects real users, where a seed an attacker could guess
    would void the guarantee. Tests and benchmarks pass a seeded generator
    instead, so that their results reproduce.

    Returns:
        A new, unpredictably seeded generator.
    """
    entropy = int.from_bytes(secrets.token_bytes(SEED_BYTES), "big")
    seed_sequence = np.random.SeedSequence(entropy, pool_size=SEED_POOL_WORDS)
    return np.random.Generator(np.random.PCG64DXSM(seed_sequence))


def gaussian_noise(shape: tuple[int, ...], *, std: float, rng: np.random.Generator) -> Float64Array:
    """Draw independent N(0, std^2) noise.

    Args:
        shape: Shape of the result, any number of dimensions (() is a scalar).
        std: Standard deviation, finite and at least 0. With 0 the result is
            all zeros and nothing is drawn from `rng`.
        rng: Source of the noise. See `secure_generator`.

    Returns:
        Noise of the given shape, float64.

    Raises:
        ValueError: if `std` is negative, not finite or not a real number.
    """
    std = require_non_negative_finite("std", std)
    if std == 0.0:
        return np.zeros(shape, dtype=np.float64)
    return rng.normal(0.0, std, size=shape).astype(np.float64, copy=False)


def require_non_negative_finite(name: str, value: object) -> float:
    """Return `value` as a float, or raise ValueError naming it unless it is a finite real number >= 0."""
    value = require_finite_real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be at least 0, got {value}.")
    return value


def require_finite_real(name: str, value: object) -> float:
    """Return `value` as a float, or raise ValueError naming it unless it is a finite real number."""
    # bool is a subclass of int, so True would otherwise pass as 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    return float(value)
