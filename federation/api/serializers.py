"""Request shapes of the device API (JSON endpoints)."""

from rest_framework import serializers


class EnrolmentRequestSerializer(serializers.Serializer):
    token = serializers.CharField(max_length=200)
    display_name = serializers.CharField(max_length=200)

    def validate(self, attrs):
        unknown = set(self.initial_data) - set(self.fields)
        if unknown:
            raise serializers.ValidationError(f"Unknown fields: {', '.join(sorted(unknown))}.")
        return attrs
