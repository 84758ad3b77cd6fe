"""The Django integration against a real database and Redis: saves, deletes, m2m changes and bulk
QuerySet.update()/delete() are recorded in the outbox inside the transaction and invalidated on commit."""

from __future__ import annotations

from django.db import connection, transaction
from django.db.models import F
from django.http import Http404
from django.test import Client, TransactionTestCase

from cachesync.contrib.django import cached_get, get_cache
from cachesync.contrib.django.core import get_outbox, reset
from cachesync.contrib.django.management.commands._base import database_url
from cachesync.contrib.django.management.commands.cachesync_relay import Command as RelayCommand
from cachesync.outbox import OutboxError

from .models import Article, Tag


def invalidated(key: str) -> bool:
    e = get_cache().peek(key)
    return e is not None and "ti" in e and "v" not in e


def fill(*keys: str) -> None:
    for k in keys:
        get_cache().set(k, "cached")


def outbox_keys() -> list[str]:
    import json

    with connection.cursor() as cur:
        cur.execute(f"SELECT cache_keys FROM {get_outbox().table} ORDER BY id")
        return [k for (row,) in cur.fetchall() for k in json.loads(row)]


class IntegrationTests(TransactionTestCase):
    def tearDown(self) -> None:
        reset()

    def test_save_records_in_the_transaction_and_invalidates_on_commit(self) -> None:
        with transaction.atomic():
            a = Article.objects.create(slug="a", title="A")
        self.assertIn(f"article:{a.pk}", outbox_keys())
        fill(f"article:{a.pk}", "article_slug:a", "article_slug:b")
        with transaction.atomic():
            a.slug, a.version = "b", 2
            a.save()
            self.assertFalse(invalidated(f"article:{a.pk}"))  # not before the commit
        for k in (f"article:{a.pk}", "article_slug:a", "article_slug:b"):  # old and new keys
            self.assertTrue(invalidated(k), k)
        self.assertIn(get_cache().peek(f"article:{a.pk}")["fl"], (b"2", "2"))

    def test_rollback_records_and_invalidates_nothing(self) -> None:
        a = Article.objects.create(slug="a", title="A")
        n = len(outbox_keys())
        fill(f"article:{a.pk}")
        with self.assertRaises(RuntimeError), transaction.atomic():
            a.title = "B"
            a.save()
            raise RuntimeError
        self.assertEqual(len(outbox_keys()), n)
        self.assertFalse(invalidated(f"article:{a.pk}"))

    def test_delete_and_queryset_delete(self) -> None:
        a = Article.objects.create(slug="a", title="A")
        b = Article.objects.create(slug="b", title="B")
        c = Article.objects.create(slug="c", title="C")
        fill(f"article:{a.pk}", f"article:{b.pk}", f"article:{c.pk}", "article_slug:c")
        a_pk = a.pk
        a.delete()
        self.assertTrue(invalidated(f"article:{a_pk}"))
        with transaction.atomic():
            Article.objects.filter(slug__in=["b", "c"]).delete()  # bulk: signals per row
        self.assertTrue(invalidated(f"article:{b.pk}") and invalidated(f"article:{c.pk}"))
        self.assertTrue(invalidated("article_slug:c"))

    def test_bulk_queryset_update(self) -> None:
        a = Article.objects.create(slug="a", title="A")
        b = Article.objects.create(slug="b", title="B")
        fill(f"article:{a.pk}", f"article:{b.pk}", "article_slug:a", "article_slug:z")
        with transaction.atomic():
            n = Article.objects.filter(pk=a.pk).update(slug="z", version=F("version") + 1)
            self.assertEqual(n, 1)
            self.assertFalse(invalidated(f"article:{a.pk}"))
        self.assertTrue(invalidated(f"article:{a.pk}") and invalidated("article_slug:a")
                        and invalidated("article_slug:z"))
        self.assertFalse(invalidated(f"article:{b.pk}"))
        self.assertIn("article_slug:z", outbox_keys())
        Article.objects.all().update(title=F("title"))  # an expression on a non-key column: fine, all rows
        self.assertTrue(invalidated(f"article:{b.pk}"))
        with self.assertRaisesRegex(OutboxError, "key column 'slug' to an expression"):
            Article.objects.update(slug=F("title"))
        self.assertEqual(Article.objects.get(pk=b.pk).slug, "b")  # refused before it ran

    def test_m2m_changes(self) -> None:
        a = Article.objects.create(slug="a", title="A")
        t1, t2 = Tag.objects.create(name="x"), Tag.objects.create(name="y")
        fill(f"article_tags:{a.pk}", f"tag:{t1.pk}", f"article:{a.pk}")
        a.tags.add(t1, t2)
        self.assertTrue(invalidated(f"article_tags:{a.pk}") and invalidated(f"tag:{t1.pk}"))
        self.assertTrue(invalidated(f"article:{a.pk}"))
        fill(f"article_tags:{a.pk}")
        t2.articles.remove(a)  # the reverse side
        self.assertTrue(invalidated(f"article_tags:{a.pk}"))
        fill(f"article_tags:{a.pk}")
        a.tags.clear()
        self.assertTrue(invalidated(f"article_tags:{a.pk}"))

    def test_cached_get_and_view_read_your_writes(self) -> None:
        a = Article.objects.create(slug="a", title="A")
        http = Client()
        self.assertEqual(http.get(f"/articles/{a.pk}").json()["title"], "A")
        self.assertEqual(cached_get(Article, id=a.pk)["title"], "A")  # a hit
        for i in range(20):
            with transaction.atomic():
                Article.objects.filter(pk=a.pk).update(title=f"T{i}", version=F("version") + 1)
            self.assertEqual(http.get(f"/articles/{a.pk}").json()["title"], f"T{i}")
        self.assertEqual(http.get("/articles/999999").status_code, 404)
        with self.assertRaises(Http404):
            cached_get(Article, id=999999)
        self.assertEqual(cached_get(Article, instance=True, id=a.pk).slug, "a")

    def test_relay_management_command_delivers_the_outbox(self) -> None:
        a = Article.objects.create(slug="a", title="A")
        self.assertTrue(database_url().split("/")[-1].startswith("test_cachesync_"))
        with self.assertRaises(SystemExit) as ex:
            RelayCommand().run_from_argv(["manage.py", "cachesync_relay", "--once"])
        self.assertEqual(ex.exception.code, 0)
        with connection.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {get_outbox().table}")
            self.assertEqual(cur.fetchone()[0], 0)
        self.assertTrue(invalidated(f"article:{a.pk}"))

    def test_audit_management_command_uses_the_settings_rules(self) -> None:
        from cachesync.contrib.django.management.commands.cachesync_audit import Command as AuditCommand

        a = Article.objects.create(slug="a", title="A")
        cached_get(Article, id=a.pk)
        with self.assertRaises(SystemExit) as ex:
            AuditCommand().run_from_argv(["manage.py", "cachesync_audit", "--grace", "0"])
        self.assertEqual(ex.exception.code, 0)

    def test_record_for_unseen_writes_and_lax_mode(self) -> None:
        from django.conf import settings
        from django.test import override_settings

        from cachesync.contrib.django import record

        fill("custom:1")
        with transaction.atomic():
            record("custom:1", version=3)
            self.assertFalse(invalidated("custom:1"))
        self.assertTrue(invalidated("custom:1"))
        a = Article.objects.create(slug="a", title="A")
        fill(f"article:{a.pk}")
        with override_settings(CACHESYNC={**settings.CACHESYNC, "STRICT": False}):
            Article.objects.filter(pk=a.pk).update(slug=F("title"))  # the slug key is skipped, the others recorded
        self.assertTrue(invalidated(f"article:{a.pk}"))
        from cachesync import ConfigError
        from cachesync.contrib.django import settings_value

        with override_settings(CACHESYNC={**settings.CACHESYNC, "TYPO": 1}), self.assertRaisesRegex(ConfigError, "TYPO"):
            settings_value("NAMESPACE")  # also checked when the app starts (AppConfig.ready)
