"""Server-side optimizers applied to the aggregated update (the pseudo-gradient).

Pure module: numpy only. FedAvgM (Hsu, Qi and Brown 2019, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual
Classification", Section 3) keeps a velocity v and moves the model by

    v <- beta * v + update,    w <- w + learning_rate * v

where `update` is the round's (possibly noised) average delta. With beta = 0
and learning_rate = 1 this is plain FedAvg. The step only post-processes a
released aggregate, so it costs no privacy.
"""

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]


def momentum_step(
    update: Mapping[str, FloatArray],
    velocity: Mapping[str, FloatArray] | None,
    *,
    momentum: float,
    learning_rate: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Return (model step, new velocity) as float32 tensors.

    Args:
        update: the round's average update, name -> array.
        velocity: the previous velocity with the same names and shapes, or None before the first round.
        momentum: beta in [0, 1).
        learning_rate: server learning rate, positive.

    Raises:
        ValueError: on invalid hyperparameters or mismatched tensors.
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}.")
    if velocity is not None and (set(velocity) != set(update) or any(np.shape(velocity[name]) != np.shape(update[name]) for name in update)):
        raise ValueError("The stored velocity does not match the model's tensors; reset the server optimizer state.")

    new_velocity = {}
    step = {}
    for name, values in update.items():
        previous = np.zeros(np.shape(values)) if velocity is None else np.asarray(velocity[name], dtype=np.float64)
        current = momentum * previous + np.asarray(values, dtype=np.float64)
        new_velocity[name] = current.astype(np.float32)
        step[name] = (learning_rate * current).astype(np.float32)
    return step, new_velocity
