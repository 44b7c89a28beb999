"""IMAP sync: bring an account's stored folders and messages up to date with its server.

``sync_account`` is the one entry point (the Celery task calls it); the modules under it
are the folder list (:mod:`.folders`), one folder's sync (:mod:`.folder_sync`), the IMAP
commands (:mod:`.commands`), what a FETCH asks for and how it becomes a row
(:mod:`.fetch`, :mod:`.parse`), the database writes (:mod:`.state`) and progress.
"""

from services.sync.account import SyncOptions, sync_account

__all__ = ["SyncOptions", "sync_account"]
