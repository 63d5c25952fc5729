"""Pure modules import with Django unconfigured and pull in no Django."""

import subprocess
import sys

import pytest

PURE_MODULES = [
    "federation.aggregation.fedavg",
    "federation.aggregation.kernels",
    "federation.aggregation.order_statistics",
    "federation.aggregation.server_optimizers",
    "federation.aggregation.krum",
    "federation.aggregation.robust",
    "federation.aggregation.validation",
    "privacy.accounting",
    "privacy.rdp",
    "privacy.central_dp",
    "privacy.adaptive_clipping",
    "privacy.noise",
    "privacy.schedules",
    "privacy.reports.csv_tables",
    "privacy.reports.integrity",
    "privacy.reports.pseudonyms",
    "privacy.reports.pdf_layout",
    "privacy.reports.pdf",
    "flo_client.wire",
    "flo_client.signing",
    "flo_client.models",
    "flo_client.training",
    "flo_client.datasets",
    "flo_client.attacks",
    "flo_client.device",
    "flo_client.simulator",
]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_module_imports_without_django(module):
    code = f"import sys, importlib; importlib.import_module({module!r}); sys.exit(1 if 'django' in sys.modules else 0)"
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}

    completed = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr
