"""Give a node a new HMAC secret and print it once, for an operator to hand to the device."""

import base64
import json

from django.core.management.base import BaseCommand, CommandError

from federation.exceptions import InvalidNodeState, InvalidSecretRotation
from federation.management.arguments import find_operator_argument, get_node_argument
from federation.services.nodes import MAX_SECRET_GRACE_SECONDS, rotate_node_secret


class Command(BaseCommand):
    help = (
        "Rotate a node's HMAC secret. Prints {node_id, secret, previous_secret_valid_until} as JSON; "
        "the secret is shown only here. The old secret keeps verifying during the grace period."
    )

    def add_arguments(self, parser):
        parser.add_argument("node", help="node id (UUID)")
        parser.add_argument(
            "--grace-seconds",
            type=int,
            default=0,
            help=f"seconds the old secret keeps verifying requests, 0 to {MAX_SECRET_GRACE_SECONDS} (default 0: it stops at once)",
        )
        parser.add_argument("--operator", help="username of the operator who rotates it, kept in the audit log")

    def handle(self, *args, node: str, grace_seconds: int, operator: str | None, **options):
        target = get_node_argument(node)
        actor = find_operator_argument(operator)
        try:
            rotated = rotate_node_secret(target, grace_seconds=grace_seconds, actor=actor, actor_label="manage.py")
        except (InvalidNodeState, InvalidSecretRotation) as error:
            raise CommandError(error.detail) from error
        valid_until = rotated.previous_secret_valid_until
        self.stdout.write(
            json.dumps(
                {
                    "node_id": str(target.id),
                    "secret": base64.urlsafe_b64encode(rotated.secret).decode(),
                    "previous_secret_valid_until": valid_until.isoformat() if valid_until else None,
                }
            )
        )
