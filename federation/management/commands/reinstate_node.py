"""Return a quarantined node to active, with its reputation reset."""

import json
import uuid

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from federation.exceptions import InvalidNodeState
from federation.models import Node
from federation.services.reputation import reinstate_node


class Command(BaseCommand):
    help = "Reinstate a quarantined node: it becomes active, its reputation returns to the initial score, and the change is audited."

    def add_arguments(self, parser):
        parser.add_argument("node", help="node id (UUID)")
        parser.add_argument("--reason", default="", help="why the node is reinstated, kept in the audit log")
        parser.add_argument("--operator", help="username of the operator who decided it, kept in the audit log")

    def handle(self, *args, node: str, reason: str, operator: str | None, **options):
        try:
            node_id = uuid.UUID(node)
        except ValueError as error:
            raise CommandError(f"{node!r} is not a node id; node ids are UUIDs.") from error
        target = Node.objects.filter(id=node_id).first()
        if target is None:
            raise CommandError(f"Node {node_id} does not exist.")
        actor = None
        if operator is not None:
            actor = get_user_model().objects.filter(username=operator).first()
            if actor is None:
                raise CommandError(f"User {operator!r} does not exist.")
        try:
            reinstate_node(target, actor=actor, reason=reason)
        except InvalidNodeState as error:
            raise CommandError(error.detail) from error
        self.stdout.write(json.dumps({"node_id": str(node_id), "status": Node.Status.ACTIVE}))
