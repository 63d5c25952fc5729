"""Operator roles, stored as Django groups: admin, operator and compliance officer.

A user has a role when they belong to the group of that name. Superusers
count as admins without joining a group. Admins and operators run
federations; compliance officers read everything, change nothing and
export privacy reports. Devices never have roles: they authenticate with
HMAC signatures, not as Django users.
"""

ADMIN = "admin"
OPERATOR = "operator"
COMPLIANCE_OFFICER = "compliance_officer"
ROLES = (ADMIN, OPERATOR, COMPLIANCE_OFFICER)
ALL_ROLES = ROLES
# Roles that may change federations and nodes.
OPERATING_ROLES = (ADMIN, OPERATOR)
# Roles that may export privacy reports.
REPORT_ROLES = (ADMIN, COMPLIANCE_OFFICER)


def has_role(user, *roles: str) -> bool:
    """Return whether an active, authenticated user has one of `roles`. Superusers have ADMIN."""
    if user is None or not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    if user.is_superuser and ADMIN in roles:
        return True
    return user.groups.filter(name__in=roles).exists()


def ensure_groups(group_model=None, **kwargs) -> None:
    """Create the group of every role that does not exist yet.

    Data migrations pass their historical Group model; as a post_migrate
    receiver it takes the model from the `apps` the signal sends.
    """
    if group_model is None:
        apps = kwargs.get("apps")
        if apps is not None:
            group_model = apps.get_model("auth", "Group")
        else:
            from django.contrib.auth.models import Group

            group_model = Group
    for role in ROLES:
        group_model.objects.get_or_create(name=role)
