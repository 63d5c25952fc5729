"""Row locks on PostgreSQL: an operator's node action and the transactions that open or settle a round do not deadlock.

Each test runs a round-level service (opening a round, aggregating one) in
one thread and stops it at one statement: right after it has locked the
federation's row, or just before it quarantines a node. A node action
runs in a second thread meanwhile. Once the node action has finished or
waits for a lock, the first thread goes on and writes rows that refer to
the node (the round's selection, reputations, the node's status). With a
lock order that allows a cycle, PostgreSQL aborts one of the two with
"deadlock detected"; both must finish, and the operator's change must stand.
"""

import re
import threading
import time

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from federation.models import AuditEntry, Federation, Node, TrainingRound
from federation.services.aggregation import aggregate_round
from federation.services.federations import start_federation
from federation.services.nodes import quarantine_node, revoke_node, rotate_node_secret
from federation.services.reputation import reinstate_node
from federation.services.rounds import open_next_round
from tests.conftest import DP_PLAN, enrol, make_federation

pytestmark = [pytest.mark.integration, pytest.mark.postgresql]

# The row-locking clause that ends a SELECT on PostgreSQL.
LOCK_CLAUSE = re.compile(r" FOR (UPDATE|NO KEY UPDATE|SHARE|KEY SHARE)(?: OF [^()]*)?(?: NOWAIT| SKIP LOCKED)?$")
# Seconds each thread may take. A lock wait that lasts this long fails the test.
STEP_SECONDS = 30


class Pause:
    """An execute wrapper that stops its thread at the first statement that `matches`, before or after running it, until `resume` is set."""

    def __init__(self, matches, *, before: bool = False):
        self.matches = matches
        self.before = before
        self.reached = threading.Event()
        self.resume = threading.Event()

    def __call__(self, execute, sql, params, many, context):
        if self.before:
            self._stop_at(sql)
        result = execute(sql, params, many, context)
        if not self.before:
            self._stop_at(sql)
        return result

    def _stop_at(self, sql: str) -> None:
        if self.reached.is_set() or not self.matches(sql):
            return
        self.reached.set()
        if not self.resume.wait(STEP_SECONDS):
            raise TimeoutError("the test never resumed the paused transaction")


def locks_federation(sql: str) -> bool:
    match = LOCK_CLAUSE.search(sql)
    return match is not None and "UPDATE" in match.group(1) and f'"{Federation._meta.db_table}"' in sql


def updates_node(sql: str) -> bool:
    return sql.startswith(f'UPDATE "{Node._meta.db_table}"')


def run_in_thread(function, errors: list, backend_pids: list | None = None, wrapper=None) -> threading.Thread:
    def target():
        try:
            connection.ensure_connection()
            if backend_pids is not None:
                backend_pids.append(connection.connection.info.backend_pid)
            if wrapper is None:
                function()
            else:
                with connection.execute_wrapper(wrapper):
                    function()
        except Exception as error:  # noqa: BLE001 - the test reports every error of the thread
            errors.append(error)
        finally:
            connections.close_all()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def is_waiting_for_lock(backend_pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [backend_pid])
        row = cursor.fetchone()
    return row is not None and row[0] == "Lock"


def interleave(round_service, node_action, *, pause_at=locks_federation, before: bool = False) -> tuple[list, list]:
    """Run `round_service` until the statement `pause_at` matches, run `node_action` until it ends or waits, then let both finish.

    Returns:
        (errors of round_service, errors of node_action).
    """
    assert connection.vendor == "postgresql", "run this test with DATABASE_URL pointing to PostgreSQL (make test-postgres)"
    pause = Pause(pause_at, before=before)
    round_errors: list = []
    action_errors: list = []
    action_pids: list = []
    round_thread = run_in_thread(round_service, round_errors, wrapper=pause)
    assert pause.reached.wait(STEP_SECONDS), f"the round service never reached the statement to pause at: {round_errors}"
    action_thread = run_in_thread(node_action, action_errors, backend_pids=action_pids)
    deadline = time.monotonic() + STEP_SECONDS
    while action_thread.is_alive() and time.monotonic() < deadline:
        if action_pids and is_waiting_for_lock(action_pids[0]):
            break
        time.sleep(0.02)
    pause.resume.set()
    round_thread.join(STEP_SECONDS)
    action_thread.join(STEP_SECONDS)
    assert not round_thread.is_alive(), "the round service is still waiting"
    assert not action_thread.is_alive(), "the node action is still waiting"
    return round_errors, action_errors


def running_federation_without_round(count: int = 3):
    """A running federation of `count` active nodes and no open round, so open_next_round selects every node."""
    federation = make_federation(round_size=count, min_updates=count)
    nodes = enrol(federation, count)
    Federation.objects.filter(id=federation.id).update(status=Federation.Status.RUNNING)
    return federation, nodes


NODE_ACTIONS = {
    "quarantine": lambda node: quarantine_node(node),
    "revoke": lambda node: revoke_node(node),
    "rotate_secret": lambda node: rotate_node_secret(node, grace_seconds=60),
}


@pytest.mark.parametrize("action", sorted(NODE_ACTIONS))
def test_node_action_during_round_opening(transactional_db, action):
    federation, nodes = running_federation_without_round()
    node = nodes[0].node

    round_errors, action_errors = interleave(lambda: open_next_round(federation.id), lambda: NODE_ACTIONS[action](node))

    assert round_errors == []
    assert action_errors == []


def test_quarantine_during_round_opening_applies(transactional_db):
    federation, nodes = running_federation_without_round()
    node = nodes[0].node

    interleave(lambda: open_next_round(federation.id), lambda: quarantine_node(node))

    assert Node.objects.get(id=node.id).status == Node.Status.QUARANTINED


def test_reinstate_during_round_opening(transactional_db):
    federation, nodes = running_federation_without_round()
    node = nodes[0].node
    quarantine_node(node)

    round_errors, action_errors = interleave(lambda: open_next_round(federation.id), lambda: reinstate_node(node))

    assert round_errors == []
    assert action_errors == []


def aggregating_round(federation, nodes) -> TrainingRound:
    """Submit an update from every node but the last, then mark the open round as aggregating."""
    training_round = TrainingRound.objects.get(federation=federation, state=TrainingRound.State.OPEN)
    for signed in nodes[:-1]:
        response = signed.submit(round_number=training_round.number)
        assert response.status_code == 202, response.content
    TrainingRound.objects.filter(id=training_round.id).update(state=TrainingRound.State.AGGREGATING)
    return training_round


def aggregation_that_quarantines_dropout():
    """A round of three nodes where the last never submitted: its reputation falls to 0.85, below the threshold 0.9, so aggregation quarantines it."""
    federation = make_federation(round_size=3, min_updates=3, quarantine_threshold=0.9)
    nodes = enrol(federation, 3)
    start_federation(federation)
    training_round = aggregating_round(federation, nodes)
    return training_round, nodes[-1].node


@pytest.mark.parametrize("action", sorted(NODE_ACTIONS))
def test_node_action_during_aggregation(transactional_db, action):
    training_round, dropout = aggregation_that_quarantines_dropout()

    round_errors, action_errors = interleave(lambda: aggregate_round(training_round.id), lambda: NODE_ACTIONS[action](dropout))

    assert round_errors == []
    assert action_errors == []
    assert Node.objects.get(id=dropout.id).status == (Node.Status.REVOKED if action == "revoke" else Node.Status.QUARANTINED)


def test_revoke_before_automatic_quarantine_stands(transactional_db):
    training_round, dropout = aggregation_that_quarantines_dropout()

    round_errors, action_errors = interleave(lambda: aggregate_round(training_round.id), lambda: revoke_node(dropout), pause_at=updates_node, before=True)

    assert round_errors == []
    assert action_errors == []
    assert Node.objects.get(id=dropout.id).status == Node.Status.REVOKED
    assert not AuditEntry.objects.filter(action="node.quarantined", target=f"node:{dropout.id}").exists()
    assert TrainingRound.objects.get(id=training_round.id).aggregation_report["quarantined_node_ids"] == []


def test_reinstate_before_automatic_quarantine(transactional_db):
    training_round, dropout = aggregation_that_quarantines_dropout()

    def quarantine_then_reinstate():
        quarantine_node(dropout)
        reinstate_node(dropout)

    round_errors, action_errors = interleave(lambda: aggregate_round(training_round.id), quarantine_then_reinstate, pause_at=updates_node, before=True)

    assert round_errors == []
    assert action_errors == []
    assert Node.objects.get(id=dropout.id).status == Node.Status.ACTIVE


def test_service_locks_let_referring_inserts_through(transactional_db):
    assert connection.vendor == "postgresql", "run this test with DATABASE_URL pointing to PostgreSQL (make test-postgres)"
    with CaptureQueriesContext(connection) as captured:
        federation = make_federation(plan=DP_PLAN, round_size=3, min_updates=3, node_epsilon_budget=50.0, quarantine_threshold=0.5)
        nodes = enrol(federation, 3)
        start_federation(federation)
        training_round = aggregating_round(federation, nodes)
        aggregate_round(training_round.id)
        node = nodes[0].node
        rotate_node_secret(node, grace_seconds=60)
        quarantine_node(node)
        reinstate_node(node)
        revoke_node(node)
    locking = [match.group(1) for query in captured.captured_queries if (match := LOCK_CLAUSE.search(query["sql"]))]

    assert len(locking) >= 8
    assert [clause for clause in locking if clause not in ("NO KEY UPDATE", "SHARE")] == []
