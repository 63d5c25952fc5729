"""Create the groups of the operator roles (flo_site.roles)."""

from django.db import migrations

from flo_site.roles import ensure_groups


def create_role_groups(apps, schema_editor):
    ensure_groups(apps.get_model("auth", "Group"))


class Migration(migrations.Migration):

    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("privacy", "0002_central_dp_and_sensitivity"),
    ]

    # Reversing leaves the groups in place: they may have members by then.
    operations = [migrations.RunPython(create_role_groups, migrations.RunPython.noop)]
