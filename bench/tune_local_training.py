"""Compare device training plans for FedAvg on digits, without and with local DP-SGD.

The script simulates federated averaging in one process, with no server:
the training split of scikit-learn's digits set is divided among 20 devices
by a Dirichlet(0.5) label partition. Each round every selected device trains
from the global weights with `flo_client.training.train_locally`, and the
server adds the example-weighted mean of the deltas. A stratified 20% test
split, which no device trains on, measures the final accuracy.

Part a: plain SGD on devices, 30 rounds, target test accuracy >= 0.95.
Part b: DP-SGD on devices with a record-level budget of epsilon 10 at delta
1e-5 per device, computed with dp_accounting's RdpAccountant. A device pays
only for the rounds it takes part in, and the run has as many rounds as the
budget allows, at most 100. Target test accuracy >= 0.88.

Usage:
    .venv/bin/python bench/tune_local_training.py [--part {a,b,both}] [--seeds 0 1 2]
"""

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flo_client.datasets import dirichlet_partition, load_dataset, split_train_test  # noqa: E402
from flo_client.models import evaluate_accuracy, initial_weights  # noqa: E402
from flo_client.training import LocalDpConfig, TrainingPlan, compute_update, train_locally  # noqa: E402

NUM_DEVICES = 20
DIRICHLET_ALPHA = 0.5
TEST_FRACTION = 0.2
# Every device gets at least this many training examples, so that a DP-SGD
# batch of q * n examples is not mostly noise on the smallest devices.
MIN_EXAMPLES_PER_DEVICE = 10

TARGET_EPSILON = 10.0
TARGET_DELTA = 1e-5
MAX_DP_ROUNDS = 100
# RDP orders at which the accountant evaluates the bound: integers 2..128 plus 256, 512 and 1024.
# The conversion to (epsilon, delta) takes the best order, so a wider list can only lower epsilon.
RDP_ORDERS = [*range(2, 129), 256, 512, 1024]

SOFTMAX_SPEC = {"kind": "softmax_regression", "num_features": 64, "num_classes": 10}
MLP32_SPEC = {"kind": "mlp", "num_features": 64, "hidden_units": 32, "num_classes": 10}
MLP_SPEC = {"kind": "mlp", "num_features": 64, "hidden_units": 64, "num_classes": 10}
MLP128_SPEC = {"kind": "mlp", "num_features": 64, "hidden_units": 128, "num_classes": 10}


@dataclass(frozen=True)
class Candidate:
    """A model and training plan to try, with how many devices train in each round."""

    label: str
    spec: dict
    plan: TrainingPlan
    devices_per_round: int
    num_rounds: int | None = None  # None: as many rounds as the privacy budget allows


@dataclass(frozen=True)
class Federation:
    """Devices' training data and the held-out test split of one seed."""

    device_features: list[np.ndarray]
    device_labels: list[np.ndarray]
    test_features: np.ndarray
    test_labels: np.ndarray


# Part a: plain SGD, 30 rounds with all 20 devices.
NO_DP_ROUNDS = 30
NO_DP_CANDIDATES = [
    Candidate("softmax lr=1.0 b=16 e=10", SOFTMAX_SPEC, TrainingPlan(1.0, 16, 10), NUM_DEVICES, NO_DP_ROUNDS),
    Candidate("mlp64 lr=0.1 b=16 e=5", MLP_SPEC, TrainingPlan(0.1, 16, 5), NUM_DEVICES, NO_DP_ROUNDS),
    Candidate("mlp128 lr=0.2 b=16 e=5", MLP128_SPEC, TrainingPlan(0.2, 16, 5), NUM_DEVICES, NO_DP_ROUNDS),
    Candidate("mlp128 lr=0.2 b=8 e=3", MLP128_SPEC, TrainingPlan(0.2, 8, 3), NUM_DEVICES, NO_DP_ROUNDS),
]


def _dp_candidate(spec_label: str, spec: dict, learning_rate: float, noise_multiplier: float, devices_per_round: int) -> Candidate:
    """Build a DP-SGD candidate with clip norm 1, q = 0.2 and 5 local steps (about one epoch, 1 / q)."""
    dp = LocalDpConfig(clip_norm=1.0, noise_multiplier=noise_multiplier, sampling_rate=0.2, local_steps=5)
    label = f"{spec_label} lr={learning_rate} C=1 sigma={noise_multiplier} q=0.2 s=5 k={devices_per_round}"
    # batch_size and local_epochs are required by TrainingPlan but DP-SGD ignores them.
    return Candidate(label, spec, TrainingPlan(learning_rate, 16, 1, dp), devices_per_round)


# Part b: DP-SGD, where the privacy budget sets the number of rounds.
DP_CANDIDATES = [
    _dp_candidate("softmax", SOFTMAX_SPEC, 0.5, 2.0, 20),
    _dp_candidate("softmax", SOFTMAX_SPEC, 0.5, 2.0, 10),
    _dp_candidate("softmax", SOFTMAX_SPEC, 0.5, 1.8, 10),
    _dp_candidate("softmax", SOFTMAX_SPEC, 0.5, 1.5, 5),
    _dp_candidate("mlp32", MLP32_SPEC, 0.2, 1.8, 10),
]


def build_federation(seed: int) -> Federation:
    """Split digits into a test set and NUM_DEVICES non-IID device datasets for one seed."""
    features, labels = load_dataset("digits")
    train_features, train_labels, test_features, test_labels = split_train_test(
        features, labels, test_fraction=TEST_FRACTION, seed=seed
    )
    partition = dirichlet_partition(
        train_labels,
        num_devices=NUM_DEVICES,
        alpha=DIRICHLET_ALPHA,
        rng=np.random.default_rng([seed, 1]),
        min_examples=MIN_EXAMPLES_PER_DEVICE,
    )
    return Federation(
        device_features=[train_features[indices] for indices in partition],
        device_labels=[train_labels[indices] for indices in partition],
        test_features=test_features,
        test_labels=test_labels,
    )


def select_devices(participation_counts: np.ndarray, devices_per_round: int, rng: np.random.Generator) -> np.ndarray:
    """Pick the devices that have taken part least so far, breaking ties at random.

    After r rounds every device has taken part floor(r * k / N) or ceil(r * k / N)
    times, which bounds each device's privacy cost.
    """
    tie_breakers = rng.random(participation_counts.size)
    order = np.lexsort((tie_breakers, participation_counts))
    return np.sort(order[:devices_per_round])


def run_fedavg(candidate: Candidate, federation: Federation, num_rounds: int, seed: int) -> tuple[float, int]:
    """Run FedAvg and return the final test accuracy and the most rounds any device took part in."""
    rng = np.random.default_rng([seed, 2])
    global_weights = initial_weights(candidate.spec, rng)
    example_counts = np.array([labels.size for labels in federation.device_labels], dtype=np.float64)
    participation_counts = np.zeros(NUM_DEVICES, dtype=np.int64)

    for _ in range(num_rounds):
        selected = select_devices(participation_counts, candidate.devices_per_round, rng)
        participation_counts[selected] += 1
        total_examples = example_counts[selected].sum()
        weighted_sum = {name: np.zeros(array.shape, dtype=np.float64) for name, array in global_weights.items()}
        for device in selected:
            new_weights = train_locally(
                candidate.spec,
                global_weights,
                federation.device_features[device],
                federation.device_labels[device],
                candidate.plan,
                rng=rng,
            )
            update = compute_update(new_weights, global_weights)
            for name, delta in update.items():
                weighted_sum[name] += (example_counts[device] / total_examples) * delta
        global_weights = {
            name: (global_weights[name] + weighted_sum[name]).astype(np.float32) for name in global_weights
        }

    accuracy = evaluate_accuracy(candidate.spec, global_weights, federation.test_features, federation.test_labels)
    return accuracy, int(participation_counts.max())


def compute_epsilon(dp: LocalDpConfig, num_participations: int) -> float:
    """Return one device's epsilon at TARGET_DELTA after `num_participations` rounds of DP-SGD."""
    if num_participations == 0:
        return 0.0
    accountant = RdpAccountant(RDP_ORDERS)
    accountant.compose(_round_event(dp), num_participations)
    return accountant.get_epsilon(TARGET_DELTA)


def max_participations_within_budget(dp: LocalDpConfig) -> int:
    """Return the most rounds one device can take part in without exceeding TARGET_EPSILON, capped at MAX_DP_ROUNDS."""
    accountant = RdpAccountant(RDP_ORDERS)
    event = _round_event(dp)
    for num_participations in range(1, MAX_DP_ROUNDS + 1):
        accountant.compose(event)
        if accountant.get_epsilon(TARGET_DELTA) > TARGET_EPSILON:
            return num_participations - 1
    return MAX_DP_ROUNDS


def _round_event(dp: LocalDpConfig) -> dp_accounting.DpEvent:
    step = dp_accounting.PoissonSampledDpEvent(dp.sampling_rate, dp_accounting.GaussianDpEvent(dp.noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, dp.local_steps)


def plan_rounds(candidate: Candidate) -> int:
    """Return the number of rounds of a candidate: fixed, or the most that every device's budget covers."""
    if candidate.num_rounds is not None:
        return candidate.num_rounds
    max_participations = max_participations_within_budget(candidate.plan.dp)
    # Balanced selection gives each device at most ceil(rounds * k / N) participations.
    return min(MAX_DP_ROUNDS, math.floor(max_participations * NUM_DEVICES / candidate.devices_per_round))


def evaluate_candidates(candidates: list[Candidate], seeds: list[int], federations: dict) -> list[dict]:
    """Run every candidate for every seed and return one result row per candidate."""
    rows = []
    for candidate in candidates:
        num_rounds = plan_rounds(candidate)
        started = time.perf_counter()
        accuracies = []
        max_participations = 0
        for seed in seeds:
            accuracy, participations = run_fedavg(candidate, federations[seed], num_rounds, seed)
            accuracies.append(accuracy)
            max_participations = max(max_participations, participations)
        epsilon = compute_epsilon(candidate.plan.dp, max_participations) if candidate.plan.dp else None
        rows.append(
            {
                "candidate": candidate,
                "num_rounds": num_rounds,
                "accuracies": accuracies,
                "max_participations": max_participations,
                "epsilon": epsilon,
                "seconds": time.perf_counter() - started,
            }
        )
    return rows


def print_table(title: str, rows: list[dict], seeds: list[int]) -> None:
    print(f"\n{title}")
    seed_columns = "".join(f"  seed {seed:<3}" for seed in seeds)
    print(f"{'candidate':<44} {'rounds':>6} {'k':>3} {'part.':>5} {'epsilon':>7}{seed_columns}  {'min':>6}  {'sec':>5}")
    for row in rows:
        candidate = row["candidate"]
        epsilon = "-" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        accuracy_columns = "".join(f"  {accuracy:>8.4f}" for accuracy in row["accuracies"])
        print(
            f"{candidate.label:<44} {row['num_rounds']:>6} {candidate.devices_per_round:>3} "
            f"{row['max_participations']:>5} {epsilon:>7}{accuracy_columns}  {min(row['accuracies']):>6.4f}"
            f"  {row['seconds']:>5.1f}"
        )


def print_recommendation(part: str, rows: list[dict], target_accuracy: float) -> None:
    """Print the candidate with the highest worst-seed accuracy (ties: highest mean) and whether it meets the target."""
    best = max(rows, key=lambda row: (min(row["accuracies"]), float(np.mean(row["accuracies"]))))
    candidate = best["candidate"]
    worst_accuracy = min(best["accuracies"])
    verdict = "meets" if worst_accuracy >= target_accuracy else "MISSES"
    print(f"\nRecommendation for part {part}: {candidate.label}")
    print(f"  model spec: {candidate.spec}")
    print(f"  training plan: {candidate.plan.to_dict()}")
    print(f"  devices per round: {candidate.devices_per_round} of {NUM_DEVICES}, rounds: {best['num_rounds']}")
    if best["epsilon"] is not None:
        print(
            f"  epsilon per device: {best['epsilon']:.3f} at delta {TARGET_DELTA:g} "
            f"after at most {best['max_participations']} participations"
        )
    print(f"  worst-seed test accuracy {worst_accuracy:.4f} {verdict} the target {target_accuracy}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("a", "b", "both"), default="both", help="Which part to run (default: both).")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of the split, partition and training (default: 0 1 2)."
    )
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    federations = {seed: build_federation(seed) for seed in arguments.seeds}
    sizes = [labels.size for labels in federations[arguments.seeds[0]].device_labels]
    print(f"digits, {NUM_DEVICES} devices, Dirichlet alpha {DIRICHLET_ALPHA}, device sizes for seed {arguments.seeds[0]}: {sizes}")

    if arguments.part in ("a", "both"):
        rows = evaluate_candidates(NO_DP_CANDIDATES, arguments.seeds, federations)
        print_table("Part a: plain SGD on devices", rows, arguments.seeds)
        print_recommendation("a", rows, target_accuracy=0.95)
    if arguments.part in ("b", "both"):
        rows = evaluate_candidates(DP_CANDIDATES, arguments.seeds, federations)
        print_table(f"Part b: DP-SGD on devices, epsilon <= {TARGET_EPSILON} at delta {TARGET_DELTA:g}", rows, arguments.seeds)
        print_recommendation("b", rows, target_accuracy=0.88)


if __name__ == "__main__":
    main()
