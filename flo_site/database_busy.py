"""Lock conflicts that a request may pass when it is sent again, and the 503 response to them.

A transaction that loses a lock conflict is rolled back whole, so the
request may be sent again:

- SQLite: "database is locked" after the busy timeout, or "database table
  is locked".
- PostgreSQL, by SQLSTATE: 40P01 deadlock detected, 40001 serialization
  failure, 55P03 lock not available (lock_timeout or NOWAIT).

The API converts them to `database_busy` (federation.api.errors), and
this middleware to a 503 for the console and the admin site: an HTML page,
or JSON for a request that accepts JSON. Both set Retry-After.
"""

import logging

from django.db import OperationalError
from django.http import JsonResponse
from django.shortcuts import render

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
        if "application/json" in request.headers.get("Accept", ""):
            response = JsonResponse({"code": "database_busy", "detail": CONSOLE_MESSAGE}, status=503)
        else:
            response = render(request, "console/error.html", {"message": CONSOLE_MESSAGE}, status=503)
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
