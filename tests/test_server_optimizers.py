"""FedAvgM momentum on the server, against hand-computed steps."""

import numpy as np
import pytest

from federation.aggregation.server_optimizers import momentum_step


def test_first_step_without_velocity_is_the_update_times_learning_rate():
    step, velocity = momentum_step({"w": np.array([1.0, -2.0])}, None, momentum=0.9, learning_rate=0.5)

    np.testing.assert_allclose(step["w"], [0.5, -1.0])
    np.testing.assert_allclose(velocity["w"], [1.0, -2.0])


def test_second_step_adds_decayed_velocity():
    # v = 0.9 * [1, -2] + [1, 1] = [1.9, -0.8]; step = 0.5 * v
    step, velocity = momentum_step({"w": np.array([1.0, 1.0])}, {"w": np.array([1.0, -2.0])}, momentum=0.9, learning_rate=0.5)

    np.testing.assert_allclose(velocity["w"], [1.9, -0.8], rtol=1e-6)
    np.testing.assert_allclose(step["w"], [0.95, -0.4], rtol=1e-6)


def test_zero_momentum_and_unit_rate_is_plain_fedavg():
    update = {"w": np.array([0.25, 3.0], dtype=np.float32)}

    step, _ = momentum_step(update, {"w": np.array([5.0, 5.0])}, momentum=0.0, learning_rate=1.0)

    np.testing.assert_array_equal(step["w"], update["w"])


@pytest.mark.parametrize(("momentum", "learning_rate"), [(1.0, 1.0), (-0.1, 1.0), (0.5, 0.0)])
def test_invalid_hyperparameters_are_rejected(momentum, learning_rate):
    with pytest.raises(ValueError):
        momentum_step({"w": np.zeros(1)}, None, momentum=momentum, learning_rate=learning_rate)


def test_mismatched_velocity_is_rejected():
    with pytest.raises(ValueError, match="velocity"):
        momentum_step({"w": np.zeros(2)}, {"w": np.zeros(3)}, momentum=0.5, learning_rate=1.0)
