"""Encoding, storing and loading model weights and updates."""

import hashlib
import math

import numpy as np

from federation.models import ModelVersion
from flo_client import wire
from flo_client.models import tensor_specs


def store_model_version(federation, *, version: int, weights: dict[str, np.ndarray], num_updates: int = 0, total_examples: int = 0) -> ModelVersion:
    """Write a model version in the tensor wire format (float32)."""
    payload = wire.encode_tensors(weights, {"federation": federation.id, "version": version})
    return ModelVersion.objects.create(
        federation=federation,
        version=version,
        weights=payload,
        weights_sha256=hashlib.sha256(payload).hexdigest(),
        num_updates=num_updates,
        total_examples=total_examples,
    )


def load_weights(model_version: ModelVersion) -> dict[str, np.ndarray]:
    """Decode a stored model version."""
    _, tensors = wire.decode_tensors(bytes(model_version.weights))
    return tensors


def expected_update_bytes(model_spec: dict, header_allowance_bytes: int) -> int:
    """Largest acceptable update body for a model: its float32 tensors plus the header allowance."""
    data_bytes = sum(math.prod(spec.shape) * np.dtype(spec.dtype).itemsize for spec in tensor_specs(model_spec))
    return data_bytes + header_allowance_bytes
