"""Celery application. Tasks run eagerly unless REDIS_URL configures a broker."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flo_site.settings")

app = Celery("flo")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
