"""Mailroom's HTTP API and the `mailroom` command."""

__version__ = "0.1.0"
