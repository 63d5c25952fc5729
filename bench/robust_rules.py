"""Run the demo for every aggregation rule against every attack and print Markdown tables.

Each cell is one run of `python -m flo_site.demo` through the REST API:
digits, 20 devices that all take part in every round, Dirichlet alpha 0.5,
no DP, 30 rounds, the last 4 devices attacking. sign_flip and boost scale
the honest update by 10; gaussian_noise replaces it with N(0, 10^2) per
coordinate. Bulyan tolerates f = 3 here, because rounds may close with the
16 honest updates once attackers are quarantined and Bulyan needs n >= 4f + 3.

The first table has reputation off (test accuracy after the last round).
The second has reputation on (quarantine threshold 0.4) with trimmed mean:
the round in which the last attacker was quarantined and the number of
honest devices quarantined.

Usage:
    .venv/bin/python bench/robust_rules.py [--rules fedavg median ...] [--attacks sign_flip ...] [--rounds 30]

About 40 s per run on two shared cores; the full grid (8 rules x 6 columns
plus 5 reputation runs) takes about 35 minutes.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parents[1]
RULES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "norm_bounding", "centered_clipping")
ATTACKS = ("none", "sign_flip", "gaussian_noise", "boost", "label_flip", "little_is_enough")
NUM_DEVICES = 20
NUM_ATTACKERS = 4
RULE_ARGUMENTS = {"bulyan": ("--byzantine", "3"), "trimmed_mean": ("--trim-fraction", "0.2")}


def run_demo(*, rule: str, attack: str, rounds: int, reputation: bool, workdir: Path) -> dict:
    """Run one demo and return its summary.json."""
    output = workdir / f"{rule}-{attack}-{'rep' if reputation else 'plain'}"
    arguments = ["--no-dp", "--devices", str(NUM_DEVICES), "--rounds", str(rounds), "--alpha", "0.5", "--rule", rule, *RULE_ARGUMENTS.get(rule, ())]
    if attack != "none":
        arguments += ["--attack", attack, "--attackers", str(NUM_ATTACKERS)]
    if reputation:
        arguments.append("--reputation")
    completed = subprocess.run(
        [sys.executable, "-m", "flo_site.demo", *arguments, "--output", str(output)],
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    summary_path = output / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"The demo for rule {rule} and attack {attack} failed (exit {completed.returncode}): {completed.stderr[-1000:]}")
    return json.loads(summary_path.read_text())


def describe_quarantine(summary: dict) -> str:
    attackers = set(summary["attacker_ids"])
    quarantined = set(summary["quarantined_ids"])
    caught_rounds = [summary["quarantined_in_round"][node_id] for node_id in attackers & quarantined]
    caught = f"{len(caught_rounds)} of {len(attackers)} by round {max(caught_rounds)}" if caught_rounds else f"0 of {len(attackers)}"
    return f"{caught}; honest quarantined: {len(quarantined - attackers)}; accuracy {summary['final_accuracy']:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES), help="rules to run (default: all)")
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS), help="attacks to run (default: all, and no attack)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per run (default 30)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="flo-robust-bench-") as directory:
        workdir = Path(directory)
        print("| rule | " + " | ".join(args.attacks) + " |")
        print("|---|" + "---|" * len(args.attacks))
        for rule in args.rules:
            cells = [f"{run_demo(rule=rule, attack=attack, rounds=args.rounds, reputation=False, workdir=workdir)['final_accuracy']:.4f}" for attack in args.attacks]
            print(f"| {rule} | " + " | ".join(cells) + " |", flush=True)

        print()
        print("| attack (trimmed_mean, reputation on) | attackers quarantined; honest quarantined; accuracy |")
        print("|---|---|")
        for attack in args.attacks:
            if attack == "none":
                continue
            summary = run_demo(rule="trimmed_mean", attack=attack, rounds=args.rounds, reputation=True, workdir=workdir)
            print(f"| {attack} | {describe_quarantine(summary)} |", flush=True)


if __name__ == "__main__":
    main()
