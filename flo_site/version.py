"""FLO's release version, stated in exported reports; raise it with every release."""

FLO_VERSION = "0.1.0"
