"""Run a whole federation on real data: `python -m flo_site.demo [flags]` (what `make demo` runs).

The demo plays every role on one machine. As the operator it creates a
fresh SQLite database, a federation and enrolment tokens; it starts the FLO
server (uvicorn, embedded defaults) on a free 127.0.0.1 port; as the device
fleet it runs the simulator, whose devices talk to the server only through
the signed REST API; at the end it prints per-round results and each node's
privacy budget, and writes OUTPUT/summary.json.
"""

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

# Defaults measured with bench/tune_local_training.py on digits (20 devices,
# Dirichlet alpha 0.5, held-out 20% test split); BENCHMARKS.md has the
# accuracies per seed. Without DP a small MLP does best in 30 rounds; with
# DP, softmax regression has fewer parameters to perturb.
PLAIN_TRAINING_PLAN = {"learning_rate": 0.2, "batch_size": 8, "local_epochs": 3}
DP_TRAINING_PLAN = {
    "learning_rate": 0.5,
    "batch_size": 16,
    "local_epochs": 1,
    "dp": {"clip_norm": 1.0, "noise_multiplier": 1.8, "sampling_rate": 0.2, "local_steps": 5},
}
MLP_HIDDEN_UNITS = 128

# User-level central DP-FedAvg on many small devices, measured with
# bench/tune_central_dp.py (1,000 users on digits); see BENCHMARKS.md. Each
# user has one or two images, so one local SGD step; the server's momentum
# carries the signal across noisy rounds.
CENTRAL_DEFAULTS = {
    "model": "softmax",
    "training_plan": {"learning_rate": 0.2, "batch_size": 2, "local_epochs": 1},
    "clip_norm": 0.25,
    "server_learning_rate": 1.0,
    "server_momentum": 0.9,
}
# (smallest target epsilon, participation rate, rounds), best first. In the
# in-process simulation, 200 rounds at rate 0.2 did best from epsilon 8 up;
# at smaller targets the noise per round grows too much, and 100 rounds at
# rate 0.3 did best.
CENTRAL_SCHEDULES = ((8.0, 0.2, 200), (0.0, 0.3, 100))


MAX_PRINTED_NODES = 25
# Deadline of every demo round; the fleet gives up after max_rounds of them.
ROUND_DEADLINE_SECONDS = 300
DATASET_SHAPES = {"digits": (64, 10), "breast_cancer": (30, 2)}
# Robust rules: trimmed mean cuts this share from each side per coordinate.
DEFAULT_TRIM_FRACTION = 0.2
# With --reputation, nodes whose score falls below this are quarantined
# (federation.aggregation.reputation: a node that sends an outlier every
# round falls below 0.4 in its third round).
DEFAULT_QUARANTINE_THRESHOLD = 0.4
# Names of the robust rules and attacks, listed here so --help needs no numpy import.
RULE_NAMES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "norm_bounding", "centered_clipping")
ATTACK_NAMES = ("sign_flip", "gaussian_noise", "boost", "label_flip", "little_is_enough")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make demo DEMO_ARGS=...", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20, help="number of simulated devices (default 20)")
    parser.add_argument(
        "--rounds",
        type=int,
        help="maximum number of rounds; record-level DP budgets may end the run earlier (default 100; with --central-dp 200 for a target epsilon of 8 or more)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the non-IID split; smaller is more skewed (default 0.5)")
    parser.add_argument("--dataset", choices=sorted(DATASET_SHAPES), default="digits", help="scikit-learn dataset (default digits)")
    parser.add_argument("--no-dp", action="store_true", help="train without record-level DP on the devices")
    parser.add_argument("--model", choices=("softmax", "mlp"), help="softmax regression or an MLP with one hidden layer (default: mlp without DP, softmax with DP)")
    parser.add_argument(
        "--per-round",
        type=int,
        help="devices selected per round (default: all without DP, half with DP, so that budgets last more rounds)",
    )
    parser.add_argument("--epsilon", type=float, default=10.0, help="record-level DP: epsilon each device may spend, at delta 1e-5 (default 10)")
    parser.add_argument(
        "--central-dp",
        action="store_true",
        help="user-level central DP-FedAvg instead of record-level DP: the server clips, noises and averages; devices train without noise",
    )
    parser.add_argument("--target-epsilon", type=float, default=8.0, help="central DP: epsilon of the whole run at --delta (default 8)")
    parser.add_argument(
        "--participation-rate", type=float, help="central DP: Poisson sampling rate per round (default 0.2 for a target epsilon of 8 or more, else 0.3)"
    )
    parser.add_argument("--delta", type=float, default=1e-5, help="delta of every privacy guarantee, at most 1e-3 (default 1e-5)")
    parser.add_argument("--rule", choices=RULE_NAMES, default="fedavg", help="aggregation rule of the server (default fedavg)")
    parser.add_argument(
        "--byzantine", type=int, help="f, the number of malicious updates krum, multi_krum and bulyan tolerate (default: --attackers)"
    )
    parser.add_argument(
        "--trim-fraction", type=float, default=DEFAULT_TRIM_FRACTION, help=f"trimmed_mean: share cut from each side per coordinate (default {DEFAULT_TRIM_FRACTION})"
    )
    parser.add_argument("--attack", choices=ATTACK_NAMES, help="what the malicious devices send (default: no attack)")
    parser.add_argument("--attackers", type=int, default=0, help="number of malicious devices, the last ones of the fleet (default 0)")
    parser.add_argument("--attack-scale", type=float, default=10.0, help="sign_flip and boost: factor applied to the honest update (default 10)")
    parser.add_argument(
        "--reputation",
        action="store_true",
        help=f"quarantine nodes whose reputation falls below --quarantine-threshold (default {DEFAULT_QUARANTINE_THRESHOLD})",
    )
    parser.add_argument("--quarantine-threshold", type=float, default=DEFAULT_QUARANTINE_THRESHOLD, help="reputation below which a node is quarantined")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, partition and selection (default 0)")
    parser.add_argument("--output", default="demo-output", help="directory for summary.json, the database and server.log (default demo-output)")
    args = parser.parse_args(argv)
    if args.devices < 2:
        parser.error(f"--devices must be at least 2, got {args.devices}.")
    training_examples = _count_training_examples(args.dataset)
    if args.devices > training_examples:
        parser.error(f"--devices must be at most {training_examples}, the training examples of {args.dataset}; got {args.devices}.")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}.")
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        parser.error(f"--alpha must be a positive finite number, got {args.alpha}.")
    if not (math.isfinite(args.epsilon) and args.epsilon > 0):
        parser.error(f"--epsilon must be a positive finite number, got {args.epsilon}.")
    if not 0 < args.delta <= 1e-3:
        parser.error(f"--delta must be in (0, 0.001], got {args.delta}.")
    if args.central_dp and args.no_dp:
        parser.error("--central-dp and --no-dp contradict each other; --central-dp already turns record-level DP off.")
    if args.central_dp:
        if not args.target_epsilon > 0:
            parser.error(f"--target-epsilon must be positive, got {args.target_epsilon}.")
        _, default_rate, default_rounds = next(schedule for schedule in CENTRAL_SCHEDULES if args.target_epsilon >= schedule[0])
        if args.participation_rate is None:
            args.participation_rate = default_rate
        if args.rounds is None:
            args.rounds = default_rounds
        if not 0 < args.participation_rate <= 1:
            parser.error(f"--participation-rate must be in (0, 1], got {args.participation_rate}.")
    if args.rounds is None:
        args.rounds = 100
    if args.model is None:
        if args.central_dp:
            args.model = CENTRAL_DEFAULTS["model"]
        elif args.no_dp:
            args.model = "mlp"
        else:
            args.model = "softmax"
    if args.per_round is None:
        args.per_round = args.devices if args.no_dp or args.central_dp else max(args.devices // 2, 1)
    if not 1 <= args.per_round <= args.devices:
        parser.error(f"--per-round must be between 1 and --devices ({args.devices}), got {args.per_round}.")
    _check_attack_args(parser, args)
    return args


def _check_attack_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.attackers < args.devices:
        parser.error(f"--attackers must be from 0 to --devices - 1 ({args.devices - 1}), got {args.attackers}.")
    if args.attack is None and args.attackers:
        parser.error("--attackers needs --attack, the kind of update the malicious devices send.")
    if args.attack is not None and not args.attackers:
        parser.error("--attack needs --attackers, the number of malicious devices.")
    if args.byzantine is None:
        args.byzantine = args.attackers
    if args.byzantine < 0:
        parser.error(f"--byzantine must be at least 0, got {args.byzantine}.")
    if not (math.isfinite(args.attack_scale) and args.attack_scale > 0):
        parser.error(f"--attack-scale must be a positive finite number, got {args.attack_scale}.")
    if not 0 <= args.trim_fraction < 0.5:
        parser.error(f"--trim-fraction must be in [0, 0.5), got {args.trim_fraction}.")
    if not 0 < args.quarantine_threshold < 1:
        parser.error(f"--quarantine-threshold must be in (0, 1), got {args.quarantine_threshold}.")
    if args.central_dp and args.rule != "fedavg":
        parser.error("--central-dp needs --rule fedavg: central DP bounds the sensitivity of the clipped sum of updates only.")


def _count_training_examples(dataset: str) -> int:
    from flo_client.datasets import load_dataset
    from flo_client.simulator import FleetConfig

    _, labels = load_dataset(dataset)
    return labels.size - math.ceil(labels.size * FleetConfig.test_fraction)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    output = Path(args.output).resolve()
    _prepare_output(output)
    os.environ["DATABASE_URL"] = f"sqlite:///{output / 'db.sqlite3'}"
    os.environ["FLO_DATA_DIR"] = str(output)
    # Every simulated device enrols from 127.0.0.1, so the per-address
    # enrolment throttle would stop a large fleet.
    os.environ.setdefault("FLO_ENROLMENT_THROTTLE", "100000/minute")
    # The simulator's observer polls every 0.1 seconds, faster than a real device.
    os.environ.setdefault("FLO_NODE_THROTTLE", "100000/minute")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flo_site.settings")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from federation.exceptions import InvalidFederationConfig

    try:
        federation, tokens = _create_federation(args)
    except InvalidFederationConfig as error:
        print(f"error: the demo federation is invalid: {error.detail}", file=sys.stderr)
        if args.rule in ("krum", "multi_krum", "bulyan"):
            print("With the demo, raise --devices or lower --byzantine (every round may close with --devices minus --attackers updates).", file=sys.stderr)
        return 2

    from flo_site.server_process import (
        find_free_port,
        start_server,
        stop_server,
        wait_until_healthy,
    )

    port = find_free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = output / "server.log"
    # Two server processes, so one can aggregate a round while the other serves polls.
    server = start_server(port=port, environment=os.environ.copy(), log_path=log_path, workers=2)
    try:
        wait_until_healthy(base_url, server, log_path)
        print(f"FLO server on {base_url}; federation {federation.name!r}; {args.devices} devices; {_describe_privacy(args, federation)}")
        summary = _run(args, federation, tokens, base_url)
    finally:
        stop_server(server)

    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _print_report(summary, output)
    return 0 if summary["final_accuracy"] is not None else 1


def _run(args, federation, tokens, base_url) -> dict:
    from federation.services.federations import start_federation
    from flo_client.attacks import AttackConfig
    from flo_client.simulator import FleetConfig, run_fleet

    attack = AttackConfig(name=args.attack, scale=args.attack_scale) if args.attack else None
    attacker_indices = tuple(range(args.devices - args.attackers, args.devices))
    config = FleetConfig(
        dataset=args.dataset,
        num_devices=args.devices,
        alpha=args.alpha,
        seed=args.seed,
        attack=attack,
        attacker_indices=attacker_indices,
        max_wall_seconds=args.rounds * ROUND_DEADLINE_SECONDS,
    )
    started = time.monotonic()

    def print_progress(version: int, accuracy: float) -> None:
        print(f"  model version {version:3d}: test accuracy {accuracy:.4f}", flush=True)

    result = run_fleet(base_url, tokens, config, on_enrolled=lambda: start_federation(federation), on_model_version=print_progress)
    return _build_summary(args, federation, result, duration_seconds=time.monotonic() - started)


def _create_federation(args):
    from federation.services.enrolment import issue_enrolment_tokens
    from federation.services.federations import create_federation

    num_features, num_classes = DATASET_SHAPES[args.dataset]
    if args.model == "mlp":
        model_spec = {"kind": "mlp", "num_features": num_features, "hidden_units": MLP_HIDDEN_UNITS, "num_classes": num_classes}
    else:
        model_spec = {"kind": "softmax_regression", "num_features": num_features, "num_classes": num_classes}
    if args.central_dp:
        federation = create_federation(
            name=f"demo-{args.dataset}-central-dp",
            model_spec=model_spec,
            training_plan=CENTRAL_DEFAULTS["training_plan"],
            round_deadline_seconds=ROUND_DEADLINE_SECONDS,
            max_rounds=args.rounds,
            dp_delta=args.delta,
            central_dp={
                "target_epsilon": args.target_epsilon,
                "participation_rate": args.participation_rate,
                "clip_norm": CENTRAL_DEFAULTS["clip_norm"],
                "accountant": "pld",
            },
            server_learning_rate=CENTRAL_DEFAULTS["server_learning_rate"],
            server_momentum=CENTRAL_DEFAULTS["server_momentum"],
            selection_seed=args.seed,
        )
    else:
        # Every selected device's update is awaited (target_updates); once
        # attackers are quarantined a round may close with the others.
        min_updates = max(args.per_round - args.attackers, 1)
        federation = create_federation(
            name=f"demo-{args.dataset}",
            model_spec=model_spec,
            training_plan=PLAIN_TRAINING_PLAN if args.no_dp else DP_TRAINING_PLAN,
            round_size=args.per_round,
            min_updates=min_updates,
            target_updates=args.per_round,
            aggregation_rule=args.rule,
            aggregation_params=_rule_params(args),
            quarantine_threshold=args.quarantine_threshold if args.reputation else None,
            round_deadline_seconds=ROUND_DEADLINE_SECONDS,
            max_rounds=args.rounds,
            dp_delta=args.delta,
            node_epsilon_budget=None if args.no_dp else args.epsilon,
            selection_seed=args.seed,
        )
    tokens = issue_enrolment_tokens(federation, count=args.devices, ttl_seconds=3600)
    return federation, tokens


def _rule_params(args) -> dict:
    if args.rule in ("krum", "multi_krum", "bulyan"):
        return {"num_byzantine": args.byzantine}
    if args.rule == "trimmed_mean":
        return {"trim_fraction": args.trim_fraction}
    return {}


def _build_summary(args, federation, result, *, duration_seconds: float) -> dict:
    from federation.models import ModelUpdate, Node

    federation.refresh_from_db()
    rejections_by_round: dict[int, int] = {}
    for rejection in result.rejections:
        if rejection.round_number is not None:
            rejections_by_round[rejection.round_number] = rejections_by_round.get(rejection.round_number, 0) + 1

    rounds = []
    for training_round in federation.rounds.select_related("result_version").defer("result_version__weights").order_by("number"):
        accepted = training_round.updates.filter(status=ModelUpdate.Status.ACCEPTED).count()
        rejected_at_aggregation = training_round.updates.filter(status=ModelUpdate.Status.REJECTED).count()
        version = training_round.result_version.version if training_round.result_version else None
        rounds.append(
            {
                "round": training_round.number,
                "state": training_round.state,
                "participants": training_round.selected_nodes.count(),
                "accepted": accepted,
                "rejected": rejected_at_aggregation + rejections_by_round.get(training_round.number, 0),
                "model_version": version,
                "accuracy": result.accuracy_by_version.get(version) if version else None,
                "failure_reason": training_round.failure_reason or None,
            }
        )

    nodes = []
    for node in Node.objects.filter(federation=federation).select_related("privacy_budget", "reputation").order_by("display_name"):
        budget = getattr(node, "privacy_budget", None)
        nodes.append(
            {
                "node_id": str(node.id),
                "display_name": node.display_name,
                "examples": result.examples_per_device.get(node.display_name),
                "participations": node.updates.filter(status=ModelUpdate.Status.ACCEPTED).count(),
                "epsilon_spent": budget.epsilon_spent if budget else None,
                "epsilon_allocated": budget.epsilon_allocated if budget else None,
                "delta": budget.delta if budget else None,
                "status": node.status,
                "reputation": round(node.reputation.score, 4) if hasattr(node, "reputation") else None,
            }
        )
    quarantine_rounds = {}
    for training_round in federation.rounds.order_by("number"):
        for node_id in (training_round.aggregation_report or {}).get("quarantined_node_ids") or []:
            quarantine_rounds.setdefault(node_id, training_round.number)

    final_version = max(result.accuracy_by_version, default=None)
    return {
        "dataset": args.dataset,
        "devices": args.devices,
        "alpha": args.alpha,
        "seed": args.seed,
        "delta": args.delta,
        "local_dp": not (args.no_dp or args.central_dp),
        "central_dp": args.central_dp,
        "federation_epsilon": _federation_epsilon(federation),
        "noise_multiplier": federation.central_noise_multiplier,
        "model_spec": federation.model_spec,
        "devices_per_round": None if args.central_dp else args.per_round,
        "rule": federation.aggregation_rule,
        "rule_params": federation.aggregation_params,
        "attack": args.attack,
        "attacker_ids": sorted(result.attacker_ids),
        "reputation": args.reputation,
        "quarantined_ids": sorted(node["node_id"] for node in nodes if node["status"] == Node.Status.QUARANTINED),
        "quarantined_in_round": quarantine_rounds,
        "training_plan": federation.training_plan,
        "federation_status": federation.status,
        "finish_reason": federation.status_reason or result.finish_reason,
        "final_model_version": final_version,
        "final_accuracy": result.accuracy_by_version.get(final_version) if final_version else None,
        "duration_seconds": round(duration_seconds, 1),
        "rounds": rounds,
        "nodes": nodes,
    }


def _describe_privacy(args, federation) -> str:
    if args.central_dp:
        return (
            f"user-level central DP, target epsilon {args.target_epsilon} at delta {args.delta} over {args.rounds} rounds, "
            f"participation rate {args.participation_rate}, calibrated noise multiplier {federation.central_noise_multiplier:.4f}"
        )
    if args.no_dp:
        return "no DP"
    return f"record-level DP-SGD, epsilon {args.epsilon} per device at delta {args.delta}"


def _federation_epsilon(federation) -> float | None:
    if not federation.central_dp:
        return None
    from privacy.services.central import federation_epsilon

    return federation_epsilon(federation)


def _print_report(summary: dict, output: Path) -> None:
    print()
    print(f"{'round':>5} {'state':>8} {'participants':>12} {'accepted':>8} {'rejected':>8} {'accuracy':>8}")
    for row in summary["rounds"]:
        accuracy = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "-"
        print(f"{row['round']:>5} {row['state']:>8} {row['participants']:>12} {row['accepted']:>8} {row['rejected']:>8} {accuracy:>8}")
    print()
    print(f"{'node':<12} {'examples':>8} {'rounds':>6} {'epsilon spent':>13} {'allocated':>9} {'reputation':>10} {'status':>11}")
    for node in summary["nodes"][:MAX_PRINTED_NODES]:
        spent = f"{node['epsilon_spent']:.3f}" if node["epsilon_spent"] is not None else "no budget"
        allocated = f"{node['epsilon_allocated']:.3f}" if node["epsilon_allocated"] is not None else "-"
        reputation = f"{node['reputation']:.3f}" if node["reputation"] is not None else "-"
        print(f"{node['display_name']:<12} {node['examples']:>8} {node['participations']:>6} {spent:>13} {allocated:>9} {reputation:>10} {node['status']:>11}")
    if len(summary["nodes"]) > MAX_PRINTED_NODES:
        print(f"... and {len(summary['nodes']) - MAX_PRINTED_NODES} more nodes in summary.json")
    print()
    if summary["central_dp"]:
        print(f"Central DP: noise multiplier {summary['noise_multiplier']:.4f}, federation epsilon {summary['federation_epsilon']:.4f} at delta {summary['delta']}")
    print(f"Aggregation rule: {summary['rule']} {summary['rule_params'] or ''}".rstrip())
    if summary["attack"]:
        caught = len(set(summary["quarantined_ids"]) & set(summary["attacker_ids"]))
        honest_quarantined = len(set(summary["quarantined_ids"]) - set(summary["attacker_ids"]))
        print(
            f"Attack: {summary['attack']} from {len(summary['attacker_ids'])} devices; "
            f"quarantined {caught} attackers and {honest_quarantined} honest devices"
        )
    print(f"Finished: {summary['finish_reason']}")
    final = f"{summary['final_accuracy']:.4f}" if summary["final_accuracy"] is not None else "none"
    print(f"Final test accuracy {final} after {len(summary['rounds'])} rounds in {summary['duration_seconds']} s.")
    print(f"Summary: {output / 'summary.json'}; server log: {output / 'server.log'}")
    env = f"DATABASE_URL=sqlite:///{output / 'db.sqlite3'} FLO_DATA_DIR={output}"
    print("To inspect this run in the Django admin:")
    print(f"  {env} .venv/bin/python manage.py createsuperuser")
    print(f"  {env} .venv/bin/python manage.py runserver 127.0.0.1:8000   # then open http://127.0.0.1:8000/admin/")


def _prepare_output(output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for name in ("db.sqlite3", "db.sqlite3-wal", "db.sqlite3-shm", "summary.json", "server.log"):
        (output / name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
