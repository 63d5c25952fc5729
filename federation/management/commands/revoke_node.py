"""Revoke a node: from the next request on, every server process rejects it with node_revoked."""

import json

from django.core.management.base import BaseCommand, CommandError

from federation.exceptions import InvalidNodeState
from federation.management.arguments import find_operator_argument, get_node_argument
from federation.models import Node
from federation.services.nodes import revoke_node


class Command(BaseCommand):
    help = "Revoke a node. Its requests are rejected with 403 node_revoked at once, and the revocation is audited."

    def add_arguments(self, parser):
        parser.add_argument("node", help="node id (UUID)")
        parser.add_argument("--reason", default="", help="why the node is revoked; shown to the device and kept in the audit log")
        parser.add_argument("--operator", help="username of the operator who decided it, kept in the audit log")

    def handle(self, *args, node: str, reason: str, operator: str | None, **options):
        target = get_node_argument(node)
        actor = find_operator_argument(operator)
        try:
            revoke_node(target, reason=reason, actor=actor)
        except InvalidNodeState as error:
            raise CommandError(error.detail) from error
        self.stdout.write(json.dumps({"node_id": str(target.id), "status": Node.Status.REVOKED}))
