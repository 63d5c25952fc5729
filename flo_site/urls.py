from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView

from monitoring.views import healthz, metrics_view

# A lock conflict outside a view gets 503 with Retry-After instead of a 500 or 400.
handler400 = "flo_site.database_busy.bad_request"
handler500 = "flo_site.database_busy.server_error"

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="console-federations"), name="home"),
    path("admin/", admin.site.urls),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("console/", include("privacy.urls")),
    # Before the device API, whose last pattern returns 404 for every other /api/v1/ path.
    path("api/v1/", include("privacy.api.urls")),
    path("api/v1/", include("federation.api.urls")),
    path("console/", include("monitoring.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
]
