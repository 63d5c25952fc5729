from django.contrib import admin, messages

from federation.exceptions import InvalidNodeState
from federation.forms import ThrottledAdminAuthenticationForm
from federation.models import (
    AuditEntry,
    EnrolmentToken,
    Federation,
    ModelUpdate,
    ModelVersion,
    Node,
    Reputation,
    TrainingRound,
    UsedNonce,
)
from federation.services.audit import record_admin_action
from federation.services.nodes import revoke_node
from federation.services.reputation import reinstate_node

admin.site.login_form = ThrottledAdminAuthenticationForm


class AuditedModelAdmin(admin.ModelAdmin):
    """A model admin that also writes every addition, change and deletion to FLO's audit log, with the operator's address."""

    def log_addition(self, request, obj, message):
        record_admin_action(request, "admin.added", obj, message)
        return super().log_addition(request, obj, message)

    def log_change(self, request, obj, message):
        record_admin_action(request, "admin.changed", obj, message)
        return super().log_change(request, obj, message)

    def log_deletions(self, request, queryset):
        for obj in queryset:
            record_admin_action(request, "admin.deleted", obj)
        return super().log_deletions(request, queryset)


@admin.register(Federation)
class FederationAdmin(AuditedModelAdmin):
    list_display = ("id", "name", "status", "aggregation_rule", "round_size", "min_updates", "node_epsilon_budget", "dp_delta", "created_at")
    list_filter = ("status",)
    search_fields = ("name",)


@admin.register(Node)
class NodeAdmin(AuditedModelAdmin):
    list_display = ("id", "display_name", "federation", "status", "status_reason", "last_seen_at", "enrolled_at")
    list_filter = ("status", "federation")
    search_fields = ("display_name", "id")
    exclude = ("secret_ciphertext",)
    # Status changes go through services so each one is audited.
    readonly_fields = ("status", "status_reason")
    actions = ("reinstate_selected", "revoke_selected")

    @admin.action(description="Revoke selected nodes")
    def revoke_selected(self, request, queryset):
        self._run_node_action(request, queryset, revoke_node, reason="Revoked in the admin site.", status_phrase="is revoked")

    @admin.action(description="Reinstate selected quarantined nodes")
    def reinstate_selected(self, request, queryset):
        self._run_node_action(request, queryset, reinstate_node, reason="Reinstated in the admin site.", status_phrase="is active again")

    def _run_node_action(self, request, queryset, action, *, reason: str, status_phrase: str) -> None:
        # One node in the wrong state gets a warning and does not stop the others.
        for node in queryset:
            try:
                action(node, actor=request.user, remote_addr=request.META.get("REMOTE_ADDR"), reason=reason)
            except InvalidNodeState as error:
                self.message_user(request, error.detail, level=messages.WARNING)
            else:
                self.message_user(request, f"Node {node.display_name} ({node.id}) {status_phrase}.")


@admin.register(EnrolmentToken)
class EnrolmentTokenAdmin(AuditedModelAdmin):
    list_display = ("id", "federation", "created_at", "expires_at", "used_at", "node")
    exclude = ("token_sha256",)


@admin.register(TrainingRound)
class TrainingRoundAdmin(AuditedModelAdmin):
    list_display = ("id", "federation", "number", "state", "opened_at", "deadline_at", "closed_at", "failure_reason")
    list_filter = ("state", "federation")


@admin.register(ModelVersion)
class ModelVersionAdmin(AuditedModelAdmin):
    list_display = ("id", "federation", "version", "num_updates", "total_examples", "metrics", "created_at")
    exclude = ("weights",)


@admin.register(ModelUpdate)
class ModelUpdateAdmin(AuditedModelAdmin):
    list_display = ("id", "round", "node", "num_examples", "l2_norm", "status", "rejection_reason", "received_at")
    list_filter = ("status",)


@admin.register(Reputation)
class ReputationAdmin(AuditedModelAdmin):
    list_display = ("node", "score", "accepted_count", "rejected_count", "dropout_count", "last_round_number", "last_outcome", "updated_at")


@admin.register(AuditEntry)
class AuditEntryAdmin(AuditedModelAdmin):
    list_display = ("created_at", "actor_label", "action", "federation", "target", "remote_addr")
    list_filter = ("action",)
    search_fields = ("actor_label", "target")

    # The audit log is append-only: services write it, and the admin site cannot edit or delete entries.
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(UsedNonce)
class UsedNonceAdmin(admin.ModelAdmin):
    list_display = ("seen_at", "node", "nonce")
    list_filter = ("node__federation",)
