"""Compute the epsilon of DP-SGD, or the noise multiplier for a target epsilon, as JSON."""

import json
import math

from django.core.management.base import BaseCommand, CommandError, CommandParser

from privacy.accounting import ACCOUNTANTS, DpSgdEvent, calibrate_noise_multiplier, compose_epsilon


class Command(BaseCommand):
    help = (
        "Privacy calculator for `steps` steps of the Poisson-subsampled Gaussian mechanism. "
        '`epsilon` prints {"epsilon": ...} for a noise multiplier; `noise` prints '
        '{"noise_multiplier": ...}, the smallest one whose epsilon is at most the target.'
    )

    def add_arguments(self, parser: CommandParser) -> None:
        subcommands = parser.add_subparsers(dest="subcommand", required=True, metavar="{epsilon,noise}")

        epsilon_parser = subcommands.add_parser("epsilon", help="epsilon spent by the given noise multiplier")
        epsilon_parser.add_argument("--noise-multiplier", type=float, required=True, help="noise standard deviation divided by the clipping norm, > 0")
        _add_common_arguments(epsilon_parser)

        noise_parser = subcommands.add_parser("noise", help="smallest noise multiplier that meets a target epsilon")
        noise_parser.add_argument("--target-epsilon", type=float, required=True, help="epsilon to meet at --delta, > 0")
        _add_common_arguments(noise_parser)

    def handle(self, *args, subcommand: str, **options) -> None:
        try:
            if subcommand == "epsilon":
                result = _epsilon_result(options)
            else:
                result = _noise_result(options)
        except ValueError as error:
            raise CommandError(str(error)) from error
        if not all(math.isfinite(value) for value in result.values() if isinstance(value, float)):
            raise CommandError(f"The result is unbounded ({result}): the noise is too small for any finite epsilon; use a larger noise multiplier.")
        self.stdout.write(json.dumps(result, allow_nan=False))


def _add_common_arguments(parser: CommandParser) -> None:
    parser.add_argument("--sampling-rate", type=float, required=True, help="Poisson sampling rate q of each step, in (0, 1]")
    parser.add_argument("--steps", type=int, required=True, help="number of steps, a positive integer")
    parser.add_argument("--delta", type=float, required=True, help="target delta, for example 1e-5")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp", help="rdp (default) or pld")


def _epsilon_result(options: dict) -> dict:
    event = DpSgdEvent(noise_multiplier=options["noise_multiplier"], sampling_rate=options["sampling_rate"], steps=options["steps"])
    epsilon = compose_epsilon([event], delta=options["delta"], accountant=options["accountant"])
    return {
        "epsilon": epsilon,
        "noise_multiplier": event.noise_multiplier,
        "sampling_rate": event.sampling_rate,
        "steps": event.steps,
        "delta": options["delta"],
        "accountant": options["accountant"],
    }


def _noise_result(options: dict) -> dict:
    noise_multiplier = calibrate_noise_multiplier(
        target_epsilon=options["target_epsilon"],
        delta=options["delta"],
        sampling_rate=options["sampling_rate"],
        steps=options["steps"],
        accountant=options["accountant"],
    )
    epsilon = compose_epsilon(
        [DpSgdEvent(noise_multiplier, options["sampling_rate"], options["steps"])], delta=options["delta"], accountant=options["accountant"]
    )
    return {
        "noise_multiplier": noise_multiplier,
        "epsilon": epsilon,
        "target_epsilon": options["target_epsilon"],
        "sampling_rate": options["sampling_rate"],
        "steps": options["steps"],
        "delta": options["delta"],
        "accountant": options["accountant"],
    }
