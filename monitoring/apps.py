from django.apps import AppConfig
from django.db.models.signals import post_migrate


class MonitoringConfig(AppConfig):
    name = "monitoring"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from flo_site.roles import ensure_groups

        # post_migrate also fires after a test database is flushed, so the groups survive it.
        post_migrate.connect(ensure_groups, sender=self, dispatch_uid="monitoring.ensure_role_groups")
