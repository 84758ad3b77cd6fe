"""Runs the example Django project's tests (examples/django_project/shop/tests.py) with Django's own test
runner against SQLite, PostgreSQL and MariaDB and the shared Redis (unique test database and namespace)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "examples" / "django_project"


@pytest.mark.parametrize("db", ["sqlite", "postgresql", "mysql"])
def test_django_project_tests_pass(db, request, redis_url, namespace, tmp_path):
    if db != "sqlite":
        request.getfixturevalue("pg_url" if db == "postgresql" else "mysql_url")  # skip/fail like the others
    env = {**os.environ, "EXAMPLE_DB": db, "EXAMPLE_TEST_DB": "test_cachesync_" + uuid.uuid4().hex[:10],
           "CACHESYNC_REDIS_URL": redis_url, "CACHESYNC_NAMESPACE": namespace, "TMPDIR": str(tmp_path),
           "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "manage.py", "test", "shop", "--noinput", "-v", "2"], cwd=PROJECT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert "Ran 18 tests" in p.stderr and "OK" in p.stderr
