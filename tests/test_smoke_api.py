
from federation.models import ModelUpdate, ModelVersion, TrainingRound
from tests.conftest import zero_update


def test_round_closes_after_all_selected_nodes_submit(running):
    federation, nodes = running

    responses = [node.submit(round_number=1, tensors=zero_update(fill=float(i + 1)), num_examples=10) for i, node in enumerate(nodes)]

    assert [r.status_code for r in responses] == [202, 202, 202]
    assert TrainingRound.objects.get(federation=federation, number=1).state == "closed"
    assert ModelVersion.objects.filter(federation=federation).count() == 2
    assert ModelUpdate.objects.count() == 3
