from django.core.management import call_command
from django.db import migrations


def create_cache_table(apps, schema_editor):
    # Without REDIS_URL, Django's cache (throttle counts, failed sign-ins) is
    # the database table named in settings.CACHES, shared by every server
    # process. createcachetable skips tables that exist and non-database
    # caches. After switching from Redis to the database cache, run
    # `manage.py createcachetable` once.
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):
    dependencies = [
        ("federation", "0006_federation_max_nodes"),
    ]

    operations = [
        migrations.RunPython(create_cache_table, migrations.RunPython.noop),
    ]
