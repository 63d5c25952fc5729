from django.contrib import admin
from django.urls import include, path

from monitoring.views import healthz

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("federation.api.urls")),
    path("healthz", healthz, name="healthz"),
]
