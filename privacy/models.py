"""Per-node privacy budgets and the ledger of privacy-spending events."""

from django.db import models
from django.db.models import F, Q


class PrivacyBudget(models.Model):
    """A node's epsilon allocation and its spend so far, both at the federation's delta.

    `epsilon_spent` is the composition of every ledger event of the node by
    the RDP accountant, never a sum of per-round epsilons. The database
    refuses a spend above the allocation.
    """

    node = models.OneToOneField("federation.Node", on_delete=models.CASCADE, related_name="privacy_budget")
    epsilon_allocated = models.FloatField()
    delta = models.FloatField()
    epsilon_spent = models.FloatField(default=0.0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(epsilon_spent__lte=F("epsilon_allocated")), name="budget_never_overdrawn"),
            models.CheckConstraint(condition=Q(epsilon_spent__gte=0), name="budget_spent_non_negative"),
        ]

    @property
    def epsilon_remaining(self) -> float:
        return max(self.epsilon_allocated - self.epsilon_spent, 0.0)


class PrivacyLedgerEntry(models.Model):
    """One privacy-spending event: a node released a DP-SGD-trained update.

    Mechanism "local_dp_sgd": `steps` steps of the Poisson-subsampled
    Gaussian mechanism with `sampling_rate` and `noise_multiplier`.
    """

    class Mechanism(models.TextChoices):
        LOCAL_DP_SGD = "local_dp_sgd", "Local DP-SGD (Poisson-subsampled Gaussian)"

    node = models.ForeignKey("federation.Node", on_delete=models.CASCADE, related_name="privacy_ledger")
    round = models.ForeignKey("federation.TrainingRound", on_delete=models.CASCADE, related_name="privacy_ledger")
    mechanism = models.CharField(max_length=30, choices=Mechanism.choices)
    noise_multiplier = models.FloatField()
    sampling_rate = models.FloatField()
    steps = models.PositiveIntegerField()
    delta = models.FloatField()
    # The node's cumulative epsilon after composing this event with all earlier ones.
    epsilon_after = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["node", "round"], name="one_ledger_entry_per_node_per_round")]
        ordering = ["created_at", "id"]


class FederationPrivacyLedgerEntry(models.Model):
    """One release of user-level central DP-FedAvg: a noised aggregate of one round.

    The event is one application of the Poisson-subsampled Gaussian
    mechanism with the round's participation rate and the combined noise
    multiplier (update sum and, with adaptive clipping, the unclipped count).
    It is written in the transaction that writes the round's model version.
    """

    federation = models.ForeignKey("federation.Federation", on_delete=models.CASCADE, related_name="central_privacy_ledger")
    round = models.OneToOneField("federation.TrainingRound", on_delete=models.CASCADE, related_name="central_privacy_entry")
    noise_multiplier = models.FloatField()
    sampling_rate = models.FloatField()
    steps = models.PositiveIntegerField(default=1)
    delta = models.FloatField()
    accountant = models.CharField(max_length=10)
    # The federation's cumulative epsilon after composing this release with all earlier ones.
    epsilon_after = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]


class ComplianceProfile(models.Model):
    """What a federation's privacy report states about the processing, beyond what FLO records itself.

    The controller determines the purposes and means of processing and the
    processor processes on its behalf (GDPR Art. 4(7) and 4(8)). Every text
    field may be left empty; the report then says "not configured".
    """

    class LegalBasis(models.TextChoices):
        """Lawful bases of GDPR Art. 6(1)."""

        CONSENT = "consent", "Consent (GDPR Art. 6(1)(a))"
        CONTRACT = "contract", "Performance of a contract (GDPR Art. 6(1)(b))"
        LEGAL_OBLIGATION = "legal_obligation", "Legal obligation (GDPR Art. 6(1)(c))"
        VITAL_INTERESTS = "vital_interests", "Vital interests (GDPR Art. 6(1)(d))"
        PUBLIC_TASK = "public_task", "Public task (GDPR Art. 6(1)(e))"
        LEGITIMATE_INTERESTS = "legitimate_interests", "Legitimate interests (GDPR Art. 6(1)(f))"

    federation = models.OneToOneField("federation.Federation", on_delete=models.CASCADE, related_name="compliance_profile")
    organisation = models.CharField(max_length=200, blank=True, default="")
    controller_name = models.CharField(max_length=200, blank=True, default="")
    controller_contact = models.TextField(blank=True, default="")
    processor_name = models.CharField(max_length=200, blank=True, default="")
    processor_contact = models.TextField(blank=True, default="")
    data_protection_officer = models.TextField(blank=True, default="")
    purpose = models.TextField(blank=True, default="")
    legal_basis = models.CharField(max_length=30, choices=LegalBasis.choices, blank=True, default="")
    # Further conditions, e.g. the GDPR Art. 9(2) exception for special categories.
    legal_basis_detail = models.TextField(blank=True, default="")
    # Categories of personal data on the devices, e.g. ["health records", "age"].
    data_categories = models.JSONField(default=list, blank=True)
    # Days a device update's payload is kept after it was received; the
    # retention job clears older payloads. Aggregated model versions and the
    # privacy ledger are kept for the federation's lifetime.
    update_retention_days = models.PositiveIntegerField(default=30)
    # How TLS reaches FLO in this deployment (FLO itself serves plain HTTP
    # behind a terminating proxy); the report prints it as stated here.
    transport_security = models.TextField(blank=True, default="")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(update_retention_days__gte=1), name="compliance_retention_at_least_one_day")]

    def __str__(self):
        return f"Compliance profile of federation {self.federation_id}"
