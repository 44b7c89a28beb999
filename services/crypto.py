"""Credential encryption at rest: authenticated encryption (Fernet: AES-128-CBC + HMAC-SHA256).

``MAILROOM_SECRET_KEY`` holds one or more Fernet keys separated by commas, newest first.
Encryption always uses the first; decryption tries each, so keys rotate without downtime
(add the new key in front, re-encrypt with :meth:`SecretBox.rotate`, then drop the old).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class SecretDecryptError(Exception):
    """A stored secret could not be decrypted with any configured key."""


def validate_keys(value: str) -> None:
    """Raise ``ValueError`` unless every comma-separated key is a valid Fernet key."""
    for key in _split(value):
        try:
            Fernet(key.encode())
        except (ValueError, TypeError):
            raise ValueError(
                "must be Fernet keys (32 url-safe base64 bytes), comma-separated; "
                'make one with: python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())"'
            ) from None


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def key_file_secret(path: Path) -> str:
    """The embedded-mode key kept beside the SQLite database, created on first use (0600)."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key().decode()
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


class SecretBox:
    """Encrypts and decrypts account secrets; plaintext never leaves this object unasked."""

    def __init__(self, keys: str) -> None:
        parts = _split(keys)
        if not parts:
            raise ValueError("no encryption key configured")
        self._fernet = MultiFernet([Fernet(k.encode()) for k in parts])

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode("utf-8"))

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(bytes(token)).decode("utf-8")
        except InvalidToken:
            raise SecretDecryptError("stored secret cannot be decrypted with the configured keys") from None

    def rotate(self, token: bytes) -> bytes:
        """Re-encrypt ``token`` under the newest key."""
        return self._fernet.rotate(bytes(token))
