"""Federations, enrolled nodes, rounds, model versions, updates and reputation."""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q


class Federation(models.Model):
    """One training job: a model, a training plan and the rules for its rounds."""

    class Status(models.TextChoices):
        DRAFT = "draft"
        RUNNING = "running"
        PAUSED = "paused"
        COMPLETED = "completed"
        STOPPED = "stopped"

    class AggregationRule(models.TextChoices):
        """Aggregation rules of federation.aggregation.robust, where each one is defined."""

        FEDAVG = "fedavg", "Example-weighted FedAvg"
        MEDIAN = "median", "Coordinate-wise median"
        TRIMMED_MEAN = "trimmed_mean", "Coordinate-wise trimmed mean"
        KRUM = "krum", "Krum"
        MULTI_KRUM = "multi_krum", "Multi-Krum"
        BULYAN = "bulyan", "Bulyan"
        NORM_BOUNDING = "norm_bounding", "Norm bounding"
        CENTERED_CLIPPING = "centered_clipping", "Centered clipping"

    class ServerOptimizer(models.TextChoices):
        FEDAVGM = "fedavgm", "FedAvgM (momentum 0 is plain FedAvg)"
        FEDADAM = "fedadam", "FedAdam"
        FEDYOGI = "fedyogi", "FedYogi"
        FEDADAGRAD = "fedadagrad", "FedAdagrad"

    name = models.CharField(max_length=200, unique=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    # Why the federation stopped or completed, in a sentence for operators.
    status_reason = models.TextField(blank=True, default="")
    # Model architecture, validated by flo_client.models.validate_model_spec.
    model_spec = models.JSONField()
    # Device-side training plan (flo_client.training.TrainingPlan.to_dict()),
    # including the local DP-SGD parameters when record-level DP is on.
    training_plan = models.JSONField()
    aggregation_rule = models.CharField(max_length=30, choices=AggregationRule.choices, default=AggregationRule.FEDAVG)
    # The rule's parameters, federation.aggregation.robust.RuleConfig.to_dict() without the name.
    aggregation_params = models.JSONField(default=dict, blank=True)
    # Target delta at which every epsilon of this federation is reported.
    dp_delta = models.FloatField(default=1e-5)
    # Epsilon each node may spend over the whole federation (record-level DP).
    node_epsilon_budget = models.FloatField(null=True, blank=True)
    # Nodes selected per round, including over-selection for dropouts.
    round_size = models.PositiveIntegerField()
    # Accepted updates that close a round early; the deadline closes it with
    # what arrived if this many are present then.
    min_updates = models.PositiveIntegerField()
    # Accepted updates that close a round before its deadline; null means
    # min_updates. Setting it to round_size waits for every selected node.
    target_updates = models.PositiveIntegerField(null=True, blank=True)
    round_deadline_seconds = models.PositiveIntegerField(default=600)
    max_rounds = models.PositiveIntegerField(default=100)
    # Most nodes that may be enrolled at once; revoked nodes do not count.
    # Null means no limit. Enrolment beyond it fails with federation_full.
    max_nodes = models.PositiveIntegerField(null=True, blank=True)
    # A node not seen for longer than this is not selected.
    node_liveness_seconds = models.PositiveIntegerField(default=3600)
    # Seed of the selection generator, so runs can be reproduced. Central DP
    # samples participants from the operating system's CSPRNG instead.
    selection_seed = models.BigIntegerField(default=0)

    # --- User-level central DP-FedAvg (privacy.central_dp) -----------------
    central_dp = models.BooleanField(default=False)
    # Poisson participation rate q: each eligible node joins a round independently with this probability.
    participation_rate = models.FloatField(null=True, blank=True)
    # Epsilon the whole federation may spend at dp_delta over max_rounds rounds.
    target_epsilon = models.FloatField(null=True, blank=True)
    # Noise multiplier z of the combined release (update sum and, with
    # adaptive clipping, the unclipped count), calibrated to target_epsilon.
    central_noise_multiplier = models.FloatField(null=True, blank=True)
    # L2 clip norm C of each update; adaptive clipping moves it every round.
    clip_norm = models.FloatField(null=True, blank=True)
    # privacy.adaptive_clipping.AdaptiveClippingConfig as a dict, or null for a fixed clip norm.
    adaptive_clipping = models.JSONField(null=True, blank=True)
    # Server optimizer (federation.aggregation.server_optimizers) applied to
    # each round's aggregate update: its name, step size, FedAvgM momentum,
    # the adaptive optimizers' beta1, beta2 and tau, and the state carried
    # between rounds (velocity or moments) in the tensor wire format.
    server_optimizer = models.CharField(max_length=20, choices=ServerOptimizer.choices, default=ServerOptimizer.FEDAVGM)
    server_learning_rate = models.FloatField(default=1.0)
    server_momentum = models.FloatField(default=0.0)
    server_optimizer_params = models.JSONField(default=dict, blank=True)
    server_optimizer_state = models.BinaryField(null=True, blank=True)
    accountant = models.CharField(max_length=10, choices=[("pld", "PLD"), ("rdp", "RDP")], default="pld")

    # --- Reputation (federation.aggregation.reputation) ---------------------
    # A node whose score falls below this is quarantined automatically; null
    # keeps scores up to date without quarantining anyone.
    quarantine_threshold = models.FloatField(null=True, blank=True)

    # --- Record-level (local) DP budgets ------------------------------------
    # Epsilon allocation per data-sensitivity class; overrides node_epsilon_budget for nodes of that class.
    sensitivity_budgets = models.JSONField(default=dict, blank=True)
    # Participations each node's allocation must last. When set, every node
    # trains with the noise of its class's schedule (privacy.schedules); when
    # null, all use the training plan's noise and the allocation caps participations.
    planned_participations = models.PositiveIntegerField(null=True, blank=True)
    # How a node's allocation is spread over its planned participations: "even" or "front_loaded".
    spending_schedule = models.CharField(max_length=20, choices=[("even", "Even per round"), ("front_loaded", "Front-loaded")], default="even")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(min_updates__gte=1), name="federation_min_updates_positive"),
            models.CheckConstraint(condition=Q(round_size__gte=models.F("min_updates")), name="federation_round_size_covers_min_updates"),
        ]

    def __str__(self):
        return self.name


class Node(models.Model):
    """An enrolled device. It signs requests with a secret stored encrypted."""

    class Status(models.TextChoices):
        ACTIVE = "active"
        QUARANTINED = "quarantined"
        REVOKED = "revoked"

    class SensitivityClass(models.TextChoices):
        """Sensitivity class of a node's data, which sets its epsilon allocation."""

        PUBLIC = "public"
        INTERNAL = "internal"
        PERSONAL = "personal"
        # Special categories of personal data in the sense of GDPR Art. 9 (health, biometrics, ...).
        SPECIAL_CATEGORY = "special_category"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    federation = models.ForeignKey(Federation, on_delete=models.CASCADE, related_name="nodes")
    display_name = models.CharField(max_length=200)
    sensitivity_class = models.CharField(max_length=20, choices=SensitivityClass.choices, default=SensitivityClass.PERSONAL)
    # AES-GCM ciphertext of the HMAC secret (federation.crypto); never the secret itself.
    secret_ciphertext = models.BinaryField()
    # After a rotation, the replaced secret (encrypted the same way) keeps
    # verifying requests until previous_secret_expires_at, so requests the
    # device signed before it stored the new secret still go through.
    previous_secret_ciphertext = models.BinaryField(null=True, blank=True)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True)
    secret_rotated_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.ACTIVE)
    status_reason = models.TextField(blank=True, default="")
    enrolled_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["federation", "status"])]

    def __str__(self):
        return f"{self.display_name} ({self.id})"


class EnrolmentToken(models.Model):
    """A one-time, expiring token that lets one device enrol. Only its hash is stored."""

    federation = models.ForeignKey(Federation, on_delete=models.CASCADE, related_name="enrolment_tokens")
    token_sha256 = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    node = models.OneToOneField(Node, null=True, blank=True, on_delete=models.SET_NULL, related_name="enrolment_token")
    # The node enrolled with this token gets this data-sensitivity class.
    sensitivity_class = models.CharField(max_length=20, choices=Node.SensitivityClass.choices, default=Node.SensitivityClass.PERSONAL)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)


class ModelVersion(models.Model):
    """Global weights after a round, in the tensor wire format (float32)."""

    federation = models.ForeignKey(Federation, on_delete=models.CASCADE, related_name="model_versions")
    version = models.PositiveIntegerField()
    weights = models.BinaryField()
    weights_sha256 = models.CharField(max_length=64)
    # Evaluation metrics reported for this version, e.g. accuracy on a held-out split.
    metrics = models.JSONField(default=dict, blank=True)
    num_updates = models.PositiveIntegerField(default=0)
    total_examples = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["federation", "version"], name="model_version_unique_per_federation")]
        ordering = ["federation", "version"]


class TrainingRound(models.Model):
    """One round: open -> aggregating -> closed, or failed with a reason."""

    class State(models.TextChoices):
        OPEN = "open"
        AGGREGATING = "aggregating"
        CLOSED = "closed"
        FAILED = "failed"

    federation = models.ForeignKey(Federation, on_delete=models.CASCADE, related_name="rounds")
    number = models.PositiveIntegerField()
    state = models.CharField(max_length=20, choices=State.choices, default=State.OPEN)
    base_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="rounds_trained_from")
    result_version = models.OneToOneField(ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="produced_by_round")
    selected_nodes = models.ManyToManyField(Node, related_name="selected_rounds", blank=True)
    opened_at = models.DateTimeField(auto_now_add=True)
    deadline_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)
    # When the round last entered, or was re-sent to, aggregation; the
    # deadline check re-sends a round stuck aggregating for too long.
    aggregation_started_at = models.DateTimeField(null=True, blank=True)
    failure_reason = models.TextField(blank=True, default="")
    # Central DP only: eligible nodes when the round opened, the sampling
    # rate, and the fixed denominator q * population of the average.
    population = models.PositiveIntegerField(null=True, blank=True)
    participation_rate = models.FloatField(null=True, blank=True)
    expected_participants = models.FloatField(null=True, blank=True)
    clip_norm = models.FloatField(null=True, blank=True)
    num_clipped = models.PositiveIntegerField(null=True, blank=True)
    # How the round was aggregated: the rule, whether it works coordinate by
    # coordinate (its result need not be any node's update), the nodes a
    # selection rule (Krum, Multi-Krum, Bulyan) kept, and the nodes the
    # round's reputation update quarantined.
    aggregation_report = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["federation", "number"], name="round_number_unique_per_federation"),
            # At most one round in flight per federation, enforced by the database.
            models.UniqueConstraint(
                fields=["federation"], condition=Q(state__in=["open", "aggregating"]), name="one_active_round_per_federation"
            ),
        ]
        ordering = ["federation", "number"]


class ModelUpdate(models.Model):
    """A node's model delta for one round, stored in the tensor wire format."""

    class Status(models.TextChoices):
        ACCEPTED = "accepted"
        REJECTED = "rejected"

    round = models.ForeignKey(TrainingRound, on_delete=models.CASCADE, related_name="updates")
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="updates")
    # Integer count of local training examples; BigInteger so no sum of
    # counts can wrap around. Bounded by settings.FLO_MAX_EXAMPLES.
    num_examples = models.BigIntegerField()
    # Name of the payload (the tensor wire format) in the update store
    # (federation.services.update_store); empty once retention cleared it.
    payload_file = models.CharField(max_length=200, blank=True, default="")
    payload_bytes = models.PositiveBigIntegerField(default=0)
    payload_sha256 = models.CharField(max_length=64)
    l2_norm = models.FloatField()
    metrics = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.ACCEPTED)
    # Set when aggregation leaves out an update it had accepted.
    rejection_reason = models.TextField(blank=True, default="")
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # First submission wins: a second one from the same node fails here
            # even when both race past the service's own check.
            models.UniqueConstraint(fields=["round", "node"], name="one_update_per_node_per_round"),
            models.CheckConstraint(condition=Q(num_examples__gte=1), name="update_num_examples_positive"),
        ]


class Reputation(models.Model):
    """A node's standing in [0, 1], updated after every round that selected it."""

    node = models.OneToOneField(Node, on_delete=models.CASCADE, related_name="reputation")
    score = models.FloatField(default=1.0)
    accepted_count = models.PositiveIntegerField(default=0)
    rejected_count = models.PositiveIntegerField(default=0)
    # Rounds that selected the node but got no update from it before they closed.
    dropout_count = models.PositiveIntegerField(default=0)
    # The latest round's outcome in [0, 1] and its parts, for operators.
    last_outcome = models.FloatField(null=True, blank=True)
    last_components = models.JSONField(default=dict, blank=True)
    last_round_number = models.PositiveIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)


class UsedNonce(models.Model):
    """A nonce seen in a signed request, kept for the signature window."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="+")
    nonce = models.CharField(max_length=64)
    seen_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["node", "nonce"], name="nonce_unique_per_node")]
        indexes = [models.Index(fields=["seen_at"])]


class AuditEntry(models.Model):
    """Audit record of an operator action or lifecycle event: actor, action, time and address."""

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    # "system", "node:<id>" or a username, kept even if the user is deleted.
    actor_label = models.CharField(max_length=200)
    action = models.CharField(max_length=100)
    federation = models.ForeignKey(Federation, null=True, blank=True, on_delete=models.CASCADE, related_name="audit_entries")
    target = models.CharField(max_length=200, blank=True, default="")
    details = models.JSONField(default=dict, blank=True)
    remote_addr = models.GenericIPAddressField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
