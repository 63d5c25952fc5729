"""Permission classes for privacy reports."""

from rest_framework.permissions import BasePermission

from flo_site.roles import REPORT_ROLES, has_role


class CanExportPrivacyReports(BasePermission):
    """Permission for admins and compliance officers only, so operators and anonymous callers get 403 or 401."""

    message = "Privacy reports are limited to the admin and compliance officer roles."

    def has_permission(self, request, view):
        return has_role(request.user, *REPORT_ROLES)
