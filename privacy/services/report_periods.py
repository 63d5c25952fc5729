"""Report periods: date and time bounds read in the configured time zone (settings.TIME_ZONE)."""

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings

from privacy.exceptions import InvalidReportPeriod


@dataclass(frozen=True)
class ReportPeriod:
    """A half-open interval [start, end) of aware datetimes; None leaves that side open."""

    start: datetime | None
    end: datetime | None

    def contains_filter(self, field: str) -> dict:
        """Return queryset filter arguments that keep rows whose `field` lies in the period."""
        lookups = {}
        if self.start is not None:
            lookups[f"{field}__gte"] = self.start
        if self.end is not None:
            lookups[f"{field}__lt"] = self.end
        return lookups


def local_time_zone() -> ZoneInfo:
    return ZoneInfo(settings.TIME_ZONE)


def parse_period(start: str | None, end: str | None) -> ReportPeriod:
    """Read the bounds of a report period.

    A date (YYYY-MM-DD) means a whole day in the configured time zone: a
    start date begins at its local midnight and an end date includes its
    whole local day. A datetime with an offset is taken as given; one
    without an offset is local time.

    Raises:
        InvalidReportPeriod: for an unreadable bound or an end before the start.
    """
    period = ReportPeriod(start=_parse_bound(start, "start", is_end=False), end=_parse_bound(end, "end", is_end=True))
    if period.start is not None and period.end is not None and period.end <= period.start:
        raise InvalidReportPeriod(f"The period ends ({end}) before it starts ({start}); pass an end after the start.")
    return period


def _parse_bound(text: str | None, name: str, *, is_end: bool) -> datetime | None:
    if text is None or text.strip() == "":
        return None
    text = text.strip()
    zone = local_time_zone()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            if is_end:
                day += timedelta(days=1)
            # Local midnight, so day boundaries follow the configured zone, not UTC.
            return datetime.combine(day, time.min, tzinfo=zone)
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise InvalidReportPeriod(f"{name}={text[:40]!r} is not a date (YYYY-MM-DD) or an ISO 8601 datetime.") from error
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)
