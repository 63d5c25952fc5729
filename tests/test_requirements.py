"""requirements.txt installs every distribution the production processes load.

The test environment installs more than requirements.txt: pytest and its
plugins pull in `packaging`, for one. A runtime dependency that only a
test tool brings in would pass every other test and still crash a Celery
worker installed from requirements.txt alone. These tests import what the
ASGI server, the Celery worker and beat load, in a fresh interpreter that
cannot see distributions outside the closure of requirements.txt.
"""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

BASE_DIR = Path(__file__).resolve().parents[1]

# Modules the production processes import beyond Django's own startup:
# Celery's Redis transport and result backend, the Redis channel layer and
# cache, the database pool and the ASGI server with its WebSocket support.
PRODUCTION_IMPORTS = (
    "flo_site.celery",
    "flo_site.asgi",
    "kombu.transport.redis",
    "celery.backends.redis",
    "celery.beat",
    "channels_redis.core",
    "django.core.cache.backends.redis",
    "psycopg_pool",
    "uvicorn",
    "uvicorn.protocols.websockets.websockets_impl",
)


def required_distributions(requirements_file: Path) -> set[str]:
    """Return the normalised names of the distributions that installing the file pulls in, extras and markers included."""
    pending = [Requirement(line.strip()) for line in requirements_file.read_text().splitlines() if line.strip() and not line.startswith("#")]
    closure: set[str] = set()
    while pending:
        requirement = pending.pop()
        name = _normalise(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in closure:
            continue
        closure.add(key)
        closure.add(name)
        for raw in importlib.metadata.requires(requirement.name) or []:
            dependency = Requirement(raw)
            environments = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if dependency.marker is None or any(dependency.marker.evaluate(environment) for environment in environments):
                pending.append(dependency)
    return {entry for entry in closure if "[" not in entry}


def import_with_only(allowed: set[str], modules: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Import `modules` after django.setup() in a fresh interpreter that cannot see modules of distributions outside `allowed`.

    Hidden modules raise ModuleNotFoundError, as in an environment installed
    from requirements.txt alone, so optional imports fall back as they would
    there, and a missing dependency fails the import.
    """
    providers = importlib.metadata.packages_distributions()
    hidden = sorted(module for module, distributions in providers.items() if not any(_normalise(name) in allowed for name in distributions))
    script = (
        "import importlib, json, os, sys\n"
        f"HIDDEN = set(json.loads({json.dumps(json.dumps(hidden))}))\n"
        "class HideOutsideRequirements:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in HIDDEN:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (not installed by requirements.txt)', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, HideOutsideRequirements())\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'flo_site.settings')\n"
        "import django\n"
        "django.setup()\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
    )
    environment = {"REDIS_URL": "redis://127.0.0.1:6379/0", "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=BASE_DIR, env=environment, capture_output=True, text=True, check=False, timeout=120)


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_production_imports_need_only_requirements():
    completed = import_with_only(required_distributions(BASE_DIR / "requirements.txt"), PRODUCTION_IMPORTS)

    assert completed.returncode == 0, completed.stderr[-2000:]


def test_import_check_fails_without_celery_redis_extra(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text((BASE_DIR / "requirements.txt").read_text().replace("celery[redis]==", "celery=="))

    completed = import_with_only(required_distributions(requirements), PRODUCTION_IMPORTS)

    assert completed.returncode != 0
    assert "packaging" in completed.stderr
