"""Prometheus metrics of this process, served by GET /metrics.

Rounds by state and updates by status are read from the database at scrape
time, so every process reports the same totals. The other metrics count
events in this process only: behind several uvicorn workers each worker
keeps its own counters, and aggregation durations are observed in the
process that aggregates (a Celery worker in production mode, which serves no
/metrics).
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)

API_REJECTIONS = Counter("flo_api_rejections_total", "Device API requests rejected, by error code.", ["code"], registry=REGISTRY)
AGGREGATION_SECONDS = Histogram(
    "flo_aggregation_duration_seconds",
    "Wall time of aggregating one round, in seconds.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
WEBSOCKET_CLIENTS = Gauge("flo_console_websocket_clients", "Console websockets connected to this process.", registry=REGISTRY)
EVENTS_PUBLISHED = Counter("flo_console_events_published_total", "Federation events sent to the channel layer, by kind.", ["kind"], registry=REGISTRY)
EVENTS_DROPPED = Counter("flo_console_events_dropped_total", "Federation events dropped because a console socket's queue was full.", registry=REGISTRY)


class DatabaseCollector:
    """Rounds by state and updates by status, counted in the database at each scrape."""

    def collect(self):
        from django.db.models import Count

        from federation.models import ModelUpdate, TrainingRound

        rounds = GaugeMetricFamily("flo_rounds", "Training rounds by state, all federations.", labels=["state"])
        round_counts = dict(TrainingRound.objects.values_list("state").annotate(count=Count("id")).order_by())
        for state in TrainingRound.State.values:
            rounds.add_metric([state], round_counts.get(state, 0))
        yield rounds

        updates = GaugeMetricFamily("flo_updates", "Stored model updates by status, all federations.", labels=["status"])
        update_counts = dict(ModelUpdate.objects.values_list("status").annotate(count=Count("id")).order_by())
        for status in ModelUpdate.Status.values:
            updates.add_metric([status], update_counts.get(status, 0))
        yield updates

    def describe(self):
        # Without describe(), registering would call collect() and query the database at import time.
        return []


REGISTRY.register(DatabaseCollector())
