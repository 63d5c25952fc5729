from django.contrib import admin

from privacy.models import ComplianceProfile, FederationPrivacyLedgerEntry, PrivacyBudget, PrivacyLedgerEntry


@admin.register(PrivacyBudget)
class PrivacyBudgetAdmin(admin.ModelAdmin):
    list_display = ("node", "epsilon_spent", "epsilon_allocated", "delta", "updated_at")


@admin.register(PrivacyLedgerEntry)
class PrivacyLedgerEntryAdmin(admin.ModelAdmin):
    list_display = ("created_at", "node", "round", "mechanism", "noise_multiplier", "sampling_rate", "steps", "epsilon_after", "delta")
    list_filter = ("mechanism",)


@admin.register(FederationPrivacyLedgerEntry)
class FederationPrivacyLedgerEntryAdmin(admin.ModelAdmin):
    list_display = ("created_at", "federation", "round", "noise_multiplier", "sampling_rate", "steps", "accountant", "epsilon_after", "delta")
    list_filter = ("federation",)


@admin.register(ComplianceProfile)
class ComplianceProfileAdmin(admin.ModelAdmin):
    list_display = ("federation", "organisation", "controller_name", "legal_basis", "update_retention_days", "updated_at")
