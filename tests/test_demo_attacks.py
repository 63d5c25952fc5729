"""The demo under a sign-flip attack: robust rules keep the model, reputation quarantines the attackers.

Scenario: digits, 20 devices that all take part in every round, Dirichlet
alpha 0.5, no DP and 30 rounds. The last 4 devices send their honest update
multiplied by -10.
"""

import subprocess
import sys

import numpy as np
import pytest

from flo_client.datasets import load_dataset, split_train_test
from flo_client.simulator import FleetConfig
from flo_site.demo import parse_args
from flo_site.server_process import BASE_DIR
from tests.live import run_demo

pytestmark = [pytest.mark.integration, pytest.mark.demo]

ATTACK = ("--no-dp", "--devices", "20", "--rounds", "30", "--alpha", "0.5", "--attack", "sign_flip", "--attackers", "4")


def largest_class_share() -> float:
    """Return the test accuracy of always predicting the most frequent class of the demo's test split."""
    features, labels = load_dataset("digits")
    _, _, _, test_labels = split_train_test(features, labels, test_fraction=FleetConfig.test_fraction, seed=0)
    return float(np.bincount(test_labels).max() / test_labels.size)


def test_fedavg_collapses_under_sign_flip(tmp_path):
    completed, summary = run_demo(tmp_path / "fedavg", *ATTACK, "--rule", "fedavg")

    # The attacked model predicts one class: no better than the most frequent
    # class, whose share of the 360 test images is 37/360 = 0.103.
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert summary["final_accuracy"] <= largest_class_share()


@pytest.mark.parametrize(
    ("rule_arguments", "minimum_accuracy"),
    [
        (("--rule", "trimmed_mean", "--trim-fraction", "0.2"), 0.88),
        (("--rule", "multi_krum"), 0.85),
        (("--rule", "median"), 0.82),
    ],
    ids=["trimmed_mean", "multi_krum", "median"],
)
def test_robust_rule_keeps_accuracy_under_sign_flip(tmp_path, rule_arguments, minimum_accuracy):
    completed, summary = run_demo(tmp_path / rule_arguments[1], *ATTACK, *rule_arguments)

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert summary["rule"] == rule_arguments[1]
    assert summary["attack"] == "sign_flip"
    assert summary["final_accuracy"] >= minimum_accuracy


def test_reputation_quarantines_attackers_only(tmp_path):
    completed, summary = run_demo(tmp_path / "reputation", *ATTACK, "--rule", "trimmed_mean", "--reputation")

    attackers = set(summary["attacker_ids"])
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert len(attackers) == 4
    assert set(summary["quarantined_ids"]) == attackers
    assert max(summary["quarantined_in_round"][node_id] for node_id in attackers) <= 5


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (("--attack", "sign_flip"), "--attack needs --attackers"),
        (("--attackers", "3"), "--attackers needs --attack"),
        (("--attack", "boost", "--attackers", "20"), "--attackers must be from 0"),
        (("--rule", "median", "--central-dp"), "--central-dp needs --rule fedavg"),
        (("--trim-fraction", "0.5"), "--trim-fraction"),
        (("--quarantine-threshold", "1.0"), "--quarantine-threshold"),
        (("--byzantine", "-1"), "--byzantine"),
    ],
)
def test_demo_rejects_inconsistent_attack_flags(arguments, fragment, capsys):
    with pytest.raises(SystemExit):
        parse_args(list(arguments))

    assert fragment in capsys.readouterr().err


def test_demo_rejects_rule_preconditions_before_starting(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "flo_site.demo", "--no-dp", "--devices", "6", "--rule", "krum", "--byzantine", "2", "--output", str(tmp_path / "krum")],
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 2
    assert "Krum" in completed.stderr
