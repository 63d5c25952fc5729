"""Fleet simulator: many devices training on a real dataset against a live server.

Each simulated device holds a non-IID shard of the training split, enrols
with its own token and runs the device loop of a real deployment over HTTP:
poll for a task, download the round's weights, train locally, submit the
signed delta. A held-out stratified test split never reaches any device;
the simulator itself evaluates every new global model on it.
"""

import logging
import threading
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
    # Seconds between task polls of an idle device.
    poll_seconds: float = 0.2
    # The whole run stops after this many seconds even if the federation does not finish.
    max_wall_seconds: float = 1800.0
    min_examples_per_device: int = 10


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
    shards = dirichlet_partition(
        train_y, num_devices=config.num_devices, alpha=config.alpha, rng=np.random.default_rng(config.seed), min_examples=config.min_examples_per_device
    )
    return [(train_x[indices], train_y[indices]) for indices in shards], (test_x, test_y)


def run_fleet(
    base_url: str,
    tokens: list[str],
    config: FleetConfig,
    *,
    on_enrolled: Callable[[], None] | None = None,
    on_model_version: Callable[[int, float], None] | None = None,
) -> FleetResult:
    """Enrol one device per token, run them until the federation is done, and evaluate every model version.

    Args:
        base_url: e.g. "http://127.0.0.1:8000".
        tokens: one enrolment token per device (len(tokens) == config.num_devices).
        on_enrolled: called once every device has enrolled, before any device polls;
            the demo starts the federation here.
        on_model_version: called with (version, test accuracy) for each new global model.
    """
    if len(tokens) != config.num_devices:
        raise ValueError(f"Got {len(tokens)} enrolment tokens for {config.num_devices} devices; pass one token per device.")
    shards, (test_x, test_y) = prepare_data(config)
    result = FleetResult()
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + config.max_wall_seconds
    limits = httpx.Limits(max_connections=config.num_devices + 4)

    with httpx.Client(timeout=120.0, limits=limits) as http:
        devices = []
        for index, (token, (features, labels)) in enumerate(zip(tokens, shards, strict=True)):
            name = f"device-{index:03d}"
            client = DeviceClient.enrol(base_url, token=token, display_name=name, http=http)
            devices.append(_Device(name, client, features, labels, np.random.default_rng([config.seed, index])))
            result.node_ids[name] = client.credentials.node_id
            result.examples_per_device[name] = int(labels.size)
        logger.info("fleet enrolled devices=%d", len(devices))
        if on_enrolled:
            on_enrolled()

        def record_rejection(device: _Device, round_number: int | None, error: ApiError) -> None:
            with lock:
                result.rejections.append(Rejection(device.name, round_number, error.code, error.detail))

        with ThreadPoolExecutor(max_workers=len(devices) + 1) as pool:
            futures = [pool.submit(_run_device, device, config, stop, deadline, record_rejection) for device in devices]
            evaluator = pool.submit(_run_evaluator, devices[0].client, test_x, test_y, config, stop, deadline, result, on_model_version)
            for future in futures:
                future.result()
            stop.set()
            evaluator.result()
    return result


def _run_device(device: _Device, config: FleetConfig, stop: threading.Event, deadline: float, record_rejection) -> None:
    while not stop.is_set() and time.monotonic() < deadline:
        task = device.client.get_task()
        if task["status"] == "done":
            return
        if task["status"] != "train":
            time.sleep(config.poll_seconds)
            continue
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
            record_rejection(device, round_info["number"], error)
            time.sleep(config.poll_seconds)


def _run_evaluator(client: DeviceClient, test_x, test_y, config: FleetConfig, stop: threading.Event, deadline: float, result: FleetResult, on_model_version) -> None:
    evaluated = 0  # version 0 is the initial model; rounds produce 1, 2, ...
    while time.monotonic() < deadline:
        task = client.get_task()
        latest = task["latest_model_version"] or 0
        for version in range(evaluated + 1, latest + 1):
            weights = client.download_weights(version)
            accuracy = evaluate_accuracy(task["model_spec"], weights, test_x, test_y)
            result.accuracy_by_version[version] = accuracy
            if on_model_version:
                on_model_version(version, accuracy)
        evaluated = max(evaluated, latest)
        if task["status"] == "done":
            result.finished = True
            result.finish_reason = task["federation"]["status_reason"]
            return
        if stop.is_set():
            result.finish_reason = "The devices stopped before the federation finished."
            return
        time.sleep(config.poll_seconds)
    result.finish_reason = f"The simulation stopped after {config.max_wall_seconds} seconds."

