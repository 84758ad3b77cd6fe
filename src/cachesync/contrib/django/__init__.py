"""Django integration (``pip install cachesync[django]``): add ``"cachesync.contrib.django"`` to
``INSTALLED_APPS`` and configure ``CACHESYNC = {...}`` in settings (see docs/django.md).

What is recorded in the outbox **inside the writer's transaction** and invalidated through
``transaction.on_commit`` (the production write path: at once after the commit, and durably by the relay):

* ``Model.save()`` / ``Model.delete()`` and ``QuerySet.delete()`` of a model whose table has a rule (signals
  ``pre_save``/``post_save``, ``pre_delete``/``post_delete``; ``QuerySet.delete()`` sends them per row while cachesync
  listens; the deleted row's key columns are read before the DELETE, so a stale instance still invalidates the row's
  current keys);
  the old image's key columns are read before an UPDATE, so a changed key column invalidates old and new keys;
* ``m2m_changed`` (add/remove/clear): the keys of the instance, and of the through table when it has a rule;
* ``QuerySet.update()``, ``bulk_create()`` and ``bulk_update()`` (no signals): through :class:`CachesyncQuerySet`
  / :data:`CachesyncManager` (use it as the model's manager), which reads the affected rows' key columns
  (``FOR UPDATE``) in the same transaction.

Not covered (write the keys yourself with :func:`record`, or install capture triggers): raw SQL, bulk operations
on a plain manager, and writes by other programs.
"""

from __future__ import annotations

from .core import (
    CachesyncManager,
    CachesyncQuerySet,
    cached,
    cached_get,
    get_cache,
    get_rules,
    get_write_path,
    record,
    settings_value,
)

default_app_config = "cachesync.contrib.django.apps.CachesyncConfig"

__all__ = ["CachesyncManager", "CachesyncQuerySet", "cached", "cached_get", "get_cache", "get_rules",
           "get_write_path", "record", "settings_value"]
