from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from monitoring.views import healthz, metrics_view

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="console-federations"), name="home"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("federation.api.urls")),
    path("console/", include("monitoring.urls")),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
]
