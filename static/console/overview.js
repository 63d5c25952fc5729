// Live federation overview: charts and tables fed by the federation's
// websocket, with the JSON snapshot as the source of truth after a
// reconnect or a dropped event. Needs Chart.js (window.Chart) loaded first.

const script = document.getElementById("overview-script");
const SOCKET_PATH = script.dataset.socketPath;
const SNAPSHOT_URL = script.dataset.snapshotUrl;
// Reconnect delays grow from 1 s by doubling up to 30 s, with up to 20% jitter
// so many consoles do not reconnect in step after a server restart.
const FIRST_RETRY_MS = 1000;
const MAX_RETRY_MS = 30000;
const PING_INTERVAL_MS = 25000;
// Events arriving close together trigger one snapshot refresh.
const REFRESH_DEBOUNCE_MS = 1500;
// The snapshot is also reloaded this often, so events dropped on a full
// server-side queue show up even when no later event arrives.
const SNAPSHOT_INTERVAL_MS = 30000;
const MAX_EVENT_ROWS = 50;

const state = {
  snapshot: JSON.parse(document.getElementById("overview-data").textContent),
  socket: null,
  retryMs: FIRST_RETRY_MS,
  eventsReceived: 0,
  snapshotsLoaded: 0,
  socketsOpened: 0,
  refreshTimer: null,
};

function makeLineChart(canvasId, label, color) {
  return new window.Chart(document.getElementById(canvasId), {
    type: "line",
    data: { labels: [], datasets: [{ label, data: [], borderColor: color, backgroundColor: color, tension: 0.2 }] },
    options: { animation: false, scales: { y: { beginAtZero: true } } },
  });
}

const accuracyChart = makeLineChart("accuracy-chart", "accuracy", "#2563eb");
const epsilonChart = makeLineChart("epsilon-chart", "epsilon", "#dc2626");

function setChartPoints(chart, points) {
  chart.data.labels = points.map((point) => point.x);
  chart.data.datasets[0].data = points.map((point) => point.y);
  chart.update();
}

function upsertChartPoint(chart, x, y) {
  const index = chart.data.labels.indexOf(x);
  if (index >= 0) {
    chart.data.datasets[0].data[index] = y;
  } else {
    chart.data.labels.push(x);
    chart.data.datasets[0].data.push(y);
  }
  chart.update();
}

function accuracyPoints(series) {
  return series.filter((point) => typeof point.metrics.accuracy === "number").map((point) => ({ x: `v${point.version}`, y: point.metrics.accuracy }));
}

function epsilonPoints(series) {
  return series.map((point) => ({ x: `round ${point.round}`, y: point.epsilon }));
}

function setField(name, value, placeholder = "–") {
  for (const element of document.querySelectorAll(`[data-field="${name}"]`)) {
    element.textContent = value === null || value === undefined || value === "" ? placeholder : String(value);
  }
}

function formatNumber(value, digits) {
  return typeof value === "number" ? value.toFixed(digits) : value;
}

function applySnapshot(snapshot) {
  state.snapshot = snapshot;
  state.snapshotsLoaded += 1;
  setField("federation.status", snapshot.federation.status);
  setField("federation.status_reason", snapshot.federation.status_reason, "");
  for (const key of ["active", "quarantined", "revoked", "selected", "responding"]) {
    setField(`nodes.${key}`, snapshot.nodes[key]);
  }
  const current = snapshot.current_round || {};
  for (const key of ["number", "state", "accepted", "rejected", "selected", "deadline_at"]) {
    setField(`round.${key}`, current[key]);
  }
  setField("privacy.mode", snapshot.privacy.mode);
  setField("privacy.epsilon_spent", formatNumber(snapshot.privacy.epsilon_spent, 3));
  setField("privacy.epsilon_budget", snapshot.privacy.epsilon_budget);
  setField("privacy.clip_norm", snapshot.privacy.clip_norm);
  setField("privacy.noise_multiplier", formatNumber(snapshot.privacy.noise_multiplier, 4));
  setChartPoints(accuracyChart, accuracyPoints(snapshot.accuracy_series));
  setChartPoints(epsilonChart, epsilonPoints(snapshot.epsilon_series));
  renderRecentUpdates(snapshot.recent_updates);
  renderRecentRounds(snapshot.recent_rounds);
}

function renderRecentRounds(rounds) {
  const table = document.getElementById("recent-rounds");
  // The template renders the URL of round 0; each row swaps in its number.
  const roundUrl = table.dataset.roundUrl;
  table.tBodies[0].replaceChildren(
    ...rounds.map((round) => {
      const row = tableRow(["", round.state, round.result_version, round.opened_at, round.closed_at, round.failure_reason]);
      const link = document.createElement("a");
      link.href = roundUrl.replace(/\/0\/$/, `/${round.number}/`);
      link.textContent = String(round.number);
      row.cells[0].appendChild(link);
      return row;
    }),
  );
}

function renderRecentUpdates(updates) {
  const body = document.querySelector("#recent-updates tbody");
  body.replaceChildren(
    ...updates.map((update) => tableRow([update.round, update.display_name, update.status, update.rejection_reason, update.num_examples, update.received_at])),
  );
}

function tableRow(cells) {
  const row = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    td.textContent = cell === null || cell === undefined ? "" : String(cell);
    row.appendChild(td);
  }
  return row;
}

function describeEvent(event) {
  const payload = event.payload;
  switch (event.kind) {
    case "round.opened":
      return `round ${payload.round}: ${payload.selected} of ${payload.eligible} eligible nodes selected`;
    case "round.closed":
      return `round ${payload.round} closed: model version ${payload.version} from ${payload.updates} updates`;
    case "round.failed":
      return `round ${payload.round} failed: ${payload.reason}`;
    case "update.accepted":
      return `round ${payload.round}: update from ${payload.display_name} accepted`;
    case "update.rejected":
      return `update from ${payload.display_name} rejected (${payload.code}): ${payload.detail}`;
    case "node.quarantined":
    case "node.revoked":
    case "node.reinstated":
    case "node.enrolled":
      return `${payload.display_name}${payload.reason ? ": " + payload.reason : ""}`;
    case "budget.exhausted":
      return `${payload.scope} budget exhausted: ${payload.reason || payload.detail || ""}`;
    case "model_version.written":
      return `model version ${payload.version} written (${payload.num_updates} updates)`;
    case "federation.status":
      return `federation is ${payload.status}${payload.reason ? ": " + payload.reason : ""}`;
    default:
      return JSON.stringify(payload);
  }
}

function applyEvent(event) {
  state.eventsReceived += 1;
  const body = document.querySelector("#event-log tbody");
  const row = tableRow([new Date(event.at).toLocaleTimeString(), event.kind, describeEvent(event)]);
  row.dataset.kind = event.kind;
  body.prepend(row);
  while (body.rows.length > MAX_EVENT_ROWS) {
    body.deleteRow(-1);
  }
  const payload = event.payload;
  if (event.kind === "round.closed") {
    if (typeof payload.metrics?.accuracy === "number") {
      upsertChartPoint(accuracyChart, `v${payload.evaluated_version}`, payload.metrics.accuracy);
    }
    if (typeof payload.epsilon === "number") {
      upsertChartPoint(epsilonChart, `round ${payload.round}`, payload.epsilon);
    }
  } else if (event.kind === "federation.status") {
    setField("federation.status", payload.status);
  } else if (event.kind === "round.opened") {
    setField("round.number", payload.round);
    setField("round.state", "open");
  }
  scheduleRefresh();
}

function scheduleRefresh() {
  if (state.refreshTimer !== null) {
    return;
  }
  state.refreshTimer = setTimeout(() => {
    state.refreshTimer = null;
    refreshSnapshot();
  }, REFRESH_DEBOUNCE_MS);
}

async function refreshSnapshot() {
  try {
    const response = await fetch(SNAPSHOT_URL, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (response.ok) {
      applySnapshot(await response.json());
    }
  } catch (error) {
    console.warn("snapshot refresh failed", error);
  }
}

function setConnectionState(name, text) {
  const element = document.getElementById("connection-state");
  element.dataset.state = name;
  element.textContent = text;
}

function connect() {
  const scheme = window.location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${window.location.host}${SOCKET_PATH}`);
  state.socket = socket;
  let pingTimer = null;
  socket.addEventListener("open", () => {
    state.socketsOpened += 1;
    state.retryMs = FIRST_RETRY_MS;
    setConnectionState("live", "live");
    pingTimer = setInterval(() => socket.send(JSON.stringify({ type: "ping" })), PING_INTERVAL_MS);
    // Catch up on whatever happened while the socket was down.
    refreshSnapshot();
  });
  socket.addEventListener("message", (message) => {
    const event = JSON.parse(message.data);
    if (event.kind !== "pong") {
      applyEvent(event);
    }
  });
  socket.addEventListener("close", () => {
    clearInterval(pingTimer);
    const delay = Math.round(state.retryMs * (1 + Math.random() * 0.2));
    setConnectionState("reconnecting", `disconnected, retrying in ${Math.round(delay / 1000)} s`);
    state.retryMs = Math.min(state.retryMs * 2, MAX_RETRY_MS);
    setTimeout(connect, delay);
  });
}

function updateDeadlineBar() {
  const bar = document.getElementById("round-deadline");
  const current = state.snapshot.current_round;
  if (!current || current.state !== "open") {
    bar.value = 0;
    return;
  }
  const opened = Date.parse(current.opened_at);
  const deadline = Date.parse(current.deadline_at);
  bar.value = Math.min(1, Math.max(0, (Date.now() - opened) / Math.max(deadline - opened, 1)));
}

// Tests and operators' browser consoles read the live state here.
window.floConsole = { state, accuracyChart, epsilonChart, applySnapshot, refreshSnapshot };
applySnapshot(state.snapshot);
setInterval(updateDeadlineBar, 1000);
setInterval(refreshSnapshot, SNAPSHOT_INTERVAL_MS);
connect();
