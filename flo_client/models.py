"""Model specs, weights and hand-written gradients for the models devices train.

A model spec is a small JSON-safe mapping that both the server and devices read:

    {"kind": "softmax_regression", "num_features": F, "num_classes": C}
    {"kind": "mlp", "num_features": F, "hidden_units": H, "num_classes": C}

Both models are stacks of dense layers (the MLP has a ReLU between its two),
trained on softmax cross-entropy. Weights are a dict from tensor name to a
float32 array, with the names and shapes that `tensor_specs` lists.

Gradients are returned as per-example factors of each dense layer: the
layer's inputs `a` (n, in) and the gradient of the loss with respect to its
outputs `d` (n, out). Example i's weight gradient is the outer product
a[i] d[i]^T and its bias gradient is d[i], so sums, norms and clipped sums
over examples never need the (n, in, out) array of per-example gradients.
"""

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]
Weights = dict[str, np.ndarray]

MODEL_KINDS = ("softmax_regression", "mlp")
# Upper bound on the total parameter count of a spec, so that a malformed or
# hostile spec cannot make a device allocate gigabytes (1e7 float32 = 40 MB).
MAX_PARAMETERS = 10_000_000
_SIZE_KEYS = {
    "softmax_regression": ("num_features", "num_classes"),
    "mlp": ("num_features", "hidden_units", "num_classes"),
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one weight tensor of a model."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True, eq=False)
class DenseGradientFactors:
    """Per-example gradient factors of one dense layer `outputs = inputs @ weight + bias`.

    Attributes:
        weight_name: Name of the layer's weight tensor, shape (in, out).
        bias_name: Name of the layer's bias tensor, shape (out,).
        inputs: Layer inputs, shape (n, in), float64.
        output_gradients: Gradient of each example's loss with respect to the
            layer outputs, shape (n, out), float64.
    """

    weight_name: str
    bias_name: str
    inputs: np.ndarray
    output_gradients: np.ndarray


def validate_model_spec(spec: Mapping) -> dict:
    """Check a model spec and return a normalised copy with plain int sizes.

    Raises:
        ValueError: naming the missing, unknown or invalid key, or the
            parameter count when it exceeds MAX_PARAMETERS.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"Model spec must be a mapping, got {type(spec).__name__}.")
    if "kind" not in spec:
        raise ValueError(f"Model spec is missing the key 'kind', expected one of {', '.join(MODEL_KINDS)}.")
    kind = spec["kind"]
    if kind not in MODEL_KINDS:
        raise ValueError(f"Model spec 'kind' is {kind!r}, expected one of {', '.join(MODEL_KINDS)}.")

    size_keys = _SIZE_KEYS[kind]
    unknown_keys = sorted(str(key) for key in spec if key != "kind" and key not in size_keys)
    if unknown_keys:
        raise ValueError(
            f"Model spec of kind {kind!r} has unknown keys {unknown_keys}. Allowed keys are kind, {', '.join(size_keys)}."
        )

    normalised: dict = {"kind": kind}
    for key in size_keys:
        if key not in spec:
            raise ValueError(f"Model spec of kind {kind!r} is missing the key {key!r}.")
        minimum = 2 if key == "num_classes" else 1
        normalised[key] = _require_int_at_least(f"Model spec {key!r}", spec[key], minimum)

    num_parameters = sum(math.prod(tensor.shape) for tensor in _tensor_specs_of_valid_spec(normalised))
    if num_parameters > MAX_PARAMETERS:
        raise ValueError(f"Model spec has {num_parameters} parameters, more than the maximum of {MAX_PARAMETERS}.")
    return normalised


def tensor_specs(spec: Mapping) -> list[TensorSpec]:
    """List the weight tensors of a model in their fixed order.

    Softmax regression: "weight" (F, C), "bias" (C,). MLP: "hidden.weight"
    (F, H), "hidden.bias" (H,), "output.weight" (H, C), "output.bias" (C,).
    All are float32.

    Raises:
        ValueError: if the spec is invalid.
    """
    return _tensor_specs_of_valid_spec(validate_model_spec(spec))


def initial_weights(spec: Mapping, rng: np.random.Generator) -> Weights:
    """Draw the initial float32 weights of a model.

    Softmax regression starts at zero, because its loss is convex and zero
    gives uniform predictions. The MLP's hidden weights are He-normal (std
    sqrt(2 / F), suited to ReLU), its output weights Glorot-uniform (limit
    sqrt(6 / (H + C))) and its biases zero.

    Raises:
        ValueError: if the spec is invalid.
    """
    spec = validate_model_spec(spec)
    weights = {tensor.name: np.zeros(tensor.shape, dtype=np.float32) for tensor in _tensor_specs_of_valid_spec(spec)}
    if spec["kind"] == "mlp":
        num_features, num_hidden, num_classes = spec["num_features"], spec["hidden_units"], spec["num_classes"]
        he_std = math.sqrt(2.0 / num_features)
        glorot_limit = math.sqrt(6.0 / (num_hidden + num_classes))
        weights["hidden.weight"] = rng.normal(0.0, he_std, size=(num_features, num_hidden)).astype(np.float32)
        weights["output.weight"] = rng.uniform(-glorot_limit, glorot_limit, size=(num_hidden, num_classes)).astype(
            np.float32
        )
    return weights


def validate_weights(spec: Mapping, weights: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError unless `weights` has exactly the model's tensors with finite floating-point values.

    Raises:
        ValueError: naming the missing or unknown tensor, or the tensor with a
            wrong shape, a non-float dtype or a non-finite value.
    """
    expected = {tensor.name: tensor.shape for tensor in tensor_specs(spec)}
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing or unknown:
        raise ValueError(
            f"Weights must contain exactly the tensors {sorted(expected)}, but {missing} are missing and {unknown} are unknown."
        )
    for name, shape in expected.items():
        array = np.asarray(weights[name])
        if array.shape != shape:
            raise ValueError(f"Weight tensor {name!r} has shape {array.shape}, expected {shape}.")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"Weight tensor {name!r} has dtype {array.dtype}, expected a floating-point dtype.")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"Weight tensor {name!r} contains NaN or infinite values.")


def validate_examples(spec: Mapping, features: np.ndarray, labels: np.ndarray) -> tuple[FloatArray, IntArray]:
    """Check features and labels against a model spec and return float64 features and int64 labels.

    Args:
        spec: Model spec.
        features: Shape (n, F), any real dtype, finite.
        labels: Shape (n,), integer class ids in [0, C).

    Raises:
        ValueError: stating the expected and received shape, dtype or label range.
    """
    spec = validate_model_spec(spec)
    features = _as_feature_matrix(spec, features)
    labels = np.asarray(labels)
    if labels.shape != (features.shape[0],):
        raise ValueError(f"Labels have shape {labels.shape}, expected ({features.shape[0]},) to match the features.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Labels have dtype {labels.dtype}, expected an integer dtype.")
    if labels.size and (labels.min() < 0 or labels.max() >= spec["num_classes"]):
        raise ValueError(
            f"Labels range from {labels.min()} to {labels.max()}, expected class ids in [0, {spec['num_classes']})."
        )
    return features, labels.astype(np.int64)


def predict_logits(spec: Mapping, weights: Mapping[str, np.ndarray], features: np.ndarray) -> FloatArray:
    """Compute the class logits of a batch.

    Args:
        spec: Model spec.
        weights: Model weights as listed by `tensor_specs`.
        features: Shape (n, F).

    Returns:
        Logits, shape (n, C), float64.

    Raises:
        ValueError: if the spec, weights or features are invalid.
    """
    spec = validate_model_spec(spec)
    validate_weights(spec, weights)
    logits, _ = _forward(spec, weights, _as_feature_matrix(spec, features))
    return logits


def evaluate_accuracy(
    spec: Mapping, weights: Mapping[str, np.ndarray], features: np.ndarray, labels: np.ndarray
) -> float:
    """Compute the fraction of examples whose highest logit is at the true class.

    Args:
        spec: Model spec.
        weights: Model weights.
        features: Shape (n, F), n >= 1.
        labels: Shape (n,), class ids.

    Raises:
        ValueError: if the inputs are invalid or there are no examples.
    """
    spec = validate_model_spec(spec)
    validate_weights(spec, weights)
    features, labels = validate_examples(spec, features, labels)
    if labels.size == 0:
        raise ValueError("Cannot evaluate accuracy on zero examples.")
    logits, _ = _forward(spec, weights, features)
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def compute_loss(spec: Mapping, weights: Mapping[str, np.ndarray], features: np.ndarray, labels: np.ndarray) -> float:
    """Compute the mean softmax cross-entropy (natural log) over a batch of n >= 1 examples.

    Raises:
        ValueError: if the inputs are invalid or there are no examples.
    """
    spec = validate_model_spec(spec)
    validate_weights(spec, weights)
    features, labels = validate_examples(spec, features, labels)
    if labels.size == 0:
        raise ValueError("Cannot compute the loss of zero examples.")
    logits, _ = _forward(spec, weights, features)
    log_probabilities = _log_softmax(logits)
    return float(-np.mean(log_probabilities[np.arange(labels.size), labels]))


def compute_gradient_factors(
    spec: Mapping, weights: Mapping[str, np.ndarray], features: np.ndarray, labels: np.ndarray
) -> list[DenseGradientFactors]:
    """Backpropagate each example's cross-entropy loss by hand.

    Args:
        spec: Model spec.
        weights: Model weights.
        features: Shape (n, F), where n may be 0.
        labels: Shape (n,), class ids.

    Returns:
        One DenseGradientFactors per dense layer, input layer first. The
        factors are of each example's own loss, not of the batch mean.

    Raises:
        ValueError: if the inputs are invalid.
    """
    spec = validate_model_spec(spec)
    validate_weights(spec, weights)
    features, labels = validate_examples(spec, features, labels)
    return backpropagate(spec, weights, features, labels)


def backpropagate(
    spec: Mapping, weights: Mapping[str, np.ndarray], features: FloatArray, labels: IntArray
) -> list[DenseGradientFactors]:
    """Compute the same factors as `compute_gradient_factors`, without checking the inputs.

    Training loops call this once per step after checking the inputs once
    with `validate_model_spec`, `validate_weights` and `validate_examples`.
    """
    logits, cache = _forward(spec, weights, features)

    # d(-log softmax(z)_y)/dz = softmax(z) - onehot(y).
    output_gradients = np.exp(_log_softmax(logits))
    output_gradients[np.arange(labels.size), labels] -= 1.0

    factors = []
    layer_names = _dense_layer_names(spec)
    for index in range(len(layer_names) - 1, -1, -1):
        weight_name, bias_name = layer_names[index]
        inputs, _ = cache[index]
        factors.append(DenseGradientFactors(weight_name, bias_name, inputs, output_gradients))
        if index > 0:
            # Through this layer's weight, then through the previous layer's ReLU.
            weight = np.asarray(weights[weight_name], dtype=np.float64)
            _, previous_pre_activations = cache[index - 1]
            output_gradients = (output_gradients @ weight.T) * (previous_pre_activations > 0.0)
    factors.reverse()
    return factors


def sum_gradients(factors: list[DenseGradientFactors], *, example_scales: FloatArray | None = None) -> Weights:
    """Sum the per-example gradients, each multiplied by its scale.

    Args:
        factors: Output of `compute_gradient_factors` for n examples.
        example_scales: Shape (n,). Every scale is 1 when omitted.

    Returns:
        Tensor name -> summed gradient, float64, in the tensor's shape.
    """
    gradients: Weights = {}
    for layer in factors:
        output_gradients = layer.output_gradients
        if example_scales is not None:
            output_gradients = output_gradients * example_scales[:, np.newaxis]
        # sum_i s_i a_i d_i^T = a^T (s * d), a single matrix product.
        gradients[layer.weight_name] = layer.inputs.T @ output_gradients
        gradients[layer.bias_name] = output_gradients.sum(axis=0)
    return gradients


def compute_per_example_gradient_norms(factors: list[DenseGradientFactors]) -> FloatArray:
    """Compute the L2 norm of each example's gradient across all tensors jointly.

    Returns:
        Shape (n,), float64.
    """
    squared_norms = np.zeros(factors[0].inputs.shape[0], dtype=np.float64)
    for layer in factors:
        # ||a_i d_i^T||_F^2 = ||a_i||^2 ||d_i||^2, and the bias adds ||d_i||^2.
        input_squared = np.einsum("ni,ni->n", layer.inputs, layer.inputs)
        output_squared = np.einsum("no,no->n", layer.output_gradients, layer.output_gradients)
        squared_norms += (input_squared + 1.0) * output_squared
    return np.sqrt(squared_norms)


def compute_per_example_gradients(factors: list[DenseGradientFactors]) -> Weights:
    """Expand the factors into full per-example gradients.

    This allocates n times the model size, so training uses the factors
    directly. It exists for tests and inspection.

    Returns:
        Tensor name -> array of shape (n, *tensor shape), float64.
    """
    gradients: Weights = {}
    for layer in factors:
        gradients[layer.weight_name] = np.einsum("ni,no->nio", layer.inputs, layer.output_gradients)
        gradients[layer.bias_name] = layer.output_gradients.copy()
    return gradients


def _tensor_specs_of_valid_spec(spec: Mapping) -> list[TensorSpec]:
    num_features, num_classes = spec["num_features"], spec["num_classes"]
    if spec["kind"] == "softmax_regression":
        return [TensorSpec("weight", (num_features, num_classes)), TensorSpec("bias", (num_classes,))]
    num_hidden = spec["hidden_units"]
    return [
        TensorSpec("hidden.weight", (num_features, num_hidden)),
        TensorSpec("hidden.bias", (num_hidden,)),
        TensorSpec("output.weight", (num_hidden, num_classes)),
        TensorSpec("output.bias", (num_classes,)),
    ]


def _require_int_at_least(label: str, value: object, minimum: int) -> int:
    # bool is a subclass of int, so True would otherwise pass as 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{label} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{label} must be at least {minimum}, got {value}.")
    return int(value)


def _as_feature_matrix(spec: Mapping, features: np.ndarray) -> FloatArray:
    features = np.asarray(features)
    expected_shape = ("n", spec["num_features"])
    if features.ndim != 2 or features.shape[1] != spec["num_features"]:
        raise ValueError(f"Features have shape {features.shape}, expected {expected_shape}.")
    if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
        raise ValueError(f"Features have dtype {features.dtype}, expected a real numeric dtype.")
    features = features.astype(np.float64)
    if not np.all(np.isfinite(features)):
        raise ValueError("Features contain NaN or infinite values.")
    return features


def _dense_layer_names(spec: Mapping) -> list[tuple[str, str]]:
    if spec["kind"] == "softmax_regression":
        return [("weight", "bias")]
    return [("hidden.weight", "hidden.bias"), ("output.weight", "output.bias")]


def _forward(spec: Mapping, weights: Mapping[str, np.ndarray], features: FloatArray) -> tuple[FloatArray, list]:
    """Return float64 logits (n, C) and, per dense layer, its inputs and pre-activations."""
    activations = features
    cache = []
    layer_names = _dense_layer_names(spec)
    for index, (weight_name, bias_name) in enumerate(layer_names):
        weight = np.asarray(weights[weight_name], dtype=np.float64)
        bias = np.asarray(weights[bias_name], dtype=np.float64)
        pre_activations = activations @ weight + bias
        cache.append((activations, pre_activations))
        is_last_layer = index == len(layer_names) - 1
        activations = pre_activations if is_last_layer else np.maximum(pre_activations, 0.0)
    return activations, cache


def _log_softmax(logits: FloatArray) -> FloatArray:
    # Subtracting the row maximum keeps exp() from overflowing and leaves log-softmax unchanged.
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
