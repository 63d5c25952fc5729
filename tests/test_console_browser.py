"""The operator console in headless Chromium against a live uvicorn server on 127.0.0.1.

Playwright drives the system Chromium (/usr/bin/chromium) and never
downloads a browser. Devices run in threads of this process with the
device SDK. Screenshots go to the test's tmp_path; with
FLO_CONSOLE_SCREENSHOT=PATH the overview screenshot is also written to
PATH (the README's picture is made that way).
"""

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from flo_client.device import ApiError, DeviceClient
from flo_site.server_process import BASE_DIR
from tests.live import live_server

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.timeout(300)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
PASSWORD = "a-long-unusual-passphrase"
# Milliseconds Playwright waits for a page, an element or a condition.
STEP_TIMEOUT_MS = 60_000
DEVICE_POLL_SECONDS = 0.3
# A fixed secret key keeps sessions valid across the server restart below.
SERVER_ENVIRONMENT = {"FLO_ENROLMENT_THROTTLE": "10000/minute", "DJANGO_SECRET_KEY": "browser-test-only-secret-key"}


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing; `make test` installs it with apt-get install -y chromium chromium-driver.")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def create_user(server, username: str, role: str) -> None:
    environment = {**server.environment, "FLO_NEW_USER_PASSWORD": PASSWORD}
    subprocess.run([sys.executable, "manage.py", "create_user", username, "--role", role], cwd=BASE_DIR, env=environment, check=True, capture_output=True, timeout=120)


def log_in(browser, base_url: str, username: str):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(f"{base_url}/console/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base_url}/console/")
    return page


def run_device(device: DeviceClient, index: int, stop: threading.Event, errors: list) -> None:
    """Poll for tasks and submit a small update with an accuracy that grows per round, until `stop` is set."""
    while not stop.is_set():
        try:
            task = device.get_task()
            if task["status"] == "done":
                return
            if task["status"] == "train":
                number = task["round"]["number"]
                delta = {"weight": np.full((2, 2), 0.01 * (index + 1), dtype=np.float32), "bias": np.zeros(2, dtype=np.float32)}
                metrics = {"accuracy": min(0.5 + 0.05 * number + 0.01 * index, 0.99)}
                device.submit_update(round_number=number, model_version=task["round"]["model_version"], num_examples=10 + index, delta=delta, metrics=metrics)
        except ApiError as error:
            # A round may close between the task and the submission; the next poll gets the new round.
            if error.code not in ("round_not_open", "stale_model_version", "node_not_selected", "node_quarantined"):
                errors.append(error)
                return
        stop.wait(DEVICE_POLL_SECONDS)


def chart_length(page, chart: str) -> int:
    return page.evaluate(f"window.floConsole.{chart}.data.datasets[0].data.length")


def test_operator_and_compliance_officer_in_browser(browser, database_url, tmp_path):
    stop = threading.Event()
    errors: list = []
    threads: list[threading.Thread] = []
    with live_server(database_url, tmp_path, extra_environment=SERVER_ENVIRONMENT) as server, httpx.Client(timeout=30) as http:
        create_user(server, "olivia", "operator")
        create_user(server, "carl", "compliance_officer")
        base_url = server.base_url
        try:
            page = log_in(browser, base_url, "olivia")

            # Create a central DP federation: the first submission previews the noise.
            page.click("[data-action=create-federation]")
            page.fill("input[name=name]", "browser-clinics")
            page.fill("input[name=num_features]", "2")
            page.fill("input[name=num_classes]", "2")
            page.fill("input[name=max_rounds]", "30")
            page.fill("input[name=round_size]", "3")
            page.fill("input[name=min_updates]", "1")
            # A central DP round waits for every node it sampled, so the round open
            # when device-0 is quarantined below closes only at this deadline.
            page.fill("input[name=round_deadline_seconds]", "15")
            page.select_option("select[name=privacy_mode]", "central")
            page.fill("input[name=target_epsilon]", "10")
            page.fill("input[name=participation_rate]", "1")
            page.fill("input[name=central_clip_norm]", "1")
            page.click("[data-action=save-federation]")
            noise_multiplier = float(page.text_content("[data-testid=noise-multiplier]"))
            assert noise_multiplier > 0
            page.screenshot(path=tmp_path / "preview.png", full_page=True)
            page.click("[data-action=save-federation]")
            page.wait_for_url(re.compile(r".*/console/federations/\d+/$"))
            overview_url = page.url
            federation_id = int(overview_url.rstrip("/").rsplit("/", 1)[1])

            # Issue three tokens (shown once) and enrol a device with each.
            page.fill("input[name=count]", "3")
            page.click("[data-action=issue-tokens]")
            tokens = [element.text_content() for element in page.query_selector_all("[data-testid=tokens] code")]
            assert len(tokens) == 3
            devices = [DeviceClient.enrol(base_url, token=token, display_name=f"device-{index}", http=http) for index, token in enumerate(tokens)]

            page.goto(overview_url)
            page.click("[data-action=start]")
            page.wait_for_url(overview_url)
            page.wait_for_selector("#connection-state[data-state=live]")
            assert page.text_content("[data-field='federation.status']") == "running"
            # Marks this page load: a reload would drop the marker.
            page.evaluate("window.loadMarker = 'still-here'")

            for index, device in enumerate(devices):
                thread = threading.Thread(target=run_device, args=(device, index, stop, errors), daemon=True)
                thread.start()
                threads.append(thread)

            # A round closes: the socket adds a point to both charts and a row to the event log.
            page.wait_for_function("window.floConsole.state.eventsReceived > 0")
            page.wait_for_function("window.floConsole.epsilonChart.data.datasets[0].data.length >= 1")
            page.wait_for_function("window.floConsole.accuracyChart.data.datasets[0].data.length >= 1")
            page.wait_for_selector("#event-log tr[data-kind='round.closed']")
            assert page.evaluate("window.loadMarker") == "still-here"
            assert page.evaluate("window.floConsole.epsilonChart.data.datasets[0].data[0]") > 0
            assert 0.5 < page.evaluate("window.floConsole.accuracyChart.data.datasets[0].data[0]") < 1
            # The snapshot refresh that follows the events fills the tiles and tables.
            page.wait_for_function("window.floConsole.state.snapshot.epsilon_series.length >= 1")
            page.wait_for_selector("#recent-updates tbody tr")
            page.screenshot(path=tmp_path / "overview.png", full_page=True)
            if os.environ.get("FLO_CONSOLE_SCREENSHOT"):
                page.screenshot(path=os.environ["FLO_CONSOLE_SCREENSHOT"])

            # Quarantine device-0; every round opened afterwards leaves it out.
            quarantined_id = devices[0].credentials.node_id
            page.goto(f"{base_url}/console/federations/{federation_id}/nodes/")
            page.click(f"tr[data-node-id='{quarantined_id}'] [data-action=quarantine]")
            page.wait_for_selector(f"tr[data-node-id='{quarantined_id}'][data-status=quarantined]")
            page.screenshot(path=tmp_path / "nodes.png", full_page=True)
            round_at_quarantine = page.request.get(f"{base_url}/console/federations/{federation_id}/snapshot").json()["current_round"]["number"]
            page.goto(overview_url)
            page.wait_for_function(
                f"(window.floConsole.state.snapshot.current_round || {{}}).number > {round_at_quarantine}",
            )
            next_round = page.evaluate("window.floConsole.state.snapshot.current_round.number")
            page.goto(f"{base_url}/console/federations/{federation_id}/rounds/{next_round}/")
            selected = [element.get_attribute("data-node-id") for element in page.query_selector_all("#selected-nodes li[data-node-id]")]
            assert len(selected) == 2
            assert quarantined_id not in selected
            stop.set()
            for thread in threads:
                thread.join(timeout=30)

            # A restart drops the socket: the page reconnects with backoff and reloads the snapshot.
            page.goto(overview_url)
            page.wait_for_selector("#connection-state[data-state=live]")
            snapshots_before = page.evaluate("window.floConsole.state.snapshotsLoaded")
            page.evaluate("window.floConsole.state.socketsOpened = 0; window.loadMarker = 'before-restart'")
            server.restart()
            page.wait_for_function("window.floConsole.state.socketsOpened >= 1")
            page.wait_for_selector("#connection-state[data-state=live]")
            page.wait_for_function(f"window.floConsole.state.snapshotsLoaded > {snapshots_before}")
            assert page.evaluate("window.loadMarker") == "before-restart"

            # The compliance officer can read every page but finds no action button, and a direct POST gets 403.
            officer = log_in(browser, base_url, "carl")
            for path in [f"/console/federations/{federation_id}/", f"/console/federations/{federation_id}/nodes/", "/console/"]:
                officer.goto(base_url + path)
                assert officer.query_selector_all("[data-action]") == [], path
            officer.screenshot(path=tmp_path / "compliance-overview.png", full_page=True)
            csrf_token = next(cookie["value"] for cookie in officer.context.cookies() if cookie["name"] == "csrftoken")
            for path in [f"/console/federations/{federation_id}/actions/stop/", f"/console/federations/{federation_id}/nodes/{quarantined_id}/reinstate/"]:
                response = officer.request.post(base_url + path, form={"csrfmiddlewaretoken": csrf_token}, headers={"X-CSRFToken": csrf_token, "Referer": base_url})
                assert response.status == 403, path
                assert "CSRF" not in response.text(), path
            status = officer.request.get(f"{base_url}/console/federations/{federation_id}/snapshot").json()["federation"]["status"]
            assert status == "running"
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    assert errors == []
