"""Hostile and careless URLs: passwords never reach errors, logs, reprs or CLI output, in every URL form, and every
CLI command turns a bad URL or an unreachable server into one line ``cachesync: error: ...`` and a non-zero exit.

Against real servers: a closed loopback port, the shared PostgreSQL and MariaDB (whose drivers' own messages are
checked for echoed tokens of the password)."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

import cachesync
from cachesync._driver import redact_url, scrub, url_secrets
from cachesync.db import DatabaseURLError
from cachesync.db import connect as db_connect

SECRET = "Zq7pW2xK"  # a token that appears nowhere else in any message

# (URL template with {port}, the secrets that must never be shown)
HOSTILE = [
    ("redis://:{s}@127.0.0.1:{port}/0", [SECRET]),                              # password-only auth
    ("redis://user:{s}@127.0.0.1:{port}/0", [SECRET]),
    ("redis://127.0.0.1:{port}/0?password={s}", [SECRET]),                       # in the query
    ("redis://:ab/{s}#x%y@127.0.0.1:{port}/0", [SECRET, "ab/" + SECRET]),         # unencoded / # %
    ("redis://:{s}@127.0.0.1:99999/0", [SECRET]),                                # out-of-range port
    ("redis://:" + quote(SECRET + "/#%") + "@127.0.0.1:{port}/0", [SECRET]),      # properly encoded
]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("template,secrets", HOSTILE)
def test_redact_url_hides_every_form(template, secrets):
    url = template.format(s=SECRET, port=6379)
    shown = redact_url(url)
    for s in secrets:
        assert s not in shown, shown
    assert "***" in shown
    assert "127.0.0.1" in shown


def test_redact_url_never_raises_and_keeps_harmless_urls():
    assert redact_url("sqlite:///tmp/x.db") == "sqlite:///tmp/x.db"
    assert redact_url("postgresql://app@db:5432/shop?sslmode=require") == "postgresql://app@db:5432/shop?sslmode=require"
    assert redact_url(None) == "<NoneType>"
    assert redact_url(f"mysql://root:{SECRET}@[::1:99999999/x") == "mysql://root:***@[::1:99999999/x"


def test_scrub_removes_tokens_a_driver_may_echo():
    url = f"postgresql://root:ab/{SECRET}#c@host/db"
    assert SECRET in url_secrets(url)
    assert SECRET not in scrub(f'invalid port "{SECRET}#c"', url)
    assert SECRET not in scrub(f'token "{quote(SECRET)}"', url)


@pytest.mark.parametrize("template,secrets", HOSTILE)
def test_cache_on_a_closed_port_shows_no_password(template, secrets, namespace, caplog):
    url = template.format(s=SECRET, port=closed_port())
    caplog.set_level(logging.DEBUG)
    try:
        c = cachesync.Cache(url, namespace=namespace, connect_timeout=0.5, socket_timeout=0.5)
    except cachesync.CachesyncError as e:  # refused at construction (bad port): the message is clean
        text = str(e)
    else:
        text = repr(c) + str(c.url)
        c.get("k", lambda: cachesync.NOT_FOUND)  # Redis down: served from the loader, logged
        with pytest.raises(cachesync.CachesyncError) as ei:  # an invalidation that cannot be made fails loudly
            c.invalidate("k")
        text += str(ei.value) + repr(ei.value) + repr(ei.value.__cause__)
        c.close()
    text += caplog.text
    for s in secrets:
        assert s not in text, text


def test_postgresql_driver_messages_are_scrubbed(pg_url):
    base = pg_url.split("://", 1)[1].split("@")[-1]  # host:port/db
    # libpq echoes an unencoded query value with spaces; psycopg's class is kept so callers can still catch it
    import psycopg

    with pytest.raises(psycopg.Error) as ei:
        db_connect(f"postgresql://root@{base}?password=x {SECRET} y")
    assert SECRET not in str(ei.value) and "***" in str(ei.value)
    assert ei.value.__context__ is None
    # a role that does not exist, with a password
    with pytest.raises(psycopg.Error) as ei:
        db_connect(f"postgresql://nosuchrole_{os.getpid()}:{SECRET}@{base}")
    assert SECRET not in str(ei.value)


def test_postgresql_password_with_unencoded_delimiters_connects(pg_url):
    # trust authentication: the password is ignored, so a successful connect proves host, port and db were parsed
    base = pg_url.split("://", 1)[1].split("@")[-1]
    conn = db_connect(f"postgresql://root:a/b#c%d?{SECRET}@{base}")
    conn.close()


def test_mariadb_wrong_password_and_bad_port(mysql_url):
    import pymysql

    base = mysql_url.split("://", 1)[1].split("@")[-1]
    with pytest.raises(pymysql.err.OperationalError) as ei:
        db_connect(f"mysql://root:ab/{SECRET}#%@{base}")
    assert SECRET not in str(ei.value)
    with pytest.raises(DatabaseURLError) as ei2:
        db_connect(f"mysql://root:{SECRET}@127.0.0.1:99999/test")
    assert SECRET not in str(ei2.value) and "99999" in str(ei2.value)


# --- every CLI command: one line, non-zero exit, no traceback, no secret ---------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("CACHESYNC_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "cachesync", *args], capture_output=True, text=True,
                          timeout=timeout, env=e)


def assert_one_line_error(p: subprocess.CompletedProcess[str], *secrets: str) -> str:
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "Traceback" not in out, out
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    # the error is one line, the last; what comes before it are log lines (a daemon's start-up WARNING)
    assert lines and lines[-1].startswith("cachesync: error: "), out
    assert all(re.match(r"\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ cachesync", ln) for ln in lines[:-1]), out
    for s in secrets or (SECRET,):
        assert s not in out, out
    return lines[-1]


@pytest.fixture
def rules_file(tmp_path: Path) -> str:
    f = tmp_path / "rules.toml"
    f.write_text('[tables.users]\nkeys = ["user:{id}"]\n')
    return str(f)


def test_cli_relay_once_on_a_closed_database_port():
    port = closed_port()
    p = run_cli("relay", "--once", "--db-url", f"postgresql://root:{SECRET}@127.0.0.1:{port}/test")
    line = assert_one_line_error(p)
    assert f"port {port}" in line


def test_cli_relay_redis_out_of_range_port(tmp_path):
    p = run_cli("relay", "--once", "--db-url", f"sqlite:///{tmp_path}/x.db",
                "--redis-url", f"redis://:{SECRET}@127.0.0.1:99999/0")
    assert "99999" in assert_one_line_error(p)


def test_cli_password_from_the_environment_is_scrubbed_too():
    p = run_cli("relay", "--once", env={"CACHESYNC_DB_URL": f"mysql://root:{SECRET}@127.0.0.1:{closed_port()}/test"})
    assert_one_line_error(p)


@pytest.mark.parametrize("cmd", [["outbox", "init"], ["outbox", "status"], ["outbox", "triggers", "--rules", "RULES"]])
def test_cli_outbox_commands(cmd, rules_file):
    cmd = [rules_file if a == "RULES" else a for a in cmd]
    p = run_cli(*cmd, "--db-url", f"mysql://root:ab/{SECRET}#@127.0.0.1:{closed_port()}/test")
    assert_one_line_error(p)


def test_cli_unknown_scheme():
    p = run_cli("outbox", "status", "--db-url", f"oracle://scott:{SECRET}@127.0.0.1/x")
    assert "unknown scheme" in assert_one_line_error(p)


def test_cli_worker_bad_bus_port():
    p = run_cli("worker", "--bus", f"redis://:ab/{SECRET}@127.0.0.1:99999/0")
    assert_one_line_error(p, SECRET, "ab/")


def test_cli_worker_unknown_bus_scheme():
    p = run_cli("worker", "--bus", f"kafka://u:{SECRET}@127.0.0.1:9092")
    assert "unknown scheme" in assert_one_line_error(p)


def test_cli_cdc_closed_port(rules_file):
    p = run_cli("cdc", "--db-url", f"postgresql://root:{SECRET}@127.0.0.1:{closed_port()}/test", "--rules", rules_file,
                "--checkpoint", rules_file + ".ckpt")
    assert_one_line_error(p)


def test_cli_cdc_mysql_closed_port(rules_file):
    p = run_cli("cdc", "--db-url", f"mysql://root:{SECRET}@127.0.0.1:{closed_port()}/test", "--rules", rules_file,
                "--checkpoint", rules_file + ".ckpt")
    assert_one_line_error(p)


@pytest.mark.parametrize("sub", ["drop-slot", "ddl-triggers"])
def test_cli_cdc_subcommands_closed_port(sub):
    p = run_cli("cdc", sub, "--db-url", f"postgresql://root:{SECRET}@127.0.0.1:{closed_port()}/test")
    assert_one_line_error(p)


def test_cli_audit_closed_redis(rules_file, tmp_path):
    p = run_cli("audit", "--redis-url", f"redis://:{SECRET}@127.0.0.1:{closed_port()}/0", "--rules", rules_file,
                "--db-url", f"sqlite:///{tmp_path}/a.db")
    assert_one_line_error(p)


@pytest.mark.parametrize("cmd", [["lab", "--scenario", "1a"], ["lab", "stress", "--duration", "0.1"]])
def test_cli_lab_closed_redis(cmd):
    p = run_cli(*cmd, "--redis-url", f"redis://:{SECRET}@127.0.0.1:{closed_port()}/0")
    assert p.returncode != 0
    assert "Traceback" not in p.stdout + p.stderr
    assert SECRET not in p.stdout + p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("cachesync: error: ")]


def test_cli_verbose_after_the_subcommand(tmp_path):
    """-vv after the subcommand turns on debug logging, which also logs the error's traceback, scrubbed."""
    p = run_cli("relay", "--once", "-vv", "--db-url", f"sqlite:///{tmp_path}/v.db",
                "--redis-url", f"redis://:{SECRET}@127.0.0.1:99999/0")
    assert p.returncode != 0
    assert "traceback of the error below" in p.stderr and "Traceback" in p.stderr
    assert SECRET not in p.stderr
    assert p.stderr.splitlines()[-1].startswith("cachesync: error: ")


def test_cdc_sources_name_no_password():
    """The CDC readers connect with their own drivers (psycopg2, PyMySQL): their errors are scrubbed too."""
    from cachesync.cdc.mysql import MySQLSource
    from cachesync.cdc.postgres import PostgresSource
    from cachesync.rules import Rules

    port = closed_port()
    m = MySQLSource(f"mysql://root:ab/{SECRET}#@127.0.0.1:{port}/test", 4242, ["users"])
    with pytest.raises(Exception) as ei:
        m.check()
    assert SECRET not in str(ei.value) + repr(ei.value) + repr(vars(m).get("url")) and str(port) in str(ei.value)
    pg = PostgresSource(f"postgresql://root:ab/{SECRET}#@127.0.0.1:{port}/test", Rules({"users": ["user:{id}"]}),
                        slot="cs_hostile", publication="cs_hostile", create=False)
    with pytest.raises(Exception) as ei:
        pg.check()
    assert SECRET not in str(ei.value) + repr(ei.value) + pg.ident + pg.url and str(port) in str(ei.value)
    with pytest.raises(cachesync.CachesyncError) as ei2:
        MySQLSource(f"mysql://root:{SECRET}@127.0.0.1:99999/test", 4242, ["users"])
    assert SECRET not in str(ei2.value)


def test_rabbitmq_wrong_password_with_unencoded_delimiters(amqp_url):
    """The URL is parsed correctly (the broker refuses the login) and the refusal names no password."""
    from cachesync.bus import open_bus

    host = amqp_url.split("://", 1)[1].split("@")[-1].split("/")[0]
    with pytest.raises(cachesync.CachesyncError) as ei:  # BusUnavailableError
        open_bus(f"amqp://guest:ab/{SECRET}#@{host}/%2F", "cshostile")
    text = str(ei.value) + repr(ei.value)
    assert SECRET not in text and "ab/" not in text
    assert "ACCESS_REFUSED" in text or "uthentication" in text  # got as far as the login


def test_a_url_or_client_decoding_replies_to_str_is_refused(redis_url: str) -> None:
    # with decode_responses every entry would read as corrupt and be deleted (writers' values too): refused
    # up front, naming the option, the password never shown
    u = redis_url.replace("redis://", "redis://:s3cret-pw@") + "?decode_responses=true"
    with pytest.raises(cachesync.UsageError, match="decode_responses") as ei:
        cachesync.Cache(u)
    assert "s3cret-pw" not in str(ei.value)
    with pytest.raises(cachesync.UsageError, match="decode_responses"):
        cachesync.AsyncCache(u)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(cachesync.UsageError, match="decode_responses"):
            cachesync.Cache(client=client)
    finally:
        client.close()
    with pytest.raises(cachesync.UsageError, match="decode_responses"):  # redis-py 8 keeps the string "false",
        cachesync.Cache(redis_url + "?decode_responses=false")  # which is true: it decodes too
