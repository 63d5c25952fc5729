from django.apps import AppConfig


class FederationConfig(AppConfig):
    name = "federation"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from federation import (
            checks,  # noqa: F401  (registers system checks)
            signals,  # noqa: F401  (connects the signal receivers)
        )
