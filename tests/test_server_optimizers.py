"""Server optimizers (FedAvgM, FedAdagrad, FedYogi, FedAdam) against hand-computed steps."""

import json

import numpy as np
import pytest

from federation.aggregation.server_optimizers import SERVER_OPTIMIZER_NAMES, ServerOptimizerConfig, server_step
from flo_client import wire

# server_step: two hand-computed rounds of each optimizer on a tensor "w" of two coordinates.


def run_two_rounds(config, first_update, second_update):
    first_step, first_state = server_step(config, {"w": np.array(first_update)}, None)
    second_step, second_state = server_step(config, {"w": np.array(second_update)}, first_state)
    return first_step["w"], first_state, second_step["w"], second_state


def test_fedavgm_two_rounds_by_hand():
    config = ServerOptimizerConfig(name="fedavgm", learning_rate=0.5, momentum=0.9)

    first_step, first_state, second_step, second_state = run_two_rounds(config, [1.0, -2.0], [1.0, 1.0])

    # Round 1: v = [1, -2]; step = 0.5 * v = [0.5, -1].
    np.testing.assert_allclose(first_step, [0.5, -1.0], rtol=1e-6)
    np.testing.assert_allclose(first_state["fedavgm.velocity.w"], [1.0, -2.0], rtol=1e-6)
    # Round 2: v = 0.9 * [1, -2] + [1, 1] = [1.9, -0.8]; step = 0.5 * v = [0.95, -0.4].
    np.testing.assert_allclose(second_state["fedavgm.velocity.w"], [1.9, -0.8], rtol=1e-6)
    np.testing.assert_allclose(second_step, [0.95, -0.4], rtol=1e-6)


def test_fedadagrad_two_rounds_by_hand():
    config = ServerOptimizerConfig(name="fedadagrad", learning_rate=1.0, beta1=0.5, tau=0.3)

    first_step, first_state, second_step, second_state = run_two_rounds(config, [0.4, -0.4], [1.2, 0.0])

    # Round 1: m = 0.5 * [0.4, -0.4] = [0.2, -0.2]; v = 0.3^2 + 0.4^2 = 0.25 in both coordinates;
    # step = m / (sqrt(0.25) + 0.3) = m / 0.8 = [0.25, -0.25].
    np.testing.assert_allclose(first_state["fedadagrad.m.w"], [0.2, -0.2], rtol=1e-6)
    np.testing.assert_allclose(first_state["fedadagrad.v.w"], [0.25, 0.25], rtol=1e-6)
    np.testing.assert_allclose(first_step, [0.25, -0.25], rtol=1e-6)
    # Round 2: m = 0.5 * [0.2, -0.2] + 0.5 * [1.2, 0] = [0.7, -0.1]; v = [0.25 + 1.44, 0.25 + 0] = [1.69, 0.25];
    # step = [0.7 / (1.3 + 0.3), -0.1 / (0.5 + 0.3)] = [0.4375, -0.125].
    np.testing.assert_allclose(second_state["fedadagrad.m.w"], [0.7, -0.1], rtol=1e-6)
    np.testing.assert_allclose(second_state["fedadagrad.v.w"], [1.69, 0.25], rtol=1e-6)
    np.testing.assert_allclose(second_step, [0.4375, -0.125], rtol=1e-6)


def test_fedyogi_two_rounds_by_hand():
    config = ServerOptimizerConfig(name="fedyogi", learning_rate=1.0, beta1=0.5, beta2=0.5, tau=1.0)

    first_step, first_state, second_step, second_state = run_two_rounds(config, [4.0, 1.0], [12.0, 0.5])

    # Round 1 from v = tau^2 = 1: Delta^2 = [16, 1], sign(1 - Delta^2) = [-1, 0],
    # v = 1 - 0.5 * [16, 1] * [-1, 0] = [9, 1]; m = 0.5 * [4, 1] = [2, 0.5];
    # step = [2 / (3 + 1), 0.5 / (1 + 1)] = [0.5, 0.25].
    np.testing.assert_allclose(first_state["fedyogi.v.w"], [9.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(first_state["fedyogi.m.w"], [2.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(first_step, [0.5, 0.25], rtol=1e-6)
    # Round 2: Delta^2 = [144, 0.25], sign(v - Delta^2) = [-1, +1], so the first coordinate grows and the
    # second shrinks: v = [9 + 72, 1 - 0.125] = [81, 0.875]; m = 0.5 * [2, 0.5] + 0.5 * [12, 0.5] = [7, 0.5];
    # step = [7 / (9 + 1), 0.5 / (sqrt(0.875) + 1)] = [0.7, 0.5 / 1.9354143] = [0.7, 0.2583426].
    np.testing.assert_allclose(second_state["fedyogi.v.w"], [81.0, 0.875], rtol=1e-6)
    np.testing.assert_allclose(second_state["fedyogi.m.w"], [7.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(second_step, [0.7, 0.2583426], rtol=1e-6)


def test_fedadam_two_rounds_by_hand():
    config = ServerOptimizerConfig(name="fedadam", learning_rate=0.5, beta1=0.5, beta2=0.5, tau=1.0)

    first_step, first_state, second_step, second_state = run_two_rounds(config, [1.0, -1.0], [7.0, 1.0])

    # Round 1 from v = tau^2 = 1: v = 0.5 * 1 + 0.5 * 1 = [1, 1]; m = 0.5 * [1, -1] = [0.5, -0.5];
    # step = 0.5 * m / (1 + 1) = [0.125, -0.125]. No bias correction, so round 1 is not rescaled.
    np.testing.assert_allclose(first_state["fedadam.v.w"], [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(first_state["fedadam.m.w"], [0.5, -0.5], rtol=1e-6)
    np.testing.assert_allclose(first_step, [0.125, -0.125], rtol=1e-6)
    # Round 2: v = 0.5 * [1, 1] + 0.5 * [49, 1] = [25, 1]; m = 0.5 * [0.5, -0.5] + 0.5 * [7, 1] = [3.75, 0.25];
    # step = 0.5 * [3.75 / (5 + 1), 0.25 / (1 + 1)] = [0.3125, 0.0625].
    np.testing.assert_allclose(second_state["fedadam.v.w"], [25.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(second_state["fedadam.m.w"], [3.75, 0.25], rtol=1e-6)
    np.testing.assert_allclose(second_step, [0.3125, 0.0625], rtol=1e-6)


def test_zero_momentum_returns_update_itself():
    update = {"weight": np.array([[0.25, -3.0]], dtype=np.float32), "bias": np.float32(1.5)}

    step, state = server_step(ServerOptimizerConfig(), update, None)

    assert state == {}
    assert set(step) == {"weight", "bias"}
    np.testing.assert_array_equal(step["weight"], update["weight"])
    np.testing.assert_array_equal(step["bias"], update["bias"])


@pytest.mark.parametrize("name", SERVER_OPTIMIZER_NAMES)
def test_server_step_keeps_inputs(name):
    config = ServerOptimizerConfig(name=name, momentum=0.5 if name == "fedavgm" else 0.0)
    update = {"weight": np.array([[1.0, -2.0]]), "bias": np.array(0.5)}
    update_before = {key: value.copy() for key, value in update.items()}
    _, state = server_step(config, update, None)
    state_before = {key: value.copy() for key, value in state.items()}

    step, new_state = server_step(config, update, state)

    for key, value in update.items():
        np.testing.assert_array_equal(value, update_before[key])
        assert step[key].dtype == np.float32
        assert step[key].shape == value.shape
    for key, value in state.items():
        np.testing.assert_array_equal(value, state_before[key])
        assert new_state[key].dtype == np.float32


@pytest.mark.parametrize(
    ("config", "expected_names"),
    [
        (ServerOptimizerConfig(name="fedavgm", momentum=0.9), {"fedavgm.velocity.hidden.weight", "fedavgm.velocity.bias"}),
        (ServerOptimizerConfig(name="fedadam"), {"fedadam.m.hidden.weight", "fedadam.v.hidden.weight", "fedadam.m.bias", "fedadam.v.bias"}),
        (ServerOptimizerConfig(name="fedyogi"), {"fedyogi.m.hidden.weight", "fedyogi.v.hidden.weight", "fedyogi.m.bias", "fedyogi.v.bias"}),
        (ServerOptimizerConfig(name="fedadagrad"), {"fedadagrad.m.hidden.weight", "fedadagrad.v.hidden.weight", "fedadagrad.m.bias", "fedadagrad.v.bias"}),
    ],
    ids=["fedavgm", "fedadam", "fedyogi", "fedadagrad"],
)
def test_state_survives_wire_format(config, expected_names):
    update = {"hidden.weight": np.ones((2, 3), dtype=np.float32), "bias": np.ones(3, dtype=np.float32)}
    _, state = server_step(config, update, None)

    _, stored = wire.decode_tensors(wire.encode_tensors(state))
    step_from_stored, _ = server_step(config, update, stored)
    step_from_memory, _ = server_step(config, update, state)

    assert set(state) == expected_names
    for name in update:
        np.testing.assert_array_equal(step_from_stored[name], step_from_memory[name])


def test_empty_state_counts_as_first_round():
    config = ServerOptimizerConfig(name="fedadam")
    update = {"w": np.array([0.1, -0.2])}

    from_empty, _ = server_step(config, update, {})
    from_none, _ = server_step(config, update, None)

    np.testing.assert_array_equal(from_empty["w"], from_none["w"])


def test_fedadam_default_first_step():
    # Defaults: eta 1, beta1 0.9, beta2 0.99, tau 1e-3, so v starts at 1e-6.
    # Delta = 0.01: m = 0.1 * 0.01 = 0.001; v = 0.99e-6 + 0.01 * 1e-4 = 1.99e-6;
    # step = 0.001 / (sqrt(1.99e-6) + 1e-3) = 0.001 / 0.0024107 = 0.41481.
    step, _ = server_step(ServerOptimizerConfig(name="fedadam"), {"w": np.array([0.01])}, None)

    np.testing.assert_allclose(step["w"], [0.001 / (np.sqrt(1.99e-6) + 1e-3)], rtol=1e-6)


# server_step: state that does not fit


def test_state_of_another_optimizer_is_rejected():
    update = {"w": np.array([1.0, 2.0])}
    _, adam_state = server_step(ServerOptimizerConfig(name="fedadam"), update, None)

    with pytest.raises(ValueError, match="Reset the server optimizer state") as raised:
        server_step(ServerOptimizerConfig(name="fedyogi"), update, adam_state)

    assert "fedyogi.m.w" in str(raised.value)


def test_velocity_with_zero_momentum_is_rejected():
    update = {"w": np.array([1.0, 2.0])}
    _, velocity_state = server_step(ServerOptimizerConfig(momentum=0.5), update, None)

    with pytest.raises(ValueError, match="Reset the server optimizer state"):
        server_step(ServerOptimizerConfig(momentum=0.0), update, velocity_state)


def test_state_of_another_model_is_rejected():
    config = ServerOptimizerConfig(name="fedadagrad")
    _, state = server_step(config, {"w": np.zeros(2)}, None)

    with pytest.raises(ValueError, match=r"lacks \['fedadagrad.m.bias', 'fedadagrad.v.bias'\]"):
        server_step(config, {"w": np.zeros(2), "bias": np.zeros(1)}, state)


def test_state_with_wrong_shape_is_rejected():
    config = ServerOptimizerConfig(name="fedadam")
    _, state = server_step(config, {"w": np.zeros(2)}, None)

    with pytest.raises(ValueError, match=r"'fedadam.m.w' has shape \(2,\), but the update has \(3,\)"):
        server_step(config, {"w": np.zeros(3)}, state)


@pytest.mark.parametrize(("role", "value"), [("m", np.nan), ("v", np.inf), ("v", -1.0)])
def test_state_with_invalid_values_is_rejected(role, value):
    config = ServerOptimizerConfig(name="fedyogi")
    state = {"fedyogi.m.w": np.zeros(2, dtype=np.float32), "fedyogi.v.w": np.ones(2, dtype=np.float32)}
    state[f"fedyogi.{role}.w"][1] = value

    with pytest.raises(ValueError, match="Reset the server optimizer state"):
        server_step(config, {"w": np.zeros(2)}, state)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", SERVER_OPTIMIZER_NAMES)
def test_non_finite_update_is_rejected(name, dtype):
    with pytest.raises(ValueError, match="non-finite values in tensor 'w'"):
        server_step(ServerOptimizerConfig(name=name), {"w": np.array([0.0, np.nan], dtype=dtype)}, None)


def test_plain_fedavg_step_keeps_scalars():
    step, _ = server_step(ServerOptimizerConfig(), {"bias": np.float32(1.5)}, None)

    assert type(step["bias"]) is np.float32


def test_zero_momentum_step_multiplies_in_float64():
    # 0.1 * float32(9 / 7) rounded in float64, then to float32. A float32
    # product, float32(0.1) * float32(9 / 7), is one unit in the last place higher.
    update = np.array([9 / 7], dtype=np.float32)

    step, _ = server_step(ServerOptimizerConfig(learning_rate=0.1), {"w": update}, None)

    np.testing.assert_array_equal(step["w"], (0.1 * update.astype(np.float64)).astype(np.float32))


def test_plain_fedavg_step_copies_update():
    update = {"w": np.array([0.25, -3.0], dtype=np.float32)}

    step, _ = server_step(ServerOptimizerConfig(), update, None)

    assert not np.shares_memory(step["w"], update["w"])


def test_plain_fedavg_step_rejects_float32_overflow():
    with pytest.raises(ValueError, match="overflows float32"):
        server_step(ServerOptimizerConfig(), {"w": np.array([1e39])}, None)


def test_step_overflowing_float32_is_rejected():
    config = ServerOptimizerConfig(learning_rate=1e30)

    with pytest.raises(ValueError, match="overflows float32"):
        server_step(config, {"w": np.array([1e10])}, None)


# ServerOptimizerConfig


def test_config_round_trips_through_json():
    config = ServerOptimizerConfig(name="fedyogi", learning_rate=0.01, beta1=0.8, beta2=0.999, tau=1e-4)

    restored = ServerOptimizerConfig.from_dict(json.loads(json.dumps(config.to_dict())))

    assert restored == config


def test_config_from_dict_fills_defaults():
    config = ServerOptimizerConfig.from_dict({"name": "fedadam", "learning_rate": 1})

    assert config == ServerOptimizerConfig(name="fedadam", learning_rate=1.0)
    assert type(config.learning_rate) is float


def test_config_to_dict_lists_every_field():
    assert ServerOptimizerConfig().to_dict() == {
        "name": "fedavgm",
        "learning_rate": 1.0,
        "momentum": 0.0,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
    }


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "fedsgd", "name must be one of fedavgm, fedadam, fedyogi, fedadagrad, got 'fedsgd'"),
        ("name", None, "name must be one of"),
        ("learning_rate", 0.0, "learning_rate must be positive, got 0.0"),
        ("learning_rate", float("nan"), "learning_rate must be finite, got nan"),
        ("learning_rate", "0.1", "learning_rate must be a real number, got '0.1'"),
        ("momentum", 1.0, r"momentum must be in \[0, 1\), got 1.0"),
        ("momentum", -0.1, r"momentum must be in \[0, 1\), got -0.1"),
        ("momentum", True, "momentum must be a real number, got True"),
        ("beta1", 1.0, r"beta1 must be in \[0, 1\), got 1.0"),
        ("beta2", -0.5, r"beta2 must be in \[0, 1\), got -0.5"),
        ("beta2", float("inf"), "beta2 must be finite, got inf"),
        ("tau", 0.0, "tau must be positive, got 0.0"),
        ("tau", -1e-3, "tau must be positive, got -0.001"),
    ],
)
def test_config_rejects_invalid_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ServerOptimizerConfig(**{field: value})


def test_config_rejects_adaptive_momentum():
    with pytest.raises(ValueError, match="momentum applies only to fedavgm but is 0.9 for fedadam. Set beta1 instead"):
        ServerOptimizerConfig(name="fedadam", momentum=0.9)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "fedadam", "epsilon": 1e-8}, r"unknown keys \['epsilon'\]"),
        ({"tau": -1.0}, "tau must be positive"),
        ([("name", "fedadam")], "must be a mapping, got list"),
    ],
)
def test_config_from_dict_rejects_invalid_data(data, message):
    with pytest.raises(ValueError, match=message):
        ServerOptimizerConfig.from_dict(data)
