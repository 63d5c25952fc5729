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
"""

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np

from flo_client.datasets import dirichlet_partition, load_dataset, split_train_test
from flo_client.device import ApiError, DeviceClient
from flo_client.models import evaluate_accuracy
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


@dataclass
class _Device:
    name: str
    client: DeviceClient
    features: np.ndarray
    labels: np.ndarray
    rng: np.random.Generator


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
    """
    if len(tokens) != config.num_devices:
        raise ValueError(f"Got {len(tokens)} enrolment tokens for {config.num_devices} devices; pass one token per device.")
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
        logger.info("fleet enrolled devices=%d", len(devices))
        if on_enrolled:
            on_enrolled()
        _drive_rounds(devices, pool, config, deadline, result, test_split, on_model_version)
    return result


def _enrol_device(base_url: str, http: httpx.Client, config: FleetConfig, index: int, token: str, shard) -> _Device:
    name = f"device-{index:04d}" if config.num_devices > 1000 else f"device-{index:03d}"
    client = DeviceClient.enrol(base_url, token=token, display_name=name, http=http)
    features, labels = shard
    return _Device(name, client, features, labels, np.random.default_rng([config.seed, index]))


def _drive_rounds(devices, pool, config: FleetConfig, deadline: float, result: FleetResult, test_split, on_model_version) -> None:
    observer = devices[0].client
    test_x, test_y = test_split
    evaluated = 0  # version 0 is the initial model; rounds produce 1, 2, ...
    stepped_round = None
    while time.monotonic() < deadline:
        task = observer.get_task()
        latest = task["latest_model_version"] or 0
        for version in range(evaluated + 1, latest + 1):
            accuracy = evaluate_accuracy(task["model_spec"], observer.download_weights(version), test_x, test_y)
            result.accuracy_by_version[version] = accuracy
            if on_model_version:
                on_model_version(version, accuracy)
        evaluated = max(evaluated, latest)
        if task["status"] == "done":
            result.finished = True
            result.finish_reason = task["federation"]["status_reason"]
            return

        round_info = task["round"]
        if round_info and round_info["state"] == "open" and round_info["number"] != stepped_round:
            stepped_round = round_info["number"]
            for rejection in pool.map(lambda device: _step_device(device), devices):
                if rejection is not None:
                    result.rejections.append(rejection)
        else:
            time.sleep(config.poll_seconds)
    result.finish_reason = f"The simulation stopped after {config.max_wall_seconds} seconds."


def _step_device(device: _Device) -> Rejection | None:
    """Poll the task once; if selected, train and submit. Returns the rejection, if any."""
    task = device.client.get_task()
    if task["status"] != "train":
        return None
    round_info = task["round"]
    plan = TrainingPlan.from_dict(task["training_plan"])
    base = device.client.download_weights(round_info["model_version"])
    trained = train_locally(task["model_spec"], base, device.features, device.labels, plan, rng=device.rng)
    try:
        device.client.submit_update(
            round_number=round_info["number"],
            model_version=round_info["model_version"],
            num_examples=int(device.labels.size),
            delta=compute_update(trained, base),
        )
    except ApiError as error:
        if error.status >= 500:
            raise
        logger.warning("update rejected device=%s round=%s code=%s", device.name, round_info["number"], error.code)
        return Rejection(device.name, round_info["number"], error.code, error.detail)
    return None
