"""Move update payloads out of the database into the update store's files."""

import os
import secrets
from pathlib import Path

from django.conf import settings
from django.db import migrations, models


def move_payloads_to_files(apps, schema_editor):
    ModelUpdate = apps.get_model("federation", "ModelUpdate")
    root = Path(settings.FLO_UPDATE_STORE_DIR)
    updates = ModelUpdate.objects.select_related("round").exclude(payload=b"").only("id", "node_id", "payload", "round__federation_id", "round__number")
    for update in updates.iterator(chunk_size=16):
        body = bytes(update.payload)
        name = f"{update.round.federation_id}/{update.round.number}/{update.node_id}-{secrets.token_hex(8)}.flo"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        ModelUpdate.objects.filter(id=update.id).update(payload_file=name, payload_bytes=len(body))


class Migration(migrations.Migration):
    dependencies = [
        ("federation", "0008_round_aggregation_started_at"),
    ]

    operations = [
        migrations.AddField(
            model_name="modelupdate",
            name="payload_file",
            field=models.CharField(blank=True, default="", max_length=200),
        ),
        migrations.AddField(
            model_name="modelupdate",
            name="payload_bytes",
            field=models.PositiveBigIntegerField(default=0),
        ),
        # NOTE: not reversible: the payload files are not read back into the database.
        migrations.RunPython(move_payloads_to_files, migrations.RunPython.noop),
        migrations.RemoveField(model_name="modelupdate", name="payload"),
    ]
