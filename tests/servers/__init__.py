"""Real, private servers for tests: PostgreSQL, Redis, Dovecot (IMAP), aiosmtpd (SMTP) and
Celery worker/beat processes.

Every server starts on a free 127.0.0.1 port inside its own temporary directory and is
stopped (with every process it started) by ``stop()``. Nothing here mocks anything. See
``README.md`` in this folder for how to use each one.

The classes live in their own modules (``tests.servers.postgres`` …) and are imported
from there; this package deliberately re-exports nothing, so importing one server does not
import the client libraries of all the others.
"""
