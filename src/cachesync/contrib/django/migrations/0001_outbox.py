"""Creates the outbox table (``CACHESYNC["OUTBOX_TABLE"]``, default ``cachesync_outbox``) on each database."""

from __future__ import annotations

from typing import Any

from django.db import migrations


def create(apps: Any, schema_editor: Any) -> None:
    from cachesync.outbox import ddl

    from ..core import dialect_for, settings_value

    for stmt in ddl(dialect_for(schema_editor.connection), settings_value("OUTBOX_TABLE")):
        schema_editor.execute(stmt, params=None)


def drop(apps: Any, schema_editor: Any) -> None:
    from ..core import settings_value

    schema_editor.execute(f"DROP TABLE IF EXISTS {settings_value('OUTBOX_TABLE')}", params=None)


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [migrations.RunPython(create, drop, atomic=False)]
