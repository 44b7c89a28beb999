"""`mailroom spam eval DIR` on a small set of messages written here (never from a corpus)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailroom.cli import main
from tests.test_spam_rules import html, message

HAM = [
    message(
        "Hi Anna,\n\nthe minutes from Tuesday are attached to the wiki page.\n\nBen\n", subject="Minutes"
    ),
    message(
        "Sure, Thursday works.\n\nOn Mon, Anna wrote:\n> Can we move the review?\n> Thursday?\n",
        subject="Re: Review",
        extra="In-Reply-To: <r1@example.com>",
    ),
    message("The build on the main branch is green again after the dependency fix.", subject="Build"),
]
SPAM = [
    html(
        "<p>Unusual activity was detected. Verify your account within 24 hours or it will be suspended."
        '</p><a href="http://paypal-login-check.example/x">https://www.paypal.com/</a>',
        sender='"PayPal" <alert@secure-notify.example>',
        subject="Action required",
        message_id=None,
    ),
    message(
        "Claim your casino bonus: 500 free spins, no deposit! You have won a prize, claim now.",
        sender="Casino Rewards <promo@casino-1.firebaseapp.com>",
        subject="anna@example.com, your bonus is waiting",
        date=None,
    ),
]


def write(folder: Path, messages: list[bytes]) -> None:
    folder.mkdir(parents=True)
    for i, raw in enumerate(messages):
        (folder / f"{i:03d}.eml").write_bytes(raw)


def run_eval(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """The command as a real process, as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    result = subprocess.run(
        [sys.executable, "-m", "mailroom.cli", "spam", "eval", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == expect, (result.stdout, result.stderr)
    return result


def invoke(*args: str, expect: int = 0) -> tuple[str, str]:
    """The same command in this process (click's runner), for the cheaper cases."""
    result = CliRunner().invoke(main, ["spam", "eval", *args])
    assert result.exit_code == expect, (result.stdout, result.stderr)
    return result.stdout, result.stderr


def test_eval_counts_and_rates(tmp_path: Path) -> None:
    write(tmp_path / "ham", HAM)
    write(tmp_path / "spam", SPAM)
    out = json.loads(run_eval(str(tmp_path), "--json").stdout)
    assert (out["messages"], out["ham"], out["spam"]) == (5, 3, 2)
    assert (out["true_positives"], out["false_positives"]) == (2, 0)
    assert (out["precision"], out["recall"], out["f1"], out["false_positive_rate"]) == (1.0, 1.0, 1.0, 0.0)
    assert out["messages_per_second"] > 0
    assert "detection_rate" not in out

    text = invoke(str(tmp_path))[0].splitlines()
    assert "precision: 1.0" in text
    assert "false_positive_rate: 0.0" in text
    assert any(line.startswith("messages_per_second: ") for line in text)


def test_a_threshold_of_zero_flags_every_message(tmp_path: Path) -> None:
    write(tmp_path / "ham", HAM)
    write(tmp_path / "spam", SPAM)
    out = json.loads(invoke(str(tmp_path), "--threshold", "0", "--json")[0])
    assert out["false_positives"] == 3
    assert out["false_positive_rate"] == 1.0


def test_spam_only_prints_the_detection_rate(tmp_path: Path) -> None:
    write(tmp_path / "spam", SPAM)
    out = json.loads(invoke(str(tmp_path), "--json")[0])
    assert out["detection_rate"] == 1.0
    assert "precision" not in out


def test_ham_only_prints_the_false_positive_rate(tmp_path: Path) -> None:
    write(tmp_path / "ham", HAM)
    out = json.loads(invoke(str(tmp_path), "--json")[0])
    assert out["false_positive_rate"] == 0.0
    assert "detection_rate" not in out


@pytest.mark.parametrize("threshold", ["1.5", "-0.1"])
def test_bad_threshold_is_a_usage_error(tmp_path: Path, threshold: str) -> None:
    write(tmp_path / "ham", HAM)
    assert "threshold" in invoke(str(tmp_path), "--threshold", threshold, expect=2)[1].lower()


def test_an_empty_folder_is_an_error(tmp_path: Path) -> None:
    assert "no messages" in invoke(str(tmp_path), expect=1)[1]
