"""Lock conflicts that a request may pass when it is sent again, and the 503 response to them.

A transaction that loses a lock conflict is rolled back whole, so the
request may be sent again:

- SQLite: "database is locked" after the busy timeout, or "database table
  is locked".
- PostgreSQL, by SQLSTATE: 40P01 deadlock detected, 40001 serialization
  failure, 55P03 lock not available (lock_timeout or NOWAIT).

The API converts them to `database_busy` (federation.api.errors), and
this middleware to a 503 for the console and the admin site: an HTML page,
or JSON for a request that accepts JSON. Both set Retry-After. A conflict
outside a view, such as the session update of SessionMiddleware after the
view has returned, reaches Django's handlers for server errors and bad
requests, which `server_error` and `bad_request` replace with the same 503.

Each of these paths logs the conflict once, as a warning, and marks its
503 with `mark_logged`. Otherwise Django would log the response again at
ERROR, with a traceback where an exception reached its handlers. Alerts
on ERROR would then fire for conflicts that clients retry.
"""

import logging
import sys

from django.db import OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.views import defaults

logger = logging.getLogger(__name__)

# Seconds a client should wait before sending the request again.
RETRY_AFTER_SECONDS = 2
# PostgreSQL SQLSTATE codes of lock conflicts, from the "PostgreSQL Error Codes" appendix.
LOCK_CONFLICT_SQLSTATES = {
    "40P01": "deadlock detected",
    "40001": "serialization failure",
    "55P03": "lock not available",
}
# A console request may commit a change before it fails, for example a
# start whose status change committed before the first round failed to
# open, so the message does not promise that nothing changed.
CONSOLE_MESSAGE = (
    "The request failed because the database was busy with a conflicting change. "
    f"Reload the page to see what changed, and send the request again after {RETRY_AFTER_SECONDS} seconds if it is still needed."
)


def is_database_busy(error: BaseException) -> bool:
    """Return whether `error` is a lock conflict of SQLite or PostgreSQL whose transaction was rolled back."""
    if not isinstance(error, OperationalError):
        return False
    sqlstate = getattr(error.__cause__, "sqlstate", None)
    message = str(error).lower()
    return sqlstate in LOCK_CONFLICT_SQLSTATES or "database is locked" in message or "database table is locked" in message


class DatabaseBusyMiddleware:
    """Django middleware that returns 503 with Retry-After, instead of a server error, when a view loses a lock conflict.

    API views never reach it, because their exception handler returns a response first.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not is_database_busy(exception):
            return None
        user = getattr(request, "user", None)
        user_id = user.pk if user is not None and user.is_authenticated else None
        logger.warning("database busy method=%s path=%s user=%s error=%s", request.method, request.path, user_id, exception)
        if _accepts_json(request):
            return mark_logged(_busy_json())
        return mark_logged(_with_retry_after(render(request, "console/error.html", {"message": CONSOLE_MESSAGE}, status=503)))


def mark_logged(response: HttpResponse) -> HttpResponse:
    """Mark `response` as logged, which Django's log_response checks before it logs an error response, and return it."""
    response._has_been_logged = True
    return response


def server_error(request: HttpRequest) -> HttpResponse:
    """Return 503 with Retry-After for a lock conflict, or Django's own 500 page otherwise (Django's handler500).

    Django calls it while it handles the exception, so sys.exc_info()
    returns it. With DEBUG on, Django shows its debug page instead of
    calling this handler or `bad_request`.
    """
    error = sys.exc_info()[1]
    busy = None if error is None else _busy_error_in_chain(error)
    if busy is None:
        return defaults.server_error(request)
    return _busy_outside_view(request, busy)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Return 503 with Retry-After when a lock conflict caused the error, or Django's 400 page otherwise (Django's handler400).

    SessionMiddleware reports any database error of its session update,
    after the view has returned, as SessionInterrupted, which Django turns
    into a 400 response with a message that the session was deleted. When
    the update lost a lock conflict, the session still exists and the
    request may be sent again.
    """
    busy = _busy_error_in_chain(exception)
    if busy is None:
        return defaults.bad_request(request, exception)
    return _busy_outside_view(request, busy)


def _busy_error_in_chain(error: BaseException) -> BaseException | None:
    """Return the lock conflict that `error` is, or that raised it (its __cause__ or __context__, transitively), or None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if is_database_busy(current):
            return current
        seen.add(id(current))
        # `raise ... from None` hides the context, as in a traceback.
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def _busy_outside_view(request: HttpRequest, busy: BaseException) -> HttpResponse:
    """Log the lock conflict `busy` and build its 503, rendered without the request, whose context would read the user from the database."""
    logger.warning("database busy outside the view method=%s path=%s error=%s", request.method, request.path, busy)
    return mark_logged(_busy_page_outside_view(request))


def _busy_page_outside_view(request: HttpRequest) -> HttpResponse:
    if _accepts_json(request):
        return _busy_json()
    try:
        page = render_to_string("console/error.html", {"message": CONSOLE_MESSAGE})
    except Exception:
        # An error raised here would carry the lock conflict as its context and reach this handler again.
        logger.exception("rendering the database busy page failed; sending plain text path=%s", request.path)
        return _with_retry_after(HttpResponse(CONSOLE_MESSAGE, status=503, content_type="text/plain; charset=utf-8"))
    return _with_retry_after(HttpResponse(page, status=503))


def _accepts_json(request: HttpRequest) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _busy_json() -> HttpResponse:
    return _with_retry_after(JsonResponse({"code": "database_busy", "detail": CONSOLE_MESSAGE}, status=503))


def _with_retry_after(response: HttpResponse) -> HttpResponse:
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response
