"""Real datasets bundled with scikit-learn, and how to split them into devices.

Both datasets ship inside scikit-learn, so loading them needs no download.
Preprocessing uses only fixed constants, never statistics computed from the
examples, because in a federation no device may send such statistics.
"""

import math
import numbers

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]

DATASET_NAMES = ("digits", "breast_cancer")

# Pixels of the digits images are counts of set pixels in 4x4 blocks, so every value is in [0, 16].
_DIGITS_PIXEL_MAX = 16.0

# Maximum of each of the 30 breast cancer features, in scikit-learn's
# feature order, from the "Summary Statistics" table of the dataset description
# (load_breast_cancer().DESCR, scikit-learn 1.9). Every feature is at least 0.
# NOTE: the table summarises all 569 cases, test cases included, so the scale
# leaks 30 numbers about the test split. A deployment would take the ranges from
# clinical knowledge instead. The leak does not depend on any device's data at run time.
_BREAST_CANCER_FEATURE_MAX = (
    28.11, 39.28, 188.5, 2501.0, 0.163, 0.345, 0.427, 0.201, 0.304, 0.097,
    2.873, 4.885, 21.98, 542.2, 0.031, 0.135, 0.396, 0.053, 0.079, 0.03,
    36.04, 49.54, 251.2, 4254.0, 0.223, 1.058, 1.252, 0.291, 0.664, 0.208,
)  # fmt: skip


def load_dataset(name: str) -> tuple[FloatArray, IntArray]:
    """Load a dataset bundled with scikit-learn and scale its features with fixed constants.

    "digits": 1,797 images of 8x8 pixels, 10 classes. Pixels are divided by 16,
    their fixed maximum, so features are in [0, 1].
    "breast_cancer": 569 cases, 30 features, 2 classes (0 malignant, 1 benign).
    Each feature is divided by its maximum from the dataset description.
    Those maxima are rounded, so features are in [0, 1.005].

    Returns:
        Features of shape (n, F), float32, and labels of shape (n,), int64.

    Raises:
        ValueError: if the name is not one of DATASET_NAMES.
    """
    if name == "digits":
        bunch = load_digits()
        features = bunch.data / _DIGITS_PIXEL_MAX
    elif name == "breast_cancer":
        bunch = load_breast_cancer()
        features = bunch.data / np.asarray(_BREAST_CANCER_FEATURE_MAX)
    else:
        raise ValueError(f"Unknown dataset {name!r}. Valid names are {', '.join(DATASET_NAMES)}.")
    return features.astype(np.float32), bunch.target.astype(np.int64)


def split_train_test(
    features: np.ndarray, labels: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split examples into a training and a test set, stratified by label.

    Args:
        features: Shape (n, F).
        labels: Shape (n,).
        test_fraction: Fraction of examples in the test set, in (0, 1).
        seed: Seed of the shuffle. The same seed gives the same split.

    Returns:
        (train_features, train_labels, test_features, test_labels).

    Raises:
        ValueError: if test_fraction is outside (0, 1) or the shapes do not match.
            scikit-learn also raises ValueError when a class has too few examples to stratify.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    features = np.asarray(features)
    labels = np.asarray(labels)
    if labels.ndim != 1 or features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"Features have shape {features.shape} and labels {labels.shape}, expected (n, F) and (n,).")
    train_features, test_features, train_labels, test_labels = train_test_split(
        features, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return train_features, train_labels, test_features, test_labels


def dirichlet_partition(
    labels: np.ndarray,
    *,
    num_devices: int,
    alpha: float,
    rng: np.random.Generator,
    min_examples: int = 1,
) -> list[IntArray]:
    """Split example indices into non-IID devices with Dirichlet label proportions.

    For each class, a vector p ~ Dirichlet(alpha, ..., alpha) over the devices
    decides which share of that class's examples each device gets. Small alpha
    (e.g. 0.1) gives devices few classes, and large alpha (e.g. 100) approaches an IID split.
    Devices left with fewer than `min_examples` then receive examples, one at
    a time, from the device that has the most. This keeps the result
    deterministic for a given `rng` state, but it makes the split slightly
    more uniform than the Dirichlet draw when alpha is small.

    Args:
        labels: Shape (n,), integer labels.
        num_devices: Number of devices, at least 1.
        alpha: Dirichlet concentration, positive and finite.
        rng: Source of the proportions and of the order within each class.
        min_examples: Minimum number of examples per device, at least 0 and
            at most n / num_devices.

    Returns:
        num_devices sorted int64 index arrays that together contain every
        index in range(n) exactly once.

    Raises:
        ValueError: on an invalid argument, naming it and its value.
    """
    labels = _check_partition_arguments(labels, num_devices, alpha, min_examples)

    device_indices: list[list[int]] = [[] for _ in range(num_devices)]
    for label in np.unique(labels):
        class_indices = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_devices, alpha))
        split_points = np.floor(np.cumsum(proportions)[:-1] * class_indices.size).astype(np.int64)
        for device, chunk in enumerate(np.split(class_indices, split_points)):
            device_indices[device].extend(chunk.tolist())

    _rebalance_inplace(device_indices, min_examples)
    return [np.sort(np.asarray(indices, dtype=np.int64)) for indices in device_indices]


def _check_partition_arguments(labels: np.ndarray, num_devices: object, alpha: object, min_examples: object) -> IntArray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}.")
    if isinstance(num_devices, bool) or not isinstance(num_devices, numbers.Integral) or num_devices < 1:
        raise ValueError(f"num_devices must be an integer of at least 1, got {num_devices!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (float(alpha) > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}.")
    if isinstance(min_examples, bool) or not isinstance(min_examples, numbers.Integral) or min_examples < 0:
        raise ValueError(f"min_examples must be an integer of at least 0, got {min_examples!r}.")
    if int(num_devices) * int(min_examples) > labels.size:
        raise ValueError(
            f"{num_devices} devices with at least {min_examples} examples each need "
            f"{num_devices * min_examples} examples, but there are {labels.size}."
        )
    return labels


def _rebalance_inplace(device_indices: list[list[int]], min_examples: int) -> None:
    """Move the last index of the largest device to the smallest until every device has min_examples.

    Ties go to the lowest device number, so the moves depend only on the lists.
    Each move raises the smallest device by one without taking the largest
    below min_examples, so at most num_devices * min_examples moves happen.
    """
    while True:
        sizes = [len(indices) for indices in device_indices]
        smallest = int(np.argmin(sizes))
        if sizes[smallest] >= min_examples:
            return
        largest = int(np.argmax(sizes))
        device_indices[smallest].append(device_indices[largest].pop())
