"""The privacy_calc management command: JSON output, round trip and rejected arguments (no database)."""

import io
import json

import dp_accounting
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from privacy.accounting import RDP_ORDERS


def run_privacy_calc(*arguments: str) -> dict:
    stdout = io.StringIO()
    call_command("privacy_calc", *arguments, stdout=stdout)
    return json.loads(stdout.getvalue())


def dp_accounting_rdp_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
    return accountant.get_epsilon(delta)


def test_epsilon_prints_json_with_epsilon():
    result = run_privacy_calc("epsilon", "--noise-multiplier", "1.1", "--sampling-rate", "0.05", "--steps", "100", "--delta", "1e-5")

    assert result["epsilon"] == pytest.approx(dp_accounting_rdp_epsilon(1.1, 0.05, 100, 1e-5), rel=1e-9)
    assert result["accountant"] == "rdp"
    assert result["noise_multiplier"] == 1.1
    assert result["steps"] == 100


def test_epsilon_with_pld_is_below_rdp():
    arguments = ("epsilon", "--noise-multiplier", "1.1", "--sampling-rate", "0.05", "--steps", "100", "--delta", "1e-5")

    rdp = run_privacy_calc(*arguments, "--accountant", "rdp")
    pld = run_privacy_calc(*arguments, "--accountant", "pld")

    assert pld["accountant"] == "pld"
    assert 0 < pld["epsilon"] < rdp["epsilon"]


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_noise_round_trips_through_epsilon(accountant):
    common = ("--sampling-rate", "0.05", "--steps", "100", "--delta", "1e-5", "--accountant", accountant)

    calibrated = run_privacy_calc("noise", "--target-epsilon", "2.0", *common)
    spent = run_privacy_calc("epsilon", "--noise-multiplier", repr(calibrated["noise_multiplier"]), *common)
    slightly_less_noise = run_privacy_calc("epsilon", "--noise-multiplier", repr(calibrated["noise_multiplier"] * 0.999), *common)

    assert set(calibrated) >= {"noise_multiplier", "epsilon", "target_epsilon"}
    assert spent["epsilon"] <= 2.0
    assert spent["epsilon"] == pytest.approx(calibrated["epsilon"], rel=1e-12)
    assert slightly_less_noise["epsilon"] > 2.0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("epsilon", "--noise-multiplier", "-1", "--sampling-rate", "0.05", "--steps", "10", "--delta", "1e-5"), "noise_multiplier must be a positive"),
        (("epsilon", "--noise-multiplier", "1", "--sampling-rate", "1.5", "--steps", "10", "--delta", "1e-5"), r"sampling_rate must be in \(0, 1\]"),
        (("epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.05", "--steps", "10", "--delta", "0"), r"delta must be in \[1e-12, 0.1\)"),
        (("epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.05", "--steps", "0", "--delta", "1e-5"), "steps must be a positive integer"),
        (("epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.05", "--steps", "ten", "--delta", "1e-5"), "invalid int value"),
        (("epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.05", "--steps", "10", "--delta", "1e-5", "--accountant", "moments"), "invalid choice"),
        (("noise", "--target-epsilon", "-2", "--sampling-rate", "0.05", "--steps", "10", "--delta", "1e-5"), "target_epsilon must be a positive"),
        (("noise", "--target-epsilon", "1e-6", "--sampling-rate", "1", "--steps", "1000000", "--delta", "1e-5"), "unreachable"),
        (("noise", "--target-epsilon", "2", "--sampling-rate", "0.05", "--steps", "10", "--delta", "1e-5", "--accountant", "moments"), "invalid choice"),
        (("noise", "--sampling-rate", "0.05", "--steps", "10", "--delta", "1e-5"), "--target-epsilon"),
        (("variance",), "invalid choice"),
        ((), "the following arguments are required"),
    ],
)
def test_invalid_arguments_raise_command_error(arguments, message):
    with pytest.raises(CommandError, match=message):
        call_command("privacy_calc", *arguments, stdout=io.StringIO())
