"""A minimal Django project on Soniq: one app (shop), PostgreSQL, Soniq's app."""

import os

SECRET_KEY = "example-only"
DEBUG = True
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "project.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "soniq.contrib.django",  # Soniq's schema, `manage.py soniq`, the jobs admin
    "shop",
]

# Soniq uses this database (SONIQ["DATABASE"]): no second URL to configure.
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("EXAMPLE_DB_NAME", "soniq_example"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
    }
}

SONIQ = {"DATABASE": "default", "SCHEMA": "public"}
