from django.urls import path

from monitoring.consumers import FederationConsumer

websocket_urlpatterns = [
    path("ws/federations/<int:federation_id>/", FederationConsumer.as_asgi()),
]
