"""Console forms. They check field shapes; create_federation checks the configuration as a whole."""

from django import forms

from federation.models import Federation, Node

PRIVACY_MODES = [("none", "No differential privacy"), ("central", "User-level central DP (server adds noise)"), ("local", "Record-level DP-SGD on each device")]
MODEL_KINDS = [("softmax_regression", "Softmax regression"), ("mlp", "MLP with one hidden layer")]


class FederationForm(forms.Form):
    name = forms.CharField(max_length=200)
    model_kind = forms.ChoiceField(choices=MODEL_KINDS, initial="softmax_regression")
    num_features = forms.IntegerField(min_value=1, initial=64)
    num_classes = forms.IntegerField(min_value=2, initial=10)
    hidden_units = forms.IntegerField(min_value=1, required=False, help_text="MLP only: units of the hidden layer.")
    learning_rate = forms.FloatField(min_value=0, initial=0.5)
    batch_size = forms.IntegerField(min_value=1, initial=16)
    local_epochs = forms.IntegerField(min_value=1, initial=1)
    round_size = forms.IntegerField(min_value=1, initial=10, help_text="Nodes selected per round, including spares for dropouts.")
    min_updates = forms.IntegerField(min_value=1, initial=8, help_text="Fewest accepted updates a round may close with.")
    round_deadline_seconds = forms.IntegerField(min_value=1, initial=600)
    max_rounds = forms.IntegerField(min_value=1, initial=100)
    aggregation_rule = forms.ChoiceField(choices=Federation.AggregationRule.choices, initial="fedavg")
    quarantine_threshold = forms.FloatField(required=False, help_text="Reputation below which a node is quarantined, in (0, 1); empty turns quarantine off.")
    privacy_mode = forms.ChoiceField(choices=PRIVACY_MODES, initial="none")
    dp_delta = forms.FloatField(initial=1e-5, help_text="Delta of every (epsilon, delta) guarantee, at most 1e-3.")
    target_epsilon = forms.FloatField(required=False, help_text="Central DP: epsilon of the whole federation over max_rounds rounds.")
    participation_rate = forms.FloatField(required=False, help_text="Central DP: probability that each eligible node joins a round.")
    central_clip_norm = forms.FloatField(required=False, help_text="Central DP: L2 norm each update is clipped to.")
    accountant = forms.ChoiceField(choices=[("pld", "PLD"), ("rdp", "RDP")], initial="pld")
    node_epsilon_budget = forms.FloatField(required=False, help_text="Record-level DP: epsilon each node may spend.")
    dp_clip_norm = forms.FloatField(required=False, help_text="Record-level DP: per-example clip norm.")
    dp_noise_multiplier = forms.FloatField(required=False)
    dp_sampling_rate = forms.FloatField(required=False)
    dp_local_steps = forms.IntegerField(required=False, min_value=1)

    CENTRAL_FIELDS = ("target_epsilon", "participation_rate", "central_clip_norm")
    LOCAL_FIELDS = ("node_epsilon_budget", "dp_clip_norm", "dp_noise_multiplier", "dp_sampling_rate", "dp_local_steps")

    def clean(self):
        data = super().clean()
        required = {"central": self.CENTRAL_FIELDS, "local": self.LOCAL_FIELDS}.get(data.get("privacy_mode"), ())
        for field in required:
            if data.get(field) is None:
                self.add_error(field, "Required for this privacy mode.")
        if data.get("model_kind") == "mlp" and data.get("hidden_units") is None:
            self.add_error("hidden_units", "Required for an MLP.")
        return data

    def to_config(self) -> dict:
        """Return the keyword arguments of create_federation for the cleaned data."""
        data = self.cleaned_data
        model_spec = {"kind": data["model_kind"], "num_features": data["num_features"], "num_classes": data["num_classes"]}
        if data["model_kind"] == "mlp":
            model_spec["hidden_units"] = data["hidden_units"]
        plan = {"learning_rate": data["learning_rate"], "batch_size": data["batch_size"], "local_epochs": data["local_epochs"]}
        config = {
            "name": data["name"],
            "model_spec": model_spec,
            "training_plan": plan,
            "round_size": data["round_size"],
            "min_updates": data["min_updates"],
            "round_deadline_seconds": data["round_deadline_seconds"],
            "max_rounds": data["max_rounds"],
            "aggregation_rule": data["aggregation_rule"],
            "quarantine_threshold": data["quarantine_threshold"],
            "dp_delta": data["dp_delta"],
        }
        if data["privacy_mode"] == "central":
            config["central_dp"] = {
                "target_epsilon": data["target_epsilon"],
                "participation_rate": data["participation_rate"],
                "clip_norm": data["central_clip_norm"],
                "accountant": data["accountant"],
            }
        elif data["privacy_mode"] == "local":
            plan["dp"] = {
                "clip_norm": data["dp_clip_norm"],
                "noise_multiplier": data["dp_noise_multiplier"],
                "sampling_rate": data["dp_sampling_rate"],
                "local_steps": data["dp_local_steps"],
            }
            config["node_epsilon_budget"] = data["node_epsilon_budget"]
        return config


class EnrolmentTokensForm(forms.Form):
    count = forms.IntegerField(min_value=1, max_value=1000, initial=10)
    ttl_seconds = forms.IntegerField(min_value=60, max_value=30 * 86400, initial=86400, label="Lifetime (seconds)")
    sensitivity_class = forms.ChoiceField(choices=Node.SensitivityClass.choices, initial=Node.SensitivityClass.PERSONAL)


class ReasonForm(forms.Form):
    reason = forms.CharField(max_length=500, required=False)
