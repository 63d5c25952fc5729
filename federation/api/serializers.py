"""Request shapes of the device API (JSON endpoints)."""

from django.conf import settings
from rest_framework import serializers

from federation.services.nodes import MAX_SECRET_GRACE_SECONDS


class StrictSerializer(serializers.Serializer):
    """A serializer that rejects fields it does not declare, so a misspelt field is an error instead of being ignored."""

    def validate(self, attrs):
        unknown = set(self.initial_data) - set(self.fields) if isinstance(self.initial_data, dict) else set()
        if unknown:
            raise serializers.ValidationError(f"Unknown fields: {', '.join(sorted(unknown))}.")
        return attrs


class EnrolmentRequestSerializer(StrictSerializer):
    token = serializers.CharField(max_length=200)
    display_name = serializers.CharField(max_length=200)


class SecretRotationRequestSerializer(StrictSerializer):
    grace_seconds = serializers.IntegerField(
        min_value=0,
        max_value=MAX_SECRET_GRACE_SECONDS,
        required=False,
        help_text="Seconds the current secret keeps verifying requests after the rotation; FLO_SECRET_GRACE_SECONDS when left out.",
    )

    def validate(self, attrs):
        attrs = super().validate(attrs)
        attrs.setdefault("grace_seconds", settings.FLO_SECRET_GRACE_SECONDS)
        return attrs
