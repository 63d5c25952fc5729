"""ASGI entry point: Django over HTTP with the console's static files, Channels for websockets."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flo_site.settings")

django_http_application = get_asgi_application()

# Imported after the app registry is loaded above.
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from flo_site.body_limit import BodySizeLimitMiddleware  # noqa: E402
from monitoring.routing import websocket_urlpatterns  # noqa: E402

# NOTE: ASGIStaticFilesHandler serves STATIC_URL from the app directories and
# STATICFILES_DIRS, reading each file on every request. That is enough for
# the console's few assets; a deployment with heavy traffic serves /static/
# from its reverse proxy instead.
application = ProtocolTypeRouter(
    {
        "http": BodySizeLimitMiddleware(ASGIStaticFilesHandler(django_http_application), max_body_bytes=settings.FLO_MAX_REQUEST_BYTES),
        # The origin check stops other sites from opening a socket with the operator's session cookie.
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
