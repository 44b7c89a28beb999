"""Mailroom's domain layer: plain Python, no Flask and no Celery imports."""
