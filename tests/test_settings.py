"""Settings: typed, validated once, and a bad value stops start-up with one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography.fernet import Fernet

from services.crypto import SecretBox, SecretDecryptError
from services.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"database_url": "mysql://x"}, "MAILROOM_DATABASE_URL"),
        ({"broker_url": "amqp://x"}, "MAILROOM_BROKER_URL"),
        ({"result_backend_url": "http://x"}, "MAILROOM_RESULT_BACKEND_URL"),
        ({"secret_key": "short"}, "MAILROOM_SECRET_KEY"),
        ({"task_soft_time_limit": 100, "task_hard_time_limit": 50}, "MAILROOM_TASK_SOFT_TIME_LIMIT"),
        ({"broker_visibility_timeout": 60}, "MAILROOM_BROKER_VISIBILITY_TIMEOUT"),
        ({"flower_port": 0}, "MAILROOM_FLOWER_PORT"),
        ({"log_level": "LOUD"}, "MAILROOM_LOG_LEVEL"),
        ({"database_url": "postgresql://db/x"}, "MAILROOM_SECRET_KEY"),
    ],
)
def test_bad_values_name_the_variable(overrides, variable) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(**overrides)
    message = str(info.value)
    assert variable in message and "\n" not in message


def test_environment_is_read_and_typed(monkeypatch) -> None:
    monkeypatch.setenv("MAILROOM_SYNC_BATCH_SIZE", "250")
    monkeypatch.setenv("MAILROOM_ALLOW_PRIVATE_HOSTS", "true")
    monkeypatch.setenv("MAILROOM_BROKER_PASSWORD", "p@ss word")
    monkeypatch.setenv("MAILROOM_BROKER_TLS", "true")
    settings = load_settings()
    assert settings.sync_batch_size == 250 and settings.allow_private_hosts is True
    assert settings.broker_connection_url == "rediss://:p%40ss%20word@127.0.0.1:6379/0"
    assert settings.result_backend_connection_url == "redis://127.0.0.1:6379/1"


def test_bad_environment_stops_the_command_with_one_line(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailroom.cli", "db", "upgrade"],
        env={"PATH": "/usr/bin:/bin", "MAILROOM_BROKER_URL": "ftp://nope", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mailroom: MAILROOM_BROKER_URL: must be a redis://, rediss://, redis+socket:// or sentinel:// URL"
    ]


def test_embedded_mode_keeps_a_key_file(tmp_path) -> None:
    settings = load_settings(database_url=f"sqlite:///{tmp_path}/m.db")
    first = settings.encryption_keys()
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600
    assert load_settings(database_url=f"sqlite:///{tmp_path}/m.db").encryption_keys() == first


def test_key_rotation() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    token = SecretBox(old).encrypt("hunter2")
    rotated_box = SecretBox(f"{new},{old}")
    assert rotated_box.decrypt(token) == "hunter2"
    assert SecretBox(new).decrypt(rotated_box.rotate(token)) == "hunter2"
    with pytest.raises(SecretDecryptError):
        SecretBox(new).decrypt(token)


def test_unix_socket_broker_urls_keep_their_form() -> None:
    """kombu reads ``redis+socket:/path`` (one slash) as no Redis URL at all and falls back
    to AMQP: the socket URL must reach it as given, with or without a password."""
    bare = load_settings(broker_url="redis+socket:///run/redis/redis.sock?virtual_host=0")
    assert bare.broker_connection_url == "redis+socket:///run/redis/redis.sock?virtual_host=0"
    locked = load_settings(broker_url="redis+socket:///run/redis/redis.sock", broker_password="p@ss")
    assert locked.broker_connection_url == "redis+socket://:p%40ss@/run/redis/redis.sock"
    assert load_settings(broker_url="redis://h:6380/1").broker_connection_url == "redis://h:6380/1"


def test_sentinel_urls_name_their_sentinels_master_and_database() -> None:
    settings = load_settings(
        broker_url="sentinel://10.0.0.1:26379/2;sentinel://10.0.0.2",
        broker_password="p@ss",
        broker_sentinel_master="mail",
        broker_sentinel_password="sentinel-pw",
    )
    target = settings.broker_sentinel
    assert target is not None
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    assert (target.master, target.db, target.password, target.sentinel_password) == (
        "mail",
        2,
        "p@ss",
        "sentinel-pw",
    )
    assert settings.broker_connection_url == "sentinel://:p%40ss@10.0.0.1:26379/2;sentinel://10.0.0.2"
    assert settings.rate_limit_storage == "redis+sentinel://:p@ss@10.0.0.1:26379,10.0.0.2:26379/mail"
    assert settings.result_backend_sentinel is None
    with pytest.raises(SettingsError, match="MAILROOM_BROKER_URL"):
        load_settings(broker_url="sentinel://10.0.0.1:26379/zero")
