"""Settings of the Django project that tests soniq.contrib.django
(``python -m django test tests.django_project --settings=tests.django_project.settings``,
run by tests/test_django.py and ``nox -s django``).

The database: ``SONIQ_DJANGO_DATABASE_URL`` (its database need not exist: Django's
test runner creates ``test_<name>`` beside it), else a name of this process's own on
the server of ``SONIQ_TEST_DATABASE_URL``. ``SONIQ_DJANGO_NAME`` overrides NAME (the
tests start ``manage.py soniq`` processes on the test database with it).
"""

from __future__ import annotations

import os

import django
from psycopg.conninfo import conninfo_to_dict

_url = os.environ.get("SONIQ_DJANGO_DATABASE_URL") or os.environ.get(
    "SONIQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
_info = conninfo_to_dict(_url)
if not os.environ.get("SONIQ_DJANGO_DATABASE_URL"):
    _info["dbname"] = f"soniq_django_{os.getpid()}"

SECRET_KEY = "soniq-tests-only"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["testserver"]
ROOT_URLCONF = "tests.django_project.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "soniq.contrib.django",
    "tests.django_project.shop",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("SONIQ_DJANGO_NAME", _info["dbname"]),
        "USER": _info.get("user", ""),
        "PASSWORD": _info.get("password", ""),
        "HOST": _info.get("host", ""),
        "PORT": _info.get("port", ""),
        "OPTIONS": {"application_name": "soniq-django-tests"},
    }
}
SONIQ = {"DATABASE": "default", "SCHEMA": "public"}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast

if django.VERSION >= (6, 0):
    TASKS = {
        "default": {
            "BACKEND": "soniq.contrib.django.tasks.SoniqBackend",
            "QUEUES": ["default", "mail"],
        }
    }
