"""Errors of the privacy app, in the API's `{"code", "detail"}` scheme."""

from federation.exceptions import FloError


class BudgetExhausted(FloError):
    status_code = 403
    code = "budget_exhausted"


class CentralBudgetExhausted(FloError):
    status_code = 409
    code = "central_budget_exhausted"
