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

from .models import Article, Comment, Tag


def invalidated(key: str) -> bool:
    e = get_cache().peek(key)
    return e is not None and "ti" in e and "v" not in e


def floor(key: str) -> str:
    """The version floor an invalidation left on ``key``."""
    e = get_cache().peek(key)
    assert e is not None and "fl" in e, e
    fl = e["fl"]
    return fl.decode() if isinstance(fl, bytes) else str(fl)


def fill(*keys: str) -> None:
    for k in keys:
        get_cache().set(k, "cached")


def outbox_keys() -> list[str]:
    import json

    with connection.cursor() as cur:
        cur.execute(f"SELECT cache_keys FROM {get_outbox().table} ORDER BY id")
        return [k for (row,) in cur.fetchall() for k in json.loads(row)]


def _waiting_for_a_lock() -> bool:
    """Whether another backend of this database waits on a row lock (PostgreSQL: pg_stat_activity; MariaDB:
    information_schema.innodb_trx)."""
    with connection.cursor() as cur:
        if connection.vendor == "postgresql":
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = "
                        "current_database()")
        else:
            cur.execute("SELECT count(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'")
        return bool(cur.fetchone()[0])

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
        self.assertEqual(floor(f"article:{a.pk}"), "2")

    def test_outbox_rows_carry_the_writers_trace_context(self) -> None:
        """With OpenTelemetry, a save inside the application's span stores that span's traceparent in the outbox
        row (the relay and the L1s then trace under the writer); outside any span the column stays NULL."""
        from opentelemetry.sdk.trace import TracerProvider

        tracer = TracerProvider().get_tracer("shop-tests")
        with tracer.start_as_current_span("app.update") as span, transaction.atomic():
            traced = Article.objects.create(slug="traced", title="T")
        with transaction.atomic():
            plain = Article.objects.create(slug="plain", title="P")
        with connection.cursor() as cur:
            cur.execute(f"SELECT cache_keys, traceparent FROM {get_outbox().table} ORDER BY id")
            rows = cur.fetchall()
        tps = {tp for keys, tp in rows if f"article:{traced.pk}" in keys}
        self.assertEqual({tp.split("-")[1] for tp in tps}, {f"{span.get_span_context().trace_id:032x}"})
        self.assertEqual({tp for keys, tp in rows if f"article:{plain.pk}" in keys}, {None})

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

    def test_save_of_an_unsaved_instance_with_an_existing_pk_invalidates_the_old_keys(self) -> None:
        a = Article.objects.create(slug="a", title="A")
        fill(f"article:{a.pk}", "article_slug:a", "article_slug:b")
        Article(pk=a.pk, slug="b", title="B", version=2).save()  # _state.adding, yet Django UPDATEs the row
        self.assertEqual(Article.objects.get(pk=a.pk).slug, "b")
        for k in (f"article:{a.pk}", "article_slug:a", "article_slug:b"):  # the old slug's key too
            self.assertTrue(invalidated(k), k)

    def test_bulk_update_of_a_foreign_key_key_column_to_an_instance(self) -> None:
        a = Article.objects.create(slug="a", title="A")
        b = Article.objects.create(slug="b", title="B")
        c = Comment.objects.create(article=a, body="x")
        fill(f"comments:{a.pk}", f"comments:{b.pk}")
        Comment.objects.filter(pk=c.pk).update(article=b)  # a model instance: its pk is the new column value
        self.assertTrue(invalidated(f"comments:{a.pk}"))
        self.assertTrue(invalidated(f"comments:{b.pk}"), outbox_keys())

    def test_concurrent_saves_changing_a_key_column_record_the_key_the_row_had(self) -> None:
        """Two transactions change the same row's key column: the second one's save reads the old key columns
        FOR UPDATE, so it waits for the first and records the key the row has then (b), not the one it had
        before the first committed (a). (Without the lock it recorded a and c: article_slug:b, cached by a
        reader between the two commits, stayed stale.)"""
        import threading

        if connection.vendor not in ("postgresql", "mysql"):
            self.skipTest("row locks: PostgreSQL and MariaDB")
        n0 = len(outbox_keys())  # the outbox table keeps earlier tests' rows
        a = Article.objects.create(slug="a", title="A")
        first_saved, release = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def first() -> None:
            try:
                with transaction.atomic():
                    x = Article.objects.get(pk=a.pk)
                    x.slug = "b"
                    x.save()  # holds the row lock until the commit
                    first_saved.set()
                    release.wait(30)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
            finally:
                first_saved.set()
                connection.close()

        t = threading.Thread(target=first)
        t.start()
        self.assertTrue(first_saved.wait(30))
        y = Article.objects.get(pk=a.pk)  # still slug "a": the first has not committed
        self.assertEqual(y.slug, "a")

        def second() -> None:
            try:
                with transaction.atomic():
                    y.slug = "c"
                    y.save()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
            finally:
                connection.close()

        t2 = threading.Thread(target=second)
        t2.start()
        # the second save waits for the first's row lock (in its pre_save read, with the fix; in its UPDATE, without)
        import time

        deadline = time.monotonic() + 30
        while not _waiting_for_a_lock() and time.monotonic() < deadline:
            time.sleep(0.01)  # polling an observable condition (a backend waiting on a lock), not a timed wait
        release.set()
        t.join(30)
        t2.join(30)
        self.assertEqual(errors, [])
        keys = outbox_keys()[n0:]
        self.assertEqual(keys.count("article_slug:b"), 2, keys)  # the first's new key, and the second's old key

    def test_delete_of_a_stale_instance_invalidates_the_rows_current_keys(self) -> None:
        a = Article.objects.create(slug="a", title="A")
        Article.objects.filter(pk=a.pk).update(slug="b")  # another writer; `a` still says slug "a"
        fill("article_slug:b")  # a reader cached the row under its current slug
        a.delete()
        self.assertTrue(invalidated("article_slug:b"))

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

    def test_bulk_create_records_the_new_rows_keys(self) -> None:
        """bulk_create sends no signals (the cacheops complaint): CachesyncManager records the inserted rows' keys,
        e.g. a negatively cached slug lookup and a list key, in the same transaction."""
        fill("article_slug:n1", "article_slug:n2", "articles:all")
        with transaction.atomic():
            made = Article.objects.bulk_create([Article(slug="n1", title="N1"), Article(slug="n2", title="N2")])
            self.assertFalse(invalidated("article_slug:n1"))  # not before the commit
        self.assertTrue(all(a.pk is not None for a in made))
        for k in ("article_slug:n1", "article_slug:n2", "articles:all", *(f"article:{a.pk}" for a in made)):
            self.assertTrue(invalidated(k), k)
        self.assertIn("article_slug:n2", outbox_keys())
        n = len(outbox_keys())
        with self.assertRaises(RuntimeError), transaction.atomic():
            Article.objects.bulk_create([Article(slug="n3", title="N3")])
            raise RuntimeError
        self.assertEqual(len(outbox_keys()), n)  # rolled back with the insert

    def test_bulk_create_with_conflicts(self) -> None:
        a = Article.objects.create(slug="a", title="A")
        fill(f"article:{a.pk}", "article_slug:new")
        # ignore_conflicts: the conflicting row is unchanged (not invalidated), the inserted one is
        Article.objects.bulk_create([Article(slug="a", title="ignored"), Article(slug="new", title="N")],
                                    ignore_conflicts=True)
        self.assertFalse(invalidated(f"article:{a.pk}"))
        self.assertTrue(invalidated("article_slug:new"))
        self.assertEqual(Article.objects.get(pk=a.pk).title, "A")
        # update_conflicts (an upsert): the updated row is invalidated, with its version as the floor
        fill(f"article:{a.pk}")
        unique = None if connection.vendor == "mysql" else ["slug"]  # MySQL/MariaDB: ON DUPLICATE KEY, no fields
        Article.objects.bulk_create([Article(slug="a", title="upserted", version=5)], update_conflicts=True,
                                    update_fields=["title", "version"], unique_fields=unique)
        self.assertEqual(Article.objects.get(pk=a.pk).title, "upserted")
        self.assertTrue(invalidated(f"article:{a.pk}"))
        self.assertEqual(floor(f"article:{a.pk}"), "5")
        # no unique value to find the rows by (Tag has only its auto pk): refused loudly, nothing inserted
        n = Tag.objects.count()
        with self.assertRaisesRegex(OutboxError, r"bulk_create\(ignore_conflicts/update_conflicts=True\)"):
            Tag.objects.bulk_create([Tag(name="t")], ignore_conflicts=True)
        self.assertEqual(Tag.objects.count(), n)

    def test_bulk_update_records_old_and_new_keys(self) -> None:
        a = Article.objects.create(slug="a", title="A")
        b = Article.objects.create(slug="b", title="B")
        c = Article.objects.create(slug="c", title="C")
        fill(f"article:{a.pk}", f"article:{b.pk}", f"article:{c.pk}", "article_slug:a", "article_slug:a2",
             "article_slug:b")
        a.slug, a.version = "a2", F("version") + 1
        b.title = "B2"
        with transaction.atomic():
            self.assertEqual(Article.objects.bulk_update([a, b], ["slug", "title", "version"]), 2)
            self.assertFalse(invalidated(f"article:{a.pk}"))
        for k in (f"article:{a.pk}", "article_slug:a", "article_slug:a2", f"article:{b.pk}", "article_slug:b"):
            self.assertTrue(invalidated(k), k)
        self.assertFalse(invalidated(f"article:{c.pk}"))
        self.assertEqual(floor(f"article:{a.pk}"), "2")  # F() resolved: read after the UPDATE

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

    def test_cdc_and_worker_management_commands_take_their_defaults_from_the_settings(self) -> None:
        import contextlib
        import io

        from django.conf import settings

        from cachesync.contrib.django.management.commands.cachesync_cdc import Command as CdcCommand
        from cachesync.contrib.django.management.commands.cachesync_worker import Command as WorkerCommand
        from cachesync.rules import Rules

        argv = CdcCommand().argv(["--slot", "s1"])
        self.assertEqual(argv[0], "cdc")
        opts = dict(zip(argv[1::2], argv[2::2], strict=True))
        self.assertEqual(opts["--db-url"], database_url())
        self.assertEqual(opts["--redis-url"], settings.CACHESYNC["REDIS_URL"])
        self.assertEqual(opts["--namespace"], settings.CACHESYNC["NAMESPACE"])
        self.assertEqual(opts["--slot"], "s1")  # passed through
        self.assertEqual(set(Rules.load(opts["--rules"]).tables), set(settings.CACHESYNC["RULES"]))
        argv = WorkerCommand().argv(["--namespace", "other", "--database", "default"])
        self.assertEqual(argv[0], "worker")
        self.assertNotIn("--db-url", argv)  # the worker reads a bus, not the database
        self.assertEqual(argv.count("--namespace"), 1)  # a given flag wins over the setting
        self.assertEqual(argv[argv.index("--namespace") + 1], "other")
        self.assertNotIn("--database", argv)
        for cmd, name in ((CdcCommand, "cdc"), (WorkerCommand, "worker")):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as ex:
                cmd().run_from_argv(["manage.py", f"cachesync_{name}", "--help"])
            self.assertEqual(ex.exception.code, 0)
            self.assertIn(f"usage: cachesync {name}", out.getvalue())

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
