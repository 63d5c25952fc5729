"""Operator roles, stored as Django groups.

A user has a role when they belong to the group of that name. Superusers
count as admins. Devices never have roles: they authenticate with HMAC
signatures, not as Django users.
"""

ADMIN = "admin"
OPERATOR = "operator"
COMPLIANCE_OFFICER = "compliance_officer"
ROLES = (ADMIN, OPERATOR, COMPLIANCE_OFFICER)
# Roles that may export privacy reports.
REPORT_ROLES = (ADMIN, COMPLIANCE_OFFICER)


def has_role(user, *roles: str) -> bool:
    """Tell whether an active, authenticated user holds one of `roles`; superusers hold ADMIN."""
    if user is None or not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    if user.is_superuser and ADMIN in roles:
        return True
    return user.groups.filter(name__in=roles).exists()


def ensure_groups(group_model=None) -> None:
    """Create the group of every role that does not exist yet.

    Args:
        group_model: the Group model to use; data migrations pass their
            historical model, other callers leave it out.
    """
    if group_model is None:
        from django.contrib.auth.models import Group

        group_model = Group
    for role in ROLES:
        group_model.objects.get_or_create(name=role)
