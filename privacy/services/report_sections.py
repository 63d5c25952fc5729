"""Fixed statements of the privacy report: parties, processing, DP settings, security measures and retention.

Each function returns a plain dict or list for the report document; the
sentences describe what FLO's code does, so they change with it.
"""

from django.conf import settings

from federation.models import AuditEntry, Federation, ModelUpdate
from privacy.models import ComplianceProfile
from privacy.services.budgets import has_local_dp
from privacy.services.central import update_noise_multiplier

NOT_CONFIGURED = "not configured"
# Data that leaves a device, in the order of the device protocol.
DATA_LEAVING_DEVICES = [
    "model updates: the difference between the locally trained weights and the global model, as float32 tensors",
    "the number of local training examples behind each update",
    "training metrics the device chooses to report (at most 32 numbers, such as loss and accuracy)",
    "protocol metadata: node id, request time, nonce and signature",
]
RAW_DATA_STATEMENT = "Raw training data stays on the devices: no record, feature or label is sent to the server."
# Retention job result recorded in the audit log (privacy.services.retention).
RETENTION_AUDIT_ACTION = "privacy.retention_applied"


def describe_parties(profile: ComplianceProfile | None) -> dict:
    return {
        "organisation": _text(profile, "organisation"),
        "controller": {"name": _text(profile, "controller_name"), "contact": _text(profile, "controller_contact")},
        "processor": {"name": _text(profile, "processor_name"), "contact": _text(profile, "processor_contact")},
        "data_protection_officer": _text(profile, "data_protection_officer"),
    }


def describe_processing(federation: Federation, profile: ComplianceProfile | None) -> dict:
    legal_basis = profile.legal_basis if profile and profile.legal_basis else None
    return {
        "purpose": _text(profile, "purpose"),
        "legal_basis": legal_basis or NOT_CONFIGURED,
        "legal_basis_label": ComplianceProfile.LegalBasis(legal_basis).label if legal_basis else NOT_CONFIGURED,
        "legal_basis_detail": _text(profile, "legal_basis_detail"),
        "data_categories": list(profile.data_categories) if profile and profile.data_categories else [NOT_CONFIGURED],
        "raw_data_leaves_devices": False,
        "raw_data_statement": RAW_DATA_STATEMENT,
        "data_leaving_devices": DATA_LEAVING_DEVICES,
        "model": dict(federation.model_spec),
    }


def describe_dp(federation: Federation) -> dict:
    """Return the DP modes with their mechanism, parameters, accountant and delta."""
    modes = []
    record_level = None
    dp = (federation.training_plan or {}).get("dp")
    if has_local_dp(federation):
        modes.append("record_level_local_dp_sgd")
        record_level = {
            "unit": "record: one training example on one device",
            "mechanism": "DP-SGD on the device (Abadi et al. 2016): Poisson-subsampled Gaussian mechanism",
            "clip_norm": dp.get("clip_norm"),
            "noise_multiplier": dp.get("noise_multiplier"),
            "noise_multiplier_note": "each ledger entry records the noise multiplier actually charged" if federation.planned_participations else "",
            "sampling_rate": dp.get("sampling_rate"),
            "local_steps": dp.get("local_steps"),
            "accountant": "rdp",
            "delta": federation.dp_delta,
            "node_epsilon_budget": federation.node_epsilon_budget,
            "sensitivity_budgets": dict(federation.sensitivity_budgets),
            "spending_schedule": federation.spending_schedule,
            "planned_participations": federation.planned_participations,
        }
    central = None
    if federation.central_dp:
        modes.append("user_level_central_dp_fedavg")
        central = {
            "unit": "user: all data of one device",
            "mechanism": "DP-FedAvg on the server (McMahan et al. 2018): clip each update, add Gaussian noise to the sum once, divide by a fixed denominator",
            "target_epsilon": federation.target_epsilon,
            "noise_multiplier": federation.central_noise_multiplier,
            "update_noise_multiplier": update_noise_multiplier(federation),
            "participation_rate": federation.participation_rate,
            "clip_norm": federation.clip_norm,
            "adaptive_clipping": federation.adaptive_clipping,
            "accountant": federation.accountant,
            "delta": federation.dp_delta,
        }
    return {
        "modes": modes or ["none"],
        "statement": "" if modes else "No differential privacy: updates carry no formal privacy guarantee.",
        "delta": federation.dp_delta,
        "epsilon_reported_at": "every epsilon is reported at the federation's delta",
        "record_level": record_level,
        "central": central,
    }


def describe_security(profile: ComplianceProfile | None) -> list[str]:
    transport = _text(profile, "transport_security")
    if transport == NOT_CONFIGURED:
        cookies = "secure cookies on" if getattr(settings, "SESSION_COOKIE_SECURE", False) else "secure cookies off"
        transport = f"as configured by the deployment ({cookies}); FLO serves HTTP and expects a TLS-terminating proxy in front"
    return [
        f"Device requests are signed with HMAC-SHA256 over method, path, timestamp, nonce and the body's SHA-256; timestamps more than "
        f"{settings.FLO_SIGNATURE_WINDOW_SECONDS} s off and repeated nonces are rejected.",
        "Node secrets are stored encrypted at rest with AES-256-GCM, bound to their node id.",
        "Enrolment tokens are single-use and expiring; only their SHA-256 is stored.",
        "Operators sign in with a password or an API token; privacy reports are limited to the admin and compliance officer roles.",
        f"Transport: {transport}.",
    ]


def describe_retention(federation: Federation, profile: ComplianceProfile | None) -> dict:
    updates = ModelUpdate.objects.filter(round__federation=federation)
    cleared = updates.filter(payload_file="").count()
    last_run = AuditEntry.objects.filter(federation=federation, action=RETENTION_AUDIT_ACTION).order_by("-created_at").first()
    return {
        "update_retention_days": profile.update_retention_days if profile else None,
        "update_policy": (
            f"update payloads are cleared {profile.update_retention_days} days after they were received; the row keeps its counts, status and SHA-256"
            if profile
            else "not configured: update payloads are kept until a retention period is set"
        ),
        "updates_stored_with_payload": updates.count() - cleared,
        "updates_payload_cleared": cleared,
        "model_versions": "kept for the lifetime of the federation",
        "privacy_ledger": "kept for the lifetime of the federation",
        "last_retention_run": {"at": last_run.created_at.isoformat(), **last_run.details} if last_run else None,
    }


def _text(profile: ComplianceProfile | None, field: str) -> str:
    value = getattr(profile, field, "") if profile else ""
    return value if value else NOT_CONFIGURED
