"""Settings of the example project. EXAMPLE_DB picks the database: sqlite (default), postgresql or mysql
(the servers of the test suite); EXAMPLE_TEST_DB names the test database; CACHESYNC_REDIS_URL and
CACHESYNC_NAMESPACE the cache."""

import os
import tempfile
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "example-only-not-secret"  # noqa: S105
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
INSTALLED_APPS = ["django.contrib.contenttypes", "cachesync.contrib.django", "shop"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "project.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

_db = os.environ.get("EXAMPLE_DB", "sqlite")
_test_name = os.environ.get("EXAMPLE_TEST_DB", "test_cachesync_" + uuid.uuid4().hex[:8])
if _db == "postgresql":
    DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "test", "USER": "root",
                             "HOST": "127.0.0.1", "PORT": "5432", "TEST": {"NAME": _test_name}}}
elif _db == "mysql":
    import pymysql

    pymysql.install_as_MySQLdb()
    DATABASES = {"default": {"ENGINE": "django.db.backends.mysql", "NAME": "test", "USER": "root",
                             "HOST": "127.0.0.1", "PORT": "3306", "TEST": {"NAME": _test_name}}}
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(BASE_DIR / "example.sqlite3"),
                             "TEST": {"NAME": str(Path(tempfile.gettempdir()) / f"{_test_name}.sqlite3")}}}

CACHESYNC = {
    "REDIS_URL": os.environ.get("CACHESYNC_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "NAMESPACE": os.environ.get("CACHESYNC_NAMESPACE", "example"),
    "RULES": {
        "shop_article": {"keys": ["article:{id}", "article_slug:{slug}", "articles:all"], "version": "version"},
        "shop_article_tags": {"keys": ["article_tags:{article_id}"]},
        "shop_tag": {"keys": ["tag:{id}"]},
        "shop_comment": {"keys": ["comment:{id}", "comments:{article_id}"]},
    },
    "OPTIONS": {"ttl_jitter": 0.0},
}
