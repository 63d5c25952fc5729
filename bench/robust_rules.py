"""Compare every aggregation rule against every attack, and reputation against every attack, as Markdown tables.

The federation runs in one process with the same code as the server and
the devices, minus HTTP and the database: scikit-learn's digits split with
`flo_client.simulator.prepare_data` (20 devices, Dirichlet alpha 0.5, a
held-out 20% test split), local training with `flo_client.training`, the
last 4 devices attacking with `flo_client.attacks`, aggregation with
`federation.aggregation.robust.aggregate_updates` and plain FedAvg steps on
the server. Every device takes part in every round, without DP, for 30
rounds, as in `make demo DEMO_ARGS="--no-dp --rule R --attack A --attackers 4"`.
sign_flip and boost scale the honest update by 10, gaussian_noise replaces
it with N(0, 10^2) per coordinate. Bulyan tolerates f = 3 (it needs
n >= 4f + 3 = 15 and keeps working once 4 attackers are quarantined), the
other selection rules f = 4.

The reputation table runs trimmed mean (beta 0.2) with the scores of
`federation.aggregation.reputation` and a quarantine threshold of 0.4, as
the server does: a quarantined device takes no further part.

Usage:
    .venv/bin/python bench/robust_rules.py [--rounds 30] [--seed 0] [--rules ...] [--attacks ...]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federation.aggregation.reputation import INITIAL_SCORE, distances_to, next_score, score_accepted_updates  # noqa: E402
from federation.aggregation.robust import RULE_NAMES, RuleConfig, aggregate_updates, flatten_tensors, unflatten_vector  # noqa: E402
from flo_client.attacks import ATTACK_NAMES, AttackConfig, flip_labels  # noqa: E402
from flo_client.models import evaluate_accuracy, initial_weights, tensor_specs  # noqa: E402
from flo_client.simulator import FleetConfig, craft_attacker_updates, prepare_data  # noqa: E402
from flo_client.training import TrainingPlan, compute_update, train_locally  # noqa: E402

NUM_DEVICES = 20
NUM_ATTACKERS = 4
NUM_CLASSES = 10
# The demo's model and plan without DP (flo_site/demo.py).
MODEL_SPEC = {"kind": "mlp", "num_features": 64, "hidden_units": 128, "num_classes": NUM_CLASSES}
PLAN = TrainingPlan.from_dict({"learning_rate": 0.2, "batch_size": 8, "local_epochs": 3})
QUARANTINE_THRESHOLD = 0.4
RULE_PARAMETERS = {
    "trimmed_mean": {"trim_fraction": 0.2},
    "krum": {"num_byzantine": NUM_ATTACKERS},
    "multi_krum": {"num_byzantine": NUM_ATTACKERS},
    "bulyan": {"num_byzantine": 3},
}


def run(*, rule: str, attack: str | None, rounds: int, seed: int, reputation: bool) -> dict:
    """Train for `rounds` rounds and return the final accuracy and, with reputation, when each device was quarantined."""
    config = RuleConfig.from_dict({"name": rule, **RULE_PARAMETERS.get(rule, {})})
    attack_config = AttackConfig(name=attack) if attack else None
    attackers = set(range(NUM_DEVICES - NUM_ATTACKERS, NUM_DEVICES)) if attack else set()
    shards, (test_x, test_y) = prepare_data(FleetConfig(num_devices=NUM_DEVICES, alpha=0.5, seed=seed))
    rngs = {index: np.random.default_rng([seed, index]) for index in range(NUM_DEVICES)}
    specs = tensor_specs(MODEL_SPEC)
    names = [spec.name for spec in specs]
    shapes = {spec.name: spec.shape for spec in specs}
    weights = initial_weights(MODEL_SPEC, np.random.default_rng(seed))
    scores = dict.fromkeys(range(NUM_DEVICES), INITIAL_SCORE)
    quarantined_in: dict[int, int] = {}

    for round_number in range(1, rounds + 1):
        active = [index for index in range(NUM_DEVICES) if index not in quarantined_in]
        updates = {}
        for index in active:
            features, labels = shards[index]
            if attack == "label_flip" and index in attackers:
                labels = flip_labels(labels, num_classes=NUM_CLASSES)
            updates[index] = compute_update(train_locally(MODEL_SPEC, weights, features, labels, PLAN, rng=rngs[index]), weights)
        if attack_config is not None:
            selected_attackers = {index: updates[index] for index in active if index in attackers}
            crafted = craft_attacker_updates(
                attack_config, selected_attackers, num_devices=NUM_DEVICES, num_attackers=NUM_ATTACKERS, rngs={index: rngs[index] for index in selected_attackers}
            )
            updates.update(crafted)

        stack = np.stack([flatten_tensors(updates[index], names) for index in active])
        counts = [int(shards[index][1].size) for index in active]
        result = aggregate_updates(stack, num_examples=counts, config=config)
        step = unflatten_vector(result.aggregate, shapes)
        weights = {name: (weights[name] + step[name]).astype(np.float32) for name in names}

        if reputation:
            kept = None if rule in ("fedavg", "median") else result.kept_fraction
            outcomes = score_accepted_updates(distances=distances_to(stack, result.aggregate), kept_fraction=kept, elapsed_fraction=np.zeros(len(active)))
            for index, outcome in zip(active, outcomes, strict=True):
                scores[index] = next_score(scores[index], outcome.outcome)
                if scores[index] < QUARANTINE_THRESHOLD:
                    quarantined_in[index] = round_number

    accuracy = evaluate_accuracy(MODEL_SPEC, weights, test_x, test_y)
    return {"accuracy": accuracy, "quarantined_in": quarantined_in, "attackers": attackers}


def describe_quarantine(outcome: dict) -> str:
    attackers = outcome["attackers"]
    caught = {index: round_number for index, round_number in outcome["quarantined_in"].items() if index in attackers}
    honest = len(set(outcome["quarantined_in"]) - attackers)
    last_round = f" by round {max(caught.values())}" if caught else ""
    return f"{len(caught)} of {len(attackers)}{last_round} | {honest} | {outcome['accuracy']:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds per run (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and training (default 0)")
    parser.add_argument("--rules", nargs="+", choices=RULE_NAMES, default=list(RULE_NAMES), help="rules to compare (default: all)")
    parser.add_argument("--attacks", nargs="+", choices=ATTACK_NAMES, default=list(ATTACK_NAMES), help="attacks to run (default: all)")
    args = parser.parse_args()

    started = time.perf_counter()
    print("| rule | no attack | " + " | ".join(args.attacks) + " |")
    print("|---|---|" + "---|" * len(args.attacks))
    for rule in args.rules:
        cells = [run(rule=rule, attack=attack, rounds=args.rounds, seed=args.seed, reputation=False)["accuracy"] for attack in (None, *args.attacks)]
        print(f"| {rule} | " + " | ".join(f"{cell:.4f}" for cell in cells) + " |", flush=True)

    print()
    print("| attack (trimmed mean, reputation on) | attackers quarantined | honest devices quarantined | test accuracy |")
    print("|---|---|---|---|")
    for attack in args.attacks:
        print(f"| {attack} | {describe_quarantine(run(rule='trimmed_mean', attack=attack, rounds=args.rounds, seed=args.seed, reputation=True))} |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s in all.")


if __name__ == "__main__":
    main()
