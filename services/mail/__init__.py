"""Talking to mail servers: host policy, IMAP and SMTP connections, error classification."""
