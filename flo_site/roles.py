"""Console roles as Django groups: admin, operator and compliance officer.

Admins and operators run federations; compliance officers read everything
and change nothing. A superuser counts as an admin without joining a group.
"""

ADMIN = "admin"
OPERATOR = "operator"
COMPLIANCE_OFFICER = "compliance_officer"
ALL_ROLES = (ADMIN, OPERATOR, COMPLIANCE_OFFICER)
# Roles that may change federations and nodes.
OPERATING_ROLES = (ADMIN, OPERATOR)


def has_role(user, *roles: str) -> bool:
    """Tell whether an authenticated, active user holds one of `roles`; superusers hold admin."""
    if user is None or not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    if user.is_superuser and ADMIN in roles:
        return True
    return user.groups.filter(name__in=roles).exists()


def ensure_groups(**kwargs) -> None:
    """Create the role groups that are missing. Connected to post_migrate, so every migrated database has them."""
    from django.contrib.auth.models import Group

    for role in ALL_ROLES:
        Group.objects.get_or_create(name=role)
