"""Argument lookups shared by the operator commands; each raises CommandError with the fix."""

import uuid

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from federation.models import Node


def get_node_argument(raw_node_id: str) -> Node:
    """Return the node named by a command-line node id."""
    try:
        node_id = uuid.UUID(raw_node_id)
    except ValueError as error:
        raise CommandError(f"{raw_node_id!r} is not a node id; node ids are UUIDs.") from error
    node = Node.objects.filter(id=node_id).first()
    if node is None:
        raise CommandError(f"Node {node_id} does not exist.")
    return node


def find_operator_argument(username: str | None):
    """Return the user named by --operator, or None when the option was left out."""
    if username is None:
        return None
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise CommandError(f"User {username!r} does not exist; create it with createsuperuser or name an existing operator.")
    return user
