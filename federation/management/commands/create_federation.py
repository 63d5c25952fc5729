"""Create a federation from a JSON configuration file and print its id."""

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from federation.exceptions import InvalidFederationConfig
from federation.services.federations import create_federation

ALLOWED_KEYS = {
    "name",
    "model_spec",
    "training_plan",
    "round_size",
    "min_updates",
    "target_updates",
    "aggregation_rule",
    "aggregation_params",
    "quarantine_threshold",
    "round_deadline_seconds",
    "max_rounds",
    "dp_delta",
    "node_epsilon_budget",
    "sensitivity_budgets",
    "spending_schedule",
    "planned_participations",
    "central_dp",
    "server_learning_rate",
    "server_momentum",
    "server_optimizer",
    "server_optimizer_params",
    "node_liveness_seconds",
    "selection_seed",
    "max_nodes",
}


REQUIRED_KEYS = {"name", "model_spec", "training_plan"}


class Command(BaseCommand):
    help = "Create a draft federation from a JSON file with the keys: " + ", ".join(sorted(ALLOWED_KEYS)) + "."

    def add_arguments(self, parser):
        parser.add_argument("config", type=Path, help="path of the JSON configuration file")

    def handle(self, *args, config: Path, **options):
        try:
            settings = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CommandError(f"Cannot read the configuration {config}: {error}") from error
        if not isinstance(settings, dict):
            raise CommandError("The configuration must be a JSON object.")
        unknown = set(settings) - ALLOWED_KEYS
        if unknown:
            raise CommandError(f"Unknown configuration keys: {', '.join(sorted(unknown))}.")
        missing = REQUIRED_KEYS - set(settings)
        if missing:
            raise CommandError(f"Missing configuration keys: {', '.join(sorted(missing))}.")
        try:
            federation = create_federation(**settings)
        except InvalidFederationConfig as error:
            raise CommandError(error.detail) from error
        self.stdout.write(json.dumps({"federation_id": federation.id, "central_noise_multiplier": federation.central_noise_multiplier}))
