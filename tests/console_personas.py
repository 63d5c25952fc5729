"""Console personas: one user per role, and a user with no role."""

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group

from flo_site.roles import ensure_groups

PASSWORD = "correct-horse-battery-staple"


def make_user(username: str, role: str | None):
    ensure_groups()
    user = get_user_model().objects.create_user(username=username, password=PASSWORD)
    if role is not None:
        user.groups.add(Group.objects.get(name=role))
    return user
