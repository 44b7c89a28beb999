"""The watcher role: IMAP NOTIFY / IDLE connections that queue a sync of the folders that change."""
