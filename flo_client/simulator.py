"""Fleet simulator: many devices training on a real dataset against a live server.

Each simulated device has a non-IID shard of the training split, enrols
with its own token and talks to the server only over HTTP, as a deployed
device would: poll for a task, download the round's weights, train locally,
submit the signed delta. A held-out stratified test split never reaches any
device; the simulator itself evaluates every new global model on it.

To keep the request rate of a large simulated fleet bounded, the simulator
drives the devices round by round: one observer polls the task, and when a
new round opens every device polls once, in a pool of worker threads, and
trains if it was selected. A deployed fleet would poll on its own timers
instead; the server cannot tell the difference.

Devices listed in `FleetConfig.attacker_indices` run `FleetConfig.attack`
(flo_client.attacks). Colluding attackers need each other's honest updates
of the same round, so a round has three phases: every device polls and
trains, then the selected attackers craft their updates from their honest
ones, then every trained device submits.
"""

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np

from flo_client.attacks import AttackConfig, craft_update, flip_labels, little_is_enough_z
from flo_client.datasets import dirichlet_partition, load_dataset, split_train_test
from flo_client.device import ApiError, DeviceClient
from flo_client.models import Weights, evaluate_accuracy
from flo_client.training import TrainingPlan, compute_update, train_locally

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetConfig:
    dataset: str = "digits"
    num_devices: int = 20
    alpha: float = 0.5
    seed: int = 0
    test_fraction: float = 0.2
    # Seconds between task polls of the observer while nothing changes.
    poll_seconds: float = 0.1
    # Devices that talk to the server at the same time.
    max_parallel_devices: int = 32
    # The whole run stops after this many seconds even if the federation does not finish.
    max_wall_seconds: float = 1800.0
    # None: 10, or fewer when the training split cannot give every device 10.
    min_examples_per_device: int | None = None
    # Attack that the devices at attacker_indices run, or None for an honest fleet.
    attack: AttackConfig | None = None
    # Indices in [0, num_devices) of the attacking devices, each at most once (run_fleet checks).
    attacker_indices: tuple[int, ...] = ()


@dataclass
class Rejection:
    device: str
    round_number: int | None
    code: str
    detail: str


@dataclass
class FleetResult:
    node_ids: dict[str, str] = field(default_factory=dict)
    examples_per_device: dict[str, int] = field(default_factory=dict)
    accuracy_by_version: dict[int, float] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""
    # Node ids of the attacking devices, in the order of their indices.
    attacker_ids: list[str] = field(default_factory=list)


@dataclass
class _Device:
    name: str
    client: DeviceClient
    features: np.ndarray
    labels: np.ndarray
    rng: np.random.Generator
    is_attacker: bool = False


@dataclass
class _TrainedUpdate:
    """A device's update between training and submission; attackers replace `delta` with the crafted one."""

    device: _Device
    round_number: int
    model_version: int
    delta: Weights


def prepare_data(config: FleetConfig) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """Split the dataset into device shards and the held-out test split."""
    features, labels = load_dataset(config.dataset)
    train_x, train_y, test_x, test_y = split_train_test(features, labels, test_fraction=config.test_fraction, seed=config.seed)
    min_examples = config.min_examples_per_device
    if min_examples is None:
        min_examples = min(10, train_y.size // config.num_devices)
    shards = dirichlet_partition(train_y, num_devices=config.num_devices, alpha=config.alpha, rng=np.random.default_rng(config.seed), min_examples=min_examples)
    return [(train_x[indices], train_y[indices]) for indices in shards], (test_x, test_y)


def run_fleet(
    base_url: str,
    tokens: list[str],
    config: FleetConfig,
    *,
    on_enrolled: Callable[[], None] | None = None,
    on_model_version: Callable[[int, float], None] | None = None,
) -> FleetResult:
    """Enrol one device per token, run rounds until the federation is done, and evaluate every model version.

    Args:
        base_url: e.g. "http://127.0.0.1:8000".
        tokens: one enrolment token per device (len(tokens) == config.num_devices).
        on_enrolled: called once every device has enrolled, before any device polls;
            the demo starts the federation here.
        on_model_version: called with (version, test accuracy) for each new global model.

    A device whose request the server rejects with a 4xx status, for example
    after quarantining its node, is recorded in `FleetResult.rejections` and
    skipped for that round.

    Raises:
        ValueError: if the token count differs from config.num_devices, or if
            config.attack and config.attacker_indices do not fit together: an
            index out of range or repeated, an attack without attackers or
            attackers without an attack, or little_is_enough with a majority of attackers.
    """
    if len(tokens) != config.num_devices:
        raise ValueError(f"Got {len(tokens)} enrolment tokens for {config.num_devices} devices; pass one token per device.")
    _check_attackers(config)
    shards, test_split = prepare_data(config)
    result = FleetResult()
    deadline = time.monotonic() + config.max_wall_seconds
    workers = min(config.num_devices, config.max_parallel_devices)

    with httpx.Client(timeout=120.0, limits=httpx.Limits(max_connections=workers + 4)) as http, ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = [(index, token, shard) for index, (token, shard) in enumerate(zip(tokens, shards, strict=True))]
        devices = list(pool.map(lambda job: _enrol_device(base_url, http, config, *job), jobs))
        for device in devices:
            result.node_ids[device.name] = device.client.credentials.node_id
            result.examples_per_device[device.name] = int(device.labels.size)
        result.attacker_ids = [devices[index].client.credentials.node_id for index in sorted(config.attacker_indices)]
        logger.info("fleet enrolled devices=%d attackers=%d", len(devices), len(result.attacker_ids))
        if on_enrolled:
            on_enrolled()
        _drive_rounds(devices, pool, config, deadline, result, test_split, on_model_version)
    return result


def craft_attacker_updates(
    attack: AttackConfig,
    honest_updates: Mapping[str, Weights],
    *,
    num_devices: int,
    num_attackers: int,
    rngs: Mapping[str, np.random.Generator],
) -> dict[str, Weights]:
    """Craft the update of every attacker selected in a round from the attackers' honest updates.

    The attackers collude. For "little_is_enough", each one's colluding updates
    are the honest updates of all attackers selected this round, in the order
    of `honest_updates`.

    Args:
        attack: The attack every attacker runs.
        honest_updates: Device name -> honestly trained update, for the attackers selected this round.
        num_devices: Number n of devices in the fleet.
        num_attackers: Number f of attackers in the fleet.
        rngs: Device name -> the device's random generator, for "gaussian_noise".

    Returns:
        Device name -> crafted float32 update, with the keys of `honest_updates`.

    Raises:
        ValueError: as `craft_update` does.
    """
    colluding_updates = list(honest_updates.values())
    return {
        name: craft_update(
            attack,
            update,
            colluding_updates=colluding_updates,
            num_devices=num_devices,
            num_attackers=num_attackers,
            rng=rngs[name],
        )
        for name, update in honest_updates.items()
    }


def _check_attackers(config: FleetConfig) -> None:
    indices = tuple(config.attacker_indices)
    if config.attack is None:
        if indices:
            raise ValueError(f"attacker_indices is {indices} but attack is None. Set attack or leave attacker_indices empty.")
        return
    if not isinstance(config.attack, AttackConfig):
        raise ValueError(f"attack must be an AttackConfig or None, got {type(config.attack).__name__}.")
    if not indices:
        raise ValueError(f"attack is {config.attack.name} but attacker_indices is empty. List the indices of the attacking devices.")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < config.num_devices:
            raise ValueError(f"attacker_indices contains {index!r}, but device indices are integers from 0 to {config.num_devices - 1}.")
    repeated = sorted({index for index in indices if indices.count(index) > 1})
    if repeated:
        raise ValueError(f"attacker_indices repeats {repeated}. List each attacking device once.")
    if config.attack.name == "little_is_enough":
        # Fails now, not in the first round, when the attackers form a majority.
        little_is_enough_z(num_devices=config.num_devices, num_attackers=len(indices))


def _enrol_device(base_url: str, http: httpx.Client, config: FleetConfig, index: int, token: str, shard) -> _Device:
    name = f"device-{index:04d}" if config.num_devices > 1000 else f"device-{index:03d}"
    client = DeviceClient.enrol(base_url, token=token, display_name=name, http=http)
    features, labels = shard
    is_attacker = index in config.attacker_indices
    return _Device(name, client, features, labels, np.random.default_rng([config.seed, index]), is_attacker)


def _drive_rounds(devices, pool, config: FleetConfig, deadline: float, result: FleetResult, test_split, on_model_version) -> None:
    # The observer polls the task and evaluates new models. Honest devices come
    # first. When the server rejects the observer's node (401 or 403, after
    # quarantining or revoking it, say), the next device takes over. Other
    # errors are not the node's fault, so they propagate as before.
    observers = [device for device in devices if not device.is_attacker] + [device for device in devices if device.is_attacker]
    evaluated = 0  # version 0 is the initial model; rounds produce 1, 2, ...
    stepped_round = None
    warned: set[tuple[str, str]] = set()
    while time.monotonic() < deadline:
        try:
            task = observers[0].client.get_task()
            evaluated = _evaluate_new_versions(observers[0].client, task, evaluated, result, test_split, on_model_version)
        except ApiError as error:
            if error.status not in (401, 403):
                raise
            logger.warning("observer rejected, switching device=%s code=%s", observers[0].name, error.code)
            observers.pop(0)
            if not observers:
                result.finish_reason = "The server rejected every device."
                return
            continue
        if task["status"] == "done":
            result.finished = True
            result.finish_reason = task["federation"]["status_reason"]
            return

        round_info = task["round"]
        if round_info and round_info["state"] == "open" and round_info["number"] != stepped_round:
            stepped_round = round_info["number"]
            for rejection in _run_round(devices, pool, config, stepped_round):
                _record_rejection(result, rejection, warned)
        else:
            time.sleep(config.poll_seconds)
    result.finish_reason = f"The simulation stopped after {config.max_wall_seconds} seconds."


def _evaluate_new_versions(observer: DeviceClient, task: dict, evaluated: int, result: FleetResult, test_split, on_model_version) -> int:
    """Evaluate every model version after `evaluated` up to the latest one, and return the last version evaluated."""
    test_x, test_y = test_split
    latest = task["latest_model_version"] or 0
    for version in range(evaluated + 1, latest + 1):
        accuracy = evaluate_accuracy(task["model_spec"], observer.download_weights(version), test_x, test_y)
        result.accuracy_by_version[version] = accuracy
        evaluated = version
        if on_model_version:
            on_model_version(version, accuracy)
    return evaluated


def _run_round(devices: list[_Device], pool, config: FleetConfig, round_number: int) -> list[Rejection]:
    """Let every device poll and train, the attackers craft, then every trained device submit."""
    outcomes = list(pool.map(lambda device: _poll_and_train(device, config.attack, round_number), devices))
    rejections = [outcome for outcome in outcomes if isinstance(outcome, Rejection)]
    trained = [outcome for outcome in outcomes if isinstance(outcome, _TrainedUpdate)]

    if config.attack is not None:
        attacker_updates = {update.device.name: update for update in trained if update.device.is_attacker}
        crafted = craft_attacker_updates(
            config.attack,
            {name: update.delta for name, update in attacker_updates.items()},
            num_devices=config.num_devices,
            num_attackers=len(config.attacker_indices),
            rngs={name: update.device.rng for name, update in attacker_updates.items()},
        )
        for name, delta in crafted.items():
            attacker_updates[name].delta = delta

    for rejection in pool.map(_submit, trained):
        if rejection is not None:
            rejections.append(rejection)
    return rejections


def _poll_and_train(device: _Device, attack: AttackConfig | None, round_number: int) -> _TrainedUpdate | Rejection | None:
    """Poll the task once and, if selected, train. Returns None when the device is not selected.

    A 4xx rejection of the poll or the download, such as node_quarantined or
    node_revoked, becomes a Rejection for `round_number`, the round the observer saw.
    """
    try:
        task = device.client.get_task()
        if task["status"] != "train":
            return None
        round_info = task["round"]
        base = device.client.download_weights(round_info["model_version"])
    except ApiError as error:
        if error.status >= 500:
            raise
        return Rejection(device.name, round_number, error.code, error.detail)

    plan = TrainingPlan.from_dict(task["training_plan"])
    labels = device.labels
    if device.is_attacker and attack is not None and attack.name == "label_flip":
        labels = flip_labels(labels, num_classes=task["model_spec"]["num_classes"])
    trained = train_locally(task["model_spec"], base, device.features, labels, plan, rng=device.rng)
    return _TrainedUpdate(device, round_info["number"], round_info["model_version"], compute_update(trained, base))


def _submit(update: _TrainedUpdate) -> Rejection | None:
    """Submit one update. Returns the rejection, if any."""
    try:
        update.device.client.submit_update(
            round_number=update.round_number,
            model_version=update.model_version,
            num_examples=int(update.device.labels.size),
            delta=update.delta,
        )
    except ApiError as error:
        if error.status >= 500:
            raise
        return Rejection(update.device.name, update.round_number, error.code, error.detail)
    return None


def _record_rejection(result: FleetResult, rejection: Rejection, warned: set[tuple[str, str]]) -> None:
    # A quarantined device is rejected in every round, so warn once per device and code.
    result.rejections.append(rejection)
    key = (rejection.device, rejection.code)
    level = logging.DEBUG if key in warned else logging.WARNING
    warned.add(key)
    logger.log(level, "device rejected device=%s round=%s code=%s", rejection.device, rejection.round_number, rejection.code)
