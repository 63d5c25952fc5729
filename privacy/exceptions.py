"""Errors of the privacy app, in the API's `{"code", "detail"}` scheme."""

from federation.exceptions import FloError


class BudgetExhausted(FloError):
    status_code = 403
    code = "budget_exhausted"


class CentralBudgetExhausted(FloError):
    status_code = 409
    code = "central_budget_exhausted"


class InvalidReportPeriod(FloError):
    status_code = 400
    code = "invalid_report_period"


class InvalidReportFormat(FloError):
    status_code = 400
    code = "invalid_report_format"


class FederationNotFound(FloError):
    status_code = 404
    code = "federation_not_found"
