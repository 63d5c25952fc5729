"""Federation-level privacy of user-level central DP-FedAvg: calibration, checks and spends."""

import logging

from privacy.accounting import DpSgdEvent, calibrate_noise_multiplier, compose_epsilon
from privacy.adaptive_clipping import AdaptiveClippingConfig, update_noise_multiplier_for
from privacy.exceptions import CentralBudgetExhausted
from privacy.models import FederationPrivacyLedgerEntry

logger = logging.getLogger(__name__)

# Slack on the central budget check: the calibrated noise multiplier meets
# the target up to the bisection tolerance, and composing the same events in
# a different order may differ in the last bits.
EPSILON_RELATIVE_SLACK = 1e-9


def calibrate_central_noise(*, target_epsilon: float, delta: float, participation_rate: float, rounds: int, accountant: str) -> float:
    """Return the smallest noise multiplier whose epsilon over `rounds` rounds meets the target."""
    return calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sampling_rate=participation_rate, steps=rounds, accountant=accountant)


def adaptive_clipping_config(federation) -> AdaptiveClippingConfig | None:
    """Return the federation's adaptive clipping settings, or None for a fixed clip norm."""
    if not federation.adaptive_clipping:
        return None
    return AdaptiveClippingConfig(**federation.adaptive_clipping)


def update_noise_multiplier(federation) -> float:
    """Noise multiplier of the update sum alone.

    With adaptive clipping the noised count of unclipped updates is a second
    release, so the update sum gets less noise and the pair together is as
    private as one Gaussian release with the calibrated multiplier
    (Andrew et al. 2021, Section 3.1).
    """
    config = adaptive_clipping_config(federation)
    if config is None:
        return federation.central_noise_multiplier
    return update_noise_multiplier_for(target_noise_multiplier=federation.central_noise_multiplier, count_noise_multiplier=config.count_noise_multiplier)


def federation_epsilon(federation, *, extra_rounds_at: float | None = None) -> float:
    """Return the federation's epsilon at its delta, composed over all its central releases.

    Args:
        extra_rounds_at: if set, also compose one more round at this participation
            rate: the cost the federation would reach by running it.
    """
    events = [
        DpSgdEvent(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps)
        for noise_multiplier, sampling_rate, steps in FederationPrivacyLedgerEntry.objects.filter(federation=federation).values_list(
            "noise_multiplier", "sampling_rate", "steps"
        )
    ]
    if extra_rounds_at is not None:
        events.append(DpSgdEvent(noise_multiplier=federation.central_noise_multiplier, sampling_rate=extra_rounds_at, steps=1))
    return compose_epsilon(events, delta=federation.dp_delta, accountant=federation.accountant)


def can_afford_central_round(federation) -> bool:
    """Tell whether one more round keeps the federation within its target epsilon."""
    epsilon_after = federation_epsilon(federation, extra_rounds_at=federation.participation_rate)
    return epsilon_after <= federation.target_epsilon * (1 + EPSILON_RELATIVE_SLACK)


def record_central_spend(*, federation, training_round) -> FederationPrivacyLedgerEntry:
    """Charge the federation for releasing the noised aggregate of `training_round`.

    Precondition: the caller holds the federation row lock inside the
    transaction that writes the round's model version, so the release and
    its charge commit together.

    Raises:
        CentralBudgetExhausted: when the release would exceed the target epsilon.
    """
    epsilon_after = federation_epsilon(federation, extra_rounds_at=training_round.participation_rate)
    if epsilon_after > federation.target_epsilon * (1 + EPSILON_RELATIVE_SLACK):
        raise CentralBudgetExhausted(
            f"Round {training_round.number} would raise the federation's epsilon to {epsilon_after:.4f}, above its target {federation.target_epsilon:.4f}."
        )
    entry = FederationPrivacyLedgerEntry.objects.create(
        federation=federation,
        round=training_round,
        noise_multiplier=federation.central_noise_multiplier,
        sampling_rate=training_round.participation_rate,
        steps=1,
        delta=federation.dp_delta,
        accountant=federation.accountant,
        epsilon_after=epsilon_after,
    )
    logger.info("central privacy spent federation=%s round=%d epsilon_after=%.4f", federation.id, training_round.number, epsilon_after)
    return entry
