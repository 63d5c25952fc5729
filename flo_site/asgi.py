"""ASGI entry point: Django over HTTP, Channels for websockets."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flo_site.settings")

django_http_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402  (needs the app registry loaded above)
from django.conf import settings  # noqa: E402

from flo_site.body_limit import BodySizeLimitMiddleware  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": BodySizeLimitMiddleware(django_http_application, max_body_bytes=settings.FLO_MAX_REQUEST_BYTES),
    }
)
