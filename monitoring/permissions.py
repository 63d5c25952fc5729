"""Role checks for console views; the roles themselves are defined in flo_site.roles."""

from functools import wraps

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied

from flo_site.roles import ALL_ROLES, OPERATING_ROLES, has_role


def role_required(*roles: str):
    """Redirect anonymous users to the login page and respond 403 to users without one of `roles`."""

    def decorator(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not has_role(request.user, *roles):
                raise PermissionDenied(f"This page needs one of the roles: {', '.join(roles)}.")
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


# Every console role may read; only admins and operators may act.
console_reader = role_required(*ALL_ROLES)
console_operator = role_required(*OPERATING_ROLES)


def can_operate(user) -> bool:
    """Tell whether the user may change federations and nodes, for showing action buttons."""
    return has_role(user, *OPERATING_ROLES)
