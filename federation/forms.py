"""Forms of the operator console."""

from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.exceptions import ValidationError

from federation.services.audit import record_audit
from federation.services.login_throttle import clear_login_failures, is_login_locked, record_login_failure


class ThrottledAdminAuthenticationForm(AdminAuthenticationForm):
    """The admin sign-in form, which refuses a username and address pair after too many failed attempts."""

    error_messages = {
        **AdminAuthenticationForm.error_messages,
        "locked": "Too many failed sign-ins for this username from your address; wait a few minutes, then try again.",
    }

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        remote_addr = self.request.META.get("REMOTE_ADDR") if self.request else None
        if is_login_locked(username, remote_addr):
            record_audit("operator.login_locked", actor_label=username[:200], remote_addr=remote_addr)
            raise ValidationError(self.error_messages["locked"], code="locked")
        try:
            cleaned_data = super().clean()
        except ValidationError:
            record_login_failure(username, remote_addr)
            raise
        clear_login_failures(username, remote_addr)
        return cleaned_data
