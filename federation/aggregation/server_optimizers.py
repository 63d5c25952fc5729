"""Server-side optimizers applied to the aggregated update (the pseudo-gradient).

Pure module: numpy only. Each round the server averages the devices' deltas
into Delta_t and, instead of adding Delta_t to the model, adds the step that
one of these optimizers computes from it:

- "fedavgm": Hsu, Qi and Brown 2019, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification",
  Section 3. The velocity v_t = beta * v_{t-1} + Delta_t and the step is
  learning_rate * v_t. With beta = 0 and learning_rate = 1 this is plain FedAvg.
- "fedadagrad", "fedyogi", "fedadam": Reddi et al. 2021, "Adaptive Federated
  Optimization" (ICLR), Algorithm 2, written out in `server_step`.

Steps only post-process a released aggregate, so they cost no privacy.

The optimizer state is a flat dict of float32 arrays that the tensor wire
format (flo_client.wire) can store. Each name is "<optimizer>.<role>.<tensor>":
FedAvgM's velocity of tensor "w" is "fedavgm.velocity.w", and FedAdam's first
and second moments are "fedadam.m.w" and "fedadam.v.w" (likewise for fedyogi
and fedadagrad). The optimizer in the name lets a state left by another
optimizer be detected. The wire format limits names to 128 characters, so the
model's tensor names must have at most 111 characters.
"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np
import numpy.typing as npt

from federation.aggregation.kernels import all_finite
from federation.aggregation.validation import check_config_keys, require_finite_real

FloatArray = npt.NDArray[np.floating]

SERVER_OPTIMIZER_NAMES = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
# Roles of the state tensors, the middle part of each state name.
VELOCITY = "velocity"
FIRST_MOMENT = "m"
SECOND_MOMENT = "v"
_RESET_ADVICE = "Reset the server optimizer state."


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """Server optimizer and its hyperparameters.

    Each optimizer reads only its own fields: "fedavgm" reads learning_rate and
    momentum; the adaptive optimizers read learning_rate, beta1, beta2 and tau
    (and "fedadagrad" ignores beta2).

    Attributes:
        name: One of SERVER_OPTIMIZER_NAMES.
        learning_rate: Server learning rate eta, positive.
        momentum: FedAvgM's beta in [0, 1). The adaptive optimizers take their
            momentum from beta1, so for them it must stay 0.
        beta1: Decay of the first moment m, in [0, 1).
        beta2: Decay of the second moment v in FedAdam and FedYogi, in [0, 1).
        tau: Adaptivity tau, positive. It is added to sqrt(v) in every step
            and sets the initial v to tau^2, so a larger tau makes the
            optimizer less adaptive.
    """

    name: str = "fedavgm"
    learning_rate: float = 1.0
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in SERVER_OPTIMIZER_NAMES:
            raise ValueError(f"name must be one of {', '.join(SERVER_OPTIMIZER_NAMES)}, got {self.name!r}.")
        learning_rate = require_finite_real("learning_rate", self.learning_rate)
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}.")
        for field_name in ("momentum", "beta1", "beta2"):
            value = require_finite_real(field_name, getattr(self, field_name))
            if not 0 <= value < 1:
                raise ValueError(f"{field_name} must be in [0, 1), got {value}.")
            object.__setattr__(self, field_name, value)
        tau = require_finite_real("tau", self.tau)
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}.")
        if self.name != "fedavgm" and self.momentum != 0:
            raise ValueError(f"momentum applies only to fedavgm but is {self.momentum} for {self.name}. Set beta1 instead.")
        object.__setattr__(self, "learning_rate", learning_rate)
        object.__setattr__(self, "tau", tau)

    @classmethod
    def from_dict(cls, data: Mapping) -> "ServerOptimizerConfig":
        """Build a config from its JSON form; missing keys take their defaults.

        Raises:
            ValueError: on a non-mapping, an unknown key or an invalid value, naming it.
        """
        check_config_keys(data, label="Server optimizer config", allowed=[field.name for field in fields(cls)])
        return cls(**data)

    def to_dict(self) -> dict:
        """Return the JSON-safe form of the config, with every field."""
        return asdict(self)


def server_step(
    config: ServerOptimizerConfig,
    update: Mapping[str, FloatArray],
    state: Mapping[str, FloatArray] | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Compute the model step for this round's aggregated update, and the new optimizer state.

    The adaptive optimizers follow Reddi et al. 2021, Algorithm 2, with the
    pseudo-gradient Delta_t = `update` (the model moves by +step):

        m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t
        v_t = v_{t-1} + Delta_t^2                                           fedadagrad
        v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)   fedyogi
        v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2                     fedadam
        step = learning_rate * m_t / (sqrt(v_t) + tau)

    all per coordinate. Before the first round m_{-1} = 0 and v_{-1} = tau^2,
    the smallest value the paper allows (v_{-1} >= tau^2). As in the paper,
    there is no bias correction of m or v.

    NOTE: Flower 1.42.0 (flwr.server.strategy) starts v at 0 in all three,
    and its FedAdam also multiplies eta by sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)),
    Adam's bias correction. Its steps therefore differ from these, most in early rounds.

    "fedavgm" keeps the velocity v_t = momentum * v_{t-1} + Delta_t and steps
    by learning_rate * v_t. With momentum 0 it keeps no state.

    Args:
        config: Optimizer and hyperparameters.
        update: Aggregated update, tensor name -> array of any shape, finite.
        state: The state this function returned last round, or None (or an
            empty mapping) before the first round.

    Returns:
        (step, new_state): step has the names and shapes of `update` and is
        to be added to the weights. new_state maps "fedavgm.velocity.<name>",
        or "<optimizer>.m.<name>" and "<optimizer>.v.<name>", to arrays of the
        tensor's shape. Both are float32.

    Raises:
        ValueError: if the update is not finite, if the state's names, shapes
            or values do not fit the update and the optimizer (for example
            after a change of optimizer or of model), or if the step
            overflows float32.
    """
    # Plain FedAvg (no momentum, learning rate 1) steps by the update itself,
    # so a float32 update gives the same float32 step without a float64 copy.
    deltas = _read_update(update, keep_float32=config.name == "fedavgm" and config.momentum == 0 and config.learning_rate == 1.0)
    previous = _read_state(config, deltas, state)
    step_tensor = _step_momentum if config.name == "fedavgm" else _step_adaptive

    steps = {}
    new_state = {}
    # Overflow in the cast to float32 is checked below, so numpy need not warn about it.
    with np.errstate(over="ignore"):
        for name, delta in deltas.items():
            tensor_previous = None if previous is None else {role: by_name[name] for role, by_name in previous.items()}
            steps[name], tensor_state = step_tensor(config, delta, tensor_previous)
            for role, values in tensor_state.items():
                new_state[_state_name(config, role, name)] = values

    for name, step in steps.items():
        if not all_finite(step):
            raise ValueError(f"The server step of tensor {name!r} overflows float32. Lower learning_rate (now {config.learning_rate}).")
    for name, values in new_state.items():
        if not all_finite(values):
            raise ValueError(f"State tensor {name!r} overflows float32 because the update is too large.")
    return steps, new_state


def _read_update(update: Mapping[str, FloatArray], *, keep_float32: bool = False) -> dict[str, np.ndarray]:
    """Check that every tensor of the update is finite, and return them as float64 arrays, or with `keep_float32` float32 ones as they are."""
    deltas = {}
    for name, values in update.items():
        delta = np.asarray(values)
        if not (keep_float32 and delta.dtype == np.float32):
            delta = np.asarray(values, dtype=np.float64)
        if not all_finite(delta):
            raise ValueError(f"The aggregated update has non-finite values in tensor {name!r}.")
        deltas[name] = delta
    return deltas


def _state_roles(config: ServerOptimizerConfig) -> tuple[str, ...]:
    if config.name != "fedavgm":
        return (FIRST_MOMENT, SECOND_MOMENT)
    return (VELOCITY,) if config.momentum > 0 else ()


def _state_name(config: ServerOptimizerConfig, role: str, tensor_name: str) -> str:
    return f"{config.name}.{role}.{tensor_name}"


def _read_state(
    config: ServerOptimizerConfig,
    deltas: Mapping[str, np.ndarray],
    state: Mapping[str, FloatArray] | None,
) -> dict[str, dict[str, np.ndarray]] | None:
    """Check the stored state against the update and return it as role -> tensor name -> float64 array.

    None means "before the first round".
    """
    if not state:
        return None
    expected = {_state_name(config, role, name) for role in _state_roles(config) for name in deltas}
    if set(state) != expected:
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        raise ValueError(
            f"The server optimizer state does not fit {config.name} and the model's tensors. It lacks {missing} and has "
            f"unexpected {unexpected}. Reset the server optimizer state after changing the optimizer or the model."
        )

    previous: dict[str, dict[str, np.ndarray]] = {}
    for role in _state_roles(config):
        previous[role] = {}
        for name, delta in deltas.items():
            state_name = _state_name(config, role, name)
            values = np.asarray(state[state_name], dtype=np.float64)
            if values.shape != delta.shape:
                raise ValueError(f"State tensor {state_name!r} has shape {values.shape}, but the update has {delta.shape}. {_RESET_ADVICE}")
            if not all_finite(values):
                raise ValueError(f"State tensor {state_name!r} has non-finite values. {_RESET_ADVICE}")
            if role == SECOND_MOMENT and np.any(values < 0):
                raise ValueError(f"State tensor {state_name!r} has negative second moments. {_RESET_ADVICE}")
            previous[role][name] = values
    return previous


def _step_momentum(
    config: ServerOptimizerConfig,
    delta: np.ndarray,
    previous: Mapping[str, np.ndarray] | None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Compute FedAvgM's float32 step for one tensor, and its velocity, which is kept only when momentum > 0."""
    velocity = delta
    if previous is not None:
        velocity = config.momentum * previous[VELOCITY] + delta
    new_state = {VELOCITY: velocity.astype(np.float32)} if config.momentum > 0 else {}
    if config.learning_rate == 1.0 and velocity.ndim:
        # The product would equal the velocity, so the velocity is only cast to float32.
        return velocity.astype(np.float32), new_state
    return (config.learning_rate * velocity).astype(np.float32), new_state


def _step_adaptive(
    config: ServerOptimizerConfig,
    delta: np.ndarray,
    previous: Mapping[str, np.ndarray] | None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Compute the adaptive optimizers' float32 step for one tensor, and its first and second moments."""
    if previous is None:
        first_moment = np.zeros_like(delta)
        second_moment = np.full_like(delta, config.tau**2)
    else:
        first_moment = previous[FIRST_MOMENT]
        second_moment = previous[SECOND_MOMENT]

    squared = delta * delta
    first_moment = config.beta1 * first_moment + (1 - config.beta1) * delta
    if config.name == "fedadagrad":
        second_moment = second_moment + squared
    elif config.name == "fedyogi":
        # Yogi moves v towards Delta^2 by (1 - beta2) * Delta^2. It shrinks
        # only while it exceeds Delta^2, and then by less than Delta^2, so it stays positive.
        second_moment = second_moment - (1 - config.beta2) * squared * np.sign(second_moment - squared)
    else:
        second_moment = config.beta2 * second_moment + (1 - config.beta2) * squared

    step = (config.learning_rate * first_moment / (np.sqrt(second_moment) + config.tau)).astype(np.float32)
    return step, {FIRST_MOMENT: first_moment.astype(np.float32), SECOND_MOMENT: second_moment.astype(np.float32)}
