"""Device REST API: enrol, fetch a task, download weights, submit an update, read status."""

import base64
import logging
import time

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema
from redis.exceptions import RedisError
from rest_framework import status
from rest_framework.exceptions import UnsupportedMediaType
from rest_framework.permissions import BasePermission
from rest_framework.response import Response
from rest_framework.throttling import AnonRateThrottle, SimpleRateThrottle
from rest_framework.views import APIView

from federation import exceptions
from federation.api import schema
from federation.api.authentication import NodeSignatureAuthentication
from federation.api.serializers import EnrolmentRequestSerializer, SecretRotationRequestSerializer
from federation.models import Node
from federation.queries import describe_node, describe_task, get_model_version
from federation.services.enrolment import enrol_node
from federation.services.nodes import rotate_node_secret
from federation.services.rounds import close_expired_rounds_when_due
from federation.services.updates import accept_update
from flo_client import wire

logger = logging.getLogger(__name__)

# Largest body of the JSON endpoints (enrolment, secret rotation): their
# fields fit in a few hundred bytes.
JSON_BODY_MAX_BYTES = 4096


class IsEnrolledNode(BasePermission):
    def has_permission(self, request, view):
        return isinstance(request.user, Node)


class StoreCheckedThrottle(SimpleRateThrottle):
    """A rate throttle that returns 503 when its Redis cache cannot be reached.

    DRF's throttles read and write Django's cache in every request, so an
    unreachable Redis raised an uncaught error and a 500, which devices do
    not retry. A 503 makes them retry once Redis is back.
    """

    def allow_request(self, request, view):
        try:
            return super().allow_request(request, view)
        except RedisError as error:
            logger.warning("throttle store unavailable scope=%s path=%s error=%s", self.scope, request.path, error)
            raise exceptions.ThrottleStoreUnavailable("The rate-limit store did not respond; retry the same request after the Retry-After delay.") from error


class EnrolmentThrottle(StoreCheckedThrottle, AnonRateThrottle):
    scope = "enrolment"


class NodeRateThrottle(StoreCheckedThrottle):
    """Limit each node's signed requests, counted in Django's cache, which every server process shares."""

    scope = "node"

    def get_cache_key(self, request, view):
        if not isinstance(request.user, Node):
            return None
        return self.cache_format % {"scope": self.scope, "ident": request.user.pk}


class BodyLimitedView(APIView):
    """An endpoint that rejects a body above `max_body_bytes` before authenticating or parsing it."""

    # Largest body, in bytes, this endpoint reads.
    max_body_bytes = 0

    def initial(self, request, *args, **kwargs):
        body_bytes = len(request.body)
        if body_bytes > self.max_body_bytes:
            if self.max_body_bytes == 0:
                raise exceptions.PayloadTooLarge(f"{request.method} {request.path} takes no request body; send it without one.")
            raise exceptions.PayloadTooLarge(f"The request body is {body_bytes} bytes; {request.path} accepts at most {self.max_body_bytes} bytes.")
        super().initial(request, *args, **kwargs)


class SignedNodeView(BodyLimitedView):
    authentication_classes = [NodeSignatureAuthentication]
    permission_classes = [IsEnrolledNode]
    throttle_classes = [NodeRateThrottle]


class EnrolView(BodyLimitedView):
    """Spend a one-time enrolment token; the response contains the node id and its HMAC secret, shown only once."""

    throttle_classes = [EnrolmentThrottle]
    max_body_bytes = JSON_BODY_MAX_BYTES

    @extend_schema(operation_id="enrol", request=EnrolmentRequestSerializer, responses=schema.ENROLMENT_RESPONSES, auth=[])
    def post(self, request):
        serializer = EnrolmentRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        node, secret = enrol_node(**serializer.validated_data)
        response = Response(
            {
                "node_id": str(node.id),
                "secret": base64.urlsafe_b64encode(secret).decode(),
                "federation_id": node.federation_id,
                "signature_window_seconds": settings.FLO_SIGNATURE_WINDOW_SECONDS,
                "server_time": int(time.time()),
            },
            status=status.HTTP_201_CREATED,
        )
        # The body contains a credential, so no cache may keep it.
        response["Cache-Control"] = "no-store"
        return response


class TaskView(SignedNodeView):
    """Return what the node should do now: train for the open round, wait, or stop."""

    @extend_schema(operation_id="get_task", responses=schema.TASK_RESPONSES)
    def get(self, request):
        close_expired_rounds_when_due(request.user.federation_id)
        return Response(describe_task(request.user))


class ModelWeightsView(SignedNodeView):
    """Download a model version in the tensor wire format; X-FLO-Weights-SHA256 contains its digest."""

    @extend_schema(operation_id="download_weights", parameters=[schema.MODEL_VERSION_PARAMETER], responses=schema.WEIGHTS_RESPONSES)
    def get(self, request, version: int):
        model_version = get_model_version(request.user.federation, version)
        response = HttpResponse(bytes(model_version.weights), content_type=wire.MEDIA_TYPE)
        response["X-FLO-Weights-SHA256"] = model_version.weights_sha256
        return response


class UpdateView(SignedNodeView):
    """Submit the node's model delta for the open round in the tensor wire format."""

    @property
    def max_body_bytes(self) -> int:
        # The service then applies the tighter limit derived from the federation's model size.
        return settings.FLO_MAX_REQUEST_BYTES

    @extend_schema(operation_id="submit_update", request={wire.MEDIA_TYPE: schema.TENSOR_BODY_SCHEMA}, responses=schema.UPDATE_RESPONSES)
    def post(self, request):
        # Read by the API's exception handler, which reports a rejected update
        # to the federation's console. Set only once the signature checked out.
        self.submitting_node = request.user
        media_type = request.content_type.split(";")[0].strip().lower()
        if media_type != wire.MEDIA_TYPE:
            raise UnsupportedMediaType(media_type, detail=f"Send updates as {wire.MEDIA_TYPE}, not {media_type or 'no content type'}.")
        update = accept_update(request.user, request.body)
        return Response(
            {"status": update.status, "update_id": update.id, "round": update.round.number, "num_examples": update.num_examples},
            status=status.HTTP_202_ACCEPTED,
        )


class NodeStatusView(SignedNodeView):
    """Return the node's own status, reputation and privacy budget."""

    @extend_schema(operation_id="get_node_status", responses=schema.NODE_STATUS_RESPONSES)
    def get(self, request):
        return Response(describe_node(request.user))


class NodeSecretView(SignedNodeView):
    """Rotate the node's HMAC secret; only the current secret may sign this request."""

    max_body_bytes = JSON_BODY_MAX_BYTES

    @extend_schema(operation_id="rotate_secret", request=SecretRotationRequestSerializer, responses=schema.SECRET_ROTATION_RESPONSES)
    def post(self, request):
        if not request.auth.is_current_secret:
            raise exceptions.PreviousSecretUsed("This request was signed with the node's previous secret; only the current secret may rotate it.")
        serializer = SecretRotationRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        rotated = rotate_node_secret(
            request.user,
            grace_seconds=serializer.validated_data["grace_seconds"],
            actor_label=f"node:{request.user.id}",
            remote_addr=request.META.get("REMOTE_ADDR"),
        )
        valid_until = rotated.previous_secret_valid_until
        response = Response(
            {
                "node_id": str(rotated.node.id),
                "secret": base64.urlsafe_b64encode(rotated.secret).decode(),
                "previous_secret_valid_until": valid_until.isoformat() if valid_until else None,
            }
        )
        # The body contains a credential, so no cache may keep it.
        response["Cache-Control"] = "no-store"
        return response



@csrf_exempt
def api_not_found(request, *args, **kwargs):
    """Return a JSON 404 for every unknown API path, also with DEBUG on, instead of an HTML page."""
    return JsonResponse({"code": "not_found", "detail": f"No API endpoint at {request.path}; see the endpoint list in the README."}, status=404)
