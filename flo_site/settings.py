"""Django settings for FLO, read from environment variables.

With no variables set, FLO runs on the embedded defaults: SQLite in WAL mode,
the in-memory channel layer and Celery tasks executed eagerly in the calling
process. Setting DATABASE_URL and REDIS_URL switches to PostgreSQL, Redis
and real Celery workers.
"""

import secrets
from pathlib import Path

import dj_database_url

from flo_site.env import (
    ConfigurationError,
    read_bool,
    read_choice,
    read_int,
    read_list,
    read_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent

# Deployment profile: "development" (default) or "production". Production
# demands explicit secrets and turns off DEBUG.
FLO_ENV = read_choice("FLO_ENV", "development", ("development", "production"))
IS_PRODUCTION = FLO_ENV == "production"

# Directory for files FLO writes next to the embedded database (the
# development key for node secrets). Created on first use.
FLO_DATA_DIR = Path(read_str("FLO_DATA_DIR", str(BASE_DIR / ".flo-data")))
# Directory of update payload files. Every server process and Celery worker
# must see the same directory, so a deployment on several hosts mounts a
# shared volume here.
FLO_UPDATE_STORE_DIR = Path(read_str("FLO_UPDATE_STORE_DIR", str(FLO_DATA_DIR / "updates")))

DEBUG = read_bool("DJANGO_DEBUG", not IS_PRODUCTION)

# Signs sessions and CSRF tokens. Development gets a random per-process key,
# so sessions do not survive a restart; production must set one.
SECRET_KEY = read_str("DJANGO_SECRET_KEY")
if SECRET_KEY is None:
    if IS_PRODUCTION:
        raise ConfigurationError("DJANGO_SECRET_KEY (or DJANGO_SECRET_KEY_FILE) must be set when FLO_ENV=production.")
    SECRET_KEY = "dev-only-" + secrets.token_urlsafe(32)

ALLOWED_HOSTS = read_list("DJANGO_ALLOWED_HOSTS", [] if IS_PRODUCTION else ["127.0.0.1", "localhost", "testserver"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "channels",
    "flo_site",
    "federation",
    "privacy",
    "monitoring",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "flo_site.database_busy.DatabaseBusyMiddleware",
]

ROOT_URLCONF = "flo_site.urls"
ASGI_APPLICATION = "flo_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: DATABASE_URL (postgres://..., sqlite:///PATH). The default is a
# SQLite file under FLO_DATA_DIR.
DATABASE_URL = read_str("DATABASE_URL", f"sqlite:///{FLO_DATA_DIR / 'db.sqlite3'}")
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
# With FLO_DB_POOL_SIZE > 0, each PostgreSQL process keeps a connection pool
# of that size. Under ASGI every request runs in a thread of its own, so
# persistent connections (CONN_MAX_AGE) would leak one per thread, while
# opening a connection per request costs more than checking a small update.
# NOTE: off by default because pytest-django's switch to a test database
# does not reach a pool opened earlier; `make serve` and bench/load.py turn it on.
DB_POOL_SIZE = read_int("FLO_DB_POOL_SIZE", 0, minimum=0)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and DB_POOL_SIZE:
    DATABASES["default"]["OPTIONS"] = {"pool": {"min_size": 1, "max_size": DB_POOL_SIZE, "timeout": 30}}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        # WAL lets readers proceed while one writer commits. IMMEDIATE takes
        # the write lock at BEGIN, so two transactions never deadlock while
        # upgrading a read lock. The busy timeout (seconds) makes a writer
        # wait for the lock instead of failing at once.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": read_int("FLO_SQLITE_BUSY_TIMEOUT_SECONDS", 20, minimum=1),
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis: Celery broker and result backend and the channel layer. Without it,
# tasks run eagerly and the channel layer lives in process memory.
REDIS_URL = read_str("REDIS_URL")
# Prefix of FLO's own Redis keys (nonces, the cache and the channel layer),
# so several deployments or test runs can share one Redis server. Celery's
# keys are not prefixed: a deployment sets its own FLO_CELERY_QUEUE, and its
# task results expire after a day.
FLO_REDIS_KEY_PREFIX = read_str("FLO_REDIS_KEY_PREFIX", "flo:")

CELERY_BROKER_URL = REDIS_URL or "memory://localhost/"
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_ALWAYS_EAGER = read_bool("FLO_CELERY_EAGER", REDIS_URL is None)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# Worker processes per Celery worker. The SQLite check refuses more than one
# writer process outside eager mode.
CELERY_WORKER_CONCURRENCY = read_int("FLO_CELERY_CONCURRENCY", 1, minimum=1)
# Queue of FLO's tasks, so several deployments (or test runs) can share one Redis.
CELERY_TASK_DEFAULT_QUEUE = read_str("FLO_CELERY_QUEUE", "flo") or "flo"
# With Redis as broker, a task taken by a worker that dies unacknowledged
# returns to the queue after this many seconds. It must exceed the longest
# task (aggregation has a 600 s time limit), or a slow task runs twice, which
# is harmless because aggregation is idempotent, but wasteful.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": read_int("FLO_CELERY_VISIBILITY_TIMEOUT_SECONDS", 900, minimum=1)}
# Periodic tasks run by `celery beat`: the deadline check settles expired
# rounds and re-sends stalled aggregations; retention runs every 6 hours, so
# an update payload outlives its retention period by at most that long.
FLO_DEADLINE_CHECK_SECONDS = read_int("FLO_DEADLINE_CHECK_SECONDS", 5, minimum=1)
CELERY_BEAT_SCHEDULE = {
    "close-expired-rounds": {"task": "federation.close_expired_rounds", "schedule": float(FLO_DEADLINE_CHECK_SECONDS)},
    "apply-update-retention": {"task": "privacy.apply_update_retention", "schedule": 6 * 3600},
    "delete-orphaned-payloads": {"task": "federation.delete_orphaned_payloads", "schedule": 3600},
}
# A round aggregating for longer than this lost its task (a worker or the
# broker died, or a message was dropped); the deadline check sends it again.
FLO_AGGREGATION_STALL_SECONDS = read_int("FLO_AGGREGATION_STALL_SECONDS", 900, minimum=1)
# Fault tests only: aggregation sleeps this long while it holds the round
# lock, so a test can kill the worker mid-aggregation. Ignored in production.
FLO_FAULT_AGGREGATION_PAUSE_SECONDS = 0 if FLO_ENV == "production" else read_int("FLO_FAULT_AGGREGATION_PAUSE_SECONDS", 0, minimum=0)

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "capacity": 100, "expiry": 60, "prefix": FLO_REDIS_KEY_PREFIX + "asgi"},
        }
    }
else:
    # Channels' in-memory layer with overflow reporting (monitoring.channel_layer).
    CHANNEL_LAYERS = {"default": {"BACKEND": "monitoring.channel_layer.ReportingInMemoryChannelLayer", "CONFIG": {"capacity": 100}}}
# Seconds between two warnings about the same websocket group dropping
# events because a client's queue (the layer's capacity) is full.
FLO_EVENT_OVERFLOW_LOG_SECONDS = read_int("FLO_EVENT_OVERFLOW_LOG_SECONDS", 60, minimum=1)

# Django's cache contains the throttle counts (per node, per enrolling address)
# and the failed sign-in counts of the admin login, so it must be shared by
# every server process: Redis when REDIS_URL is set, else a database table
# created by the federation migrations.
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": FLO_REDIS_KEY_PREFIX + "cache",
            "OPTIONS": {"pool_class": "flo_site.redis_pools.SharedConnectionPool"},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "flo_cache"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = read_str("FLO_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

# The operator console: login page and where a login lands.
LOGIN_URL = "console-login"
LOGIN_REDIRECT_URL = "console-federations"
LOGOUT_REDIRECT_URL = "console-login"

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / ".flo-data" / "static-root"

REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "EXCEPTION_HANDLER": "federation.api.errors.handle_api_exception",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_RATES": {
        "enrolment": read_str("FLO_ENROLMENT_THROTTLE", "30/minute"),
        # Signed requests per node. A device polls its task about once a
        # second (TASK_POLL_SECONDS); the limit stops a compromised device
        # from flooding the server while leaving room for retries.
        "node": read_str("FLO_NODE_THROTTLE", "600/minute"),
    },
}

# OpenAPI schema of the device API, served at /api/schema/ (federation.api.schema).
SPECTACULAR_SETTINGS = {
    "TITLE": "FLO device API",
    "VERSION": "1",
    "OAS_VERSION": "3.1.0",
    "DESCRIPTION": "Signed REST API for devices; see x-error-codes for every error code and its HTTP status.",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "federation.api.schema.add_error_catalogue"],
}

# --- Device protocol -------------------------------------------------------

# Accepted difference, in seconds, between a signed request's timestamp and
# the server clock, in both directions. A nonce is remembered at least this
# long, so a captured request can never be replayed inside the window.
FLO_SIGNATURE_WINDOW_SECONDS = read_int("FLO_SIGNATURE_WINDOW_SECONDS", 300, minimum=1)

# Seconds a used nonce is remembered. A request signed at time T passes the
# timestamp check from T - window to T + window, so a nonce must be kept for
# at least twice the window or a captured request could be replayed.
FLO_NONCE_TTL_SECONDS = read_int("FLO_NONCE_TTL_SECONDS", 2 * FLO_SIGNATURE_WINDOW_SECONDS, minimum=1)
if FLO_NONCE_TTL_SECONDS < 2 * FLO_SIGNATURE_WINDOW_SECONDS:
    raise ConfigurationError(
        f"FLO_NONCE_TTL_SECONDS={FLO_NONCE_TTL_SECONDS} is below twice FLO_SIGNATURE_WINDOW_SECONDS ({2 * FLO_SIGNATURE_WINDOW_SECONDS}); "
        "a replayed request could pass the timestamp check after its nonce was forgotten."
    )
# Store of used nonces, shared by every server process: "redis" (SET NX
# EX, expired by Redis) or "database" (a unique row per node and nonce,
# purged by the API). Redis is the default whenever REDIS_URL is set.
FLO_NONCE_STORE = read_choice("FLO_NONCE_STORE", "redis" if REDIS_URL else "database", ("redis", "database"))
if FLO_NONCE_STORE == "redis" and not REDIS_URL:
    raise ConfigurationError("FLO_NONCE_STORE=redis needs REDIS_URL.")

# Seconds a node's replaced secret keeps verifying requests after a
# rotation the device requests without naming a grace period. It covers
# requests the device signed, or queued offline, before it stored the new
# secret. At most 7 days (federation.services.nodes.MAX_SECRET_GRACE_SECONDS).
FLO_SECRET_GRACE_SECONDS = read_int("FLO_SECRET_GRACE_SECONDS", 3600, minimum=0)
if FLO_SECRET_GRACE_SECONDS > 7 * 24 * 3600:
    raise ConfigurationError(f"FLO_SECRET_GRACE_SECONDS={FLO_SECRET_GRACE_SECONDS} is above the maximum of 604800 seconds (7 days).")

# Hard cap, in bytes, on any request body, enforced by the ASGI layer before
# Django buffers it. The update endpoint also enforces a tighter limit
# derived from the federation's model size.
FLO_MAX_REQUEST_BYTES = read_int("FLO_MAX_REQUEST_BYTES", 64 * 1024 * 1024, minimum=1024)
# Bytes allowed on top of the raw tensor data in an update (its JSON header).
FLO_UPDATE_HEADER_ALLOWANCE_BYTES = read_int("FLO_UPDATE_HEADER_ALLOWANCE_BYTES", 64 * 1024, minimum=1024)
# Django's own cap on request.body. It equals the ASGI cap, so the
# two limits agree and the API returns 413 in JSON.
DATA_UPLOAD_MAX_MEMORY_SIZE = FLO_MAX_REQUEST_BYTES

# Largest example count a device may report for one update. Larger claims
# are rejected, so one device cannot take over the weighted average.
FLO_MAX_EXAMPLES = read_int("FLO_MAX_EXAMPLES", 10**9, minimum=1)

# Key for node secrets at rest: 32 bytes, URL-safe base64. Development
# generates one into FLO_DATA_DIR with 0600 permissions; production must set it.
FLO_NODE_SECRET_KEY = read_str("FLO_NODE_SECRET_KEY")
if FLO_NODE_SECRET_KEY is None and IS_PRODUCTION:
    raise ConfigurationError("FLO_NODE_SECRET_KEY (or FLO_NODE_SECRET_KEY_FILE) must be set when FLO_ENV=production.")

# Bearer token that GET /metrics requires (Prometheus scrape_config
# authorization). When it is unset, /metrics returns 404, so metrics are never public by accident.
FLO_METRICS_TOKEN = read_str("FLO_METRICS_TOKEN")

# Password of the user that `manage.py create_user` creates; unset, the command prompts for it.
FLO_NEW_USER_PASSWORD = read_str("FLO_NEW_USER_PASSWORD")
# --- Operator console --------------------------------------------------------

# Session and CSRF cookies: never readable by scripts, and not sent with
# cross-site subrequests or POSTs. Production also sends them over HTTPS only.
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
# An operator session ends after 8 hours, a working day.
SESSION_COOKIE_AGE = 8 * 3600
CSRF_COOKIE_HTTPONLY = True
CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# Failed admin sign-ins allowed per username and client address before that
# pair is locked out, and the lockout window in seconds from the first failure.
FLO_LOGIN_MAX_FAILURES = read_int("FLO_LOGIN_MAX_FAILURES", 5, minimum=1)
FLO_LOGIN_LOCKOUT_SECONDS = read_int("FLO_LOGIN_LOCKOUT_SECONDS", 900, minimum=1)

if IS_PRODUCTION:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    # Redirect plain HTTP to HTTPS, except the health check that load
    # balancers call over plain HTTP. Turn it off only when a proxy in front
    # already redirects.
    SECURE_SSL_REDIRECT = read_bool("FLO_SSL_REDIRECT", True)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
    # Behind a TLS-terminating proxy that sets X-Forwarded-Proto, Django must
    # trust that header to see requests as HTTPS. Set it only if the proxy
    # overwrites the header that clients send.
    if read_bool("FLO_TRUST_X_FORWARDED_PROTO", False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    # HTTP Strict Transport Security, in seconds; one year by default.
    SECURE_HSTS_SECONDS = read_int("FLO_HSTS_SECONDS", 365 * 24 * 3600, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = read_bool("FLO_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = read_bool("FLO_HSTS_PRELOAD", True)

LOG_LEVEL = read_choice("FLO_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "federation": {"level": LOG_LEVEL},
        "privacy": {"level": LOG_LEVEL},
        "monitoring": {"level": LOG_LEVEL},
        "flo_site": {"level": LOG_LEVEL},
        "django.request": {"level": "ERROR"},
        # channels_redis 4.3 logs every group_send that finds a full channel at INFO.
        # NOTE: with Redis those drops are therefore neither logged nor counted
        # (the in-memory layer reports them through monitoring.events); consoles
        # still catch up from the snapshot they reload every 30 seconds.
        "channels_redis": {"level": "WARNING"},
    },
}
