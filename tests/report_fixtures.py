"""Builders of federations with real privacy ledgers for the report tests."""

import hashlib
import hmac

from federation.models import Federation, ModelUpdate, Node
from federation.services.federations import start_federation
from federation.services.reputation import _quarantine, reinstate_node
from privacy.accounting import DpSgdEvent, compose_epsilon
from privacy.models import ComplianceProfile
from tests.conftest import DP_PLAN, enrol, make_federation

# Formula prefixes, quotes, a comma, a newline, Hebrew and Arabic (right to left) and Cyrillic.
HOSTILE_NAME = '=HYPERLINK("http://127.0.0.1/x","click"), "quoted"\nשלום مرحبا Привет'
HOSTILE_ORGANISATION = "+SUM(A1:A9) Krankenhaus Zürich, Abteilung \"Ost\""
HOSTILE_PURPOSE = "@cmd|' /C calc'!A0\tand a tab"
TWO_PARTICIPATIONS = compose_epsilon([DpSgdEvent(2.0, 0.2, 5)] * 2, delta=1e-5)
PSEUDONYM_KEY = b"k" * 32


def expected_pseudonym(node_id, key: bytes = PSEUDONYM_KEY) -> str:
    """The pseudonym rule computed here by hand: HMAC-SHA256 of the UUID string, first 16 hex digits."""
    return "node-" + hmac.new(key, str(node_id).encode(), hashlib.sha256).hexdigest()[:16]


def build_record_level_federation(*, name: str = HOSTILE_NAME) -> Federation:
    """Three nodes, budgets for two participations, two rounds, a rejected update and quarantine events.

    Round 2: node 0 submits and is quarantined before aggregation, so its
    update is rejected. Node 0 is reinstated afterwards and node 1 is
    quarantined and stays so. The federation completes because every
    budget is spent.
    """
    federation = make_federation(name=name, plan=DP_PLAN, round_size=3, min_updates=3, sensitivity_budgets={"personal": TWO_PARTICIPATIONS * 1.001})
    ComplianceProfile.objects.create(
        federation=federation,
        organisation=HOSTILE_ORGANISATION,
        controller_name="-Clinic Trust",
        controller_contact="dpo@clinic.example\nPostfach 12",
        processor_name="FLO Operations",
        purpose=HOSTILE_PURPOSE,
        legal_basis=ComplianceProfile.LegalBasis.PUBLIC_TASK,
        legal_basis_detail="GDPR Art. 9(2)(j): scientific research",
        data_categories=["health records", "age band"],
        update_retention_days=30,
    )
    nodes = enrol(federation, 3)
    start_federation(federation)
    for node in nodes:
        assert node.submit(round_number=1, model_version=0).status_code == 202
    assert nodes[0].submit(round_number=2, model_version=1).status_code == 202
    _quarantine(nodes[0].node, 0.2, threshold=0.4, round_number=2)
    for node in nodes[1:]:
        assert node.submit(round_number=2, model_version=1).status_code == 202
    reinstate_node(Node.objects.get(id=nodes[0].node.id), reason="device reflashed")
    _quarantine(nodes[1].node, 0.1, threshold=0.4, round_number=2)
    federation.refresh_from_db()
    assert federation.status == Federation.Status.COMPLETED
    assert ModelUpdate.objects.filter(status=ModelUpdate.Status.REJECTED).count() == 1
    return federation
