"""`mailroom spam train` reproduces the shipped base model bit for bit from the corpus.

The corpus lives beside the repository (``../shared/corpora``), as on CI; the test is
skipped only where that file is absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from services.spam.model import MODEL_PATH, TRAIN_HAM, TRAIN_SPAM, model_from_bytes
from services.spam.train import (
    CALIBRATION_FOLDS,
    calibration_fold,
    fit_platt,
    is_validation,
    read_corpus,
    train_model,
)

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpora" / "spamassassin-dev.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS.is_file(), reason=f"no corpus at {CORPUS}")
def test_training_reproduces_the_shipped_model(tmp_path: Path) -> None:
    out = tmp_path / "model.bin"
    result = subprocess.run(
        [sys.executable, "-m", "mailroom.cli", "spam", "train", "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    shipped = MODEL_PATH.read_bytes()
    assert out.read_bytes() == shipped
    assert report["sha256"] == hashlib.sha256(shipped).hexdigest()
    assert report["train_messages"] + report["validation_messages"] == 3598
    assert report["corpus"] == str(CORPUS)


@pytest.mark.skipif(not CORPUS.is_file(), reason=f"no corpus at {CORPUS}")
def test_the_prior_is_the_training_splits_share_of_spam() -> None:
    labels = [ex.is_spam for ex in read_corpus(CORPUS) if not is_validation(ex.name)]
    assert (sum(labels), len(labels) - sum(labels)) == (TRAIN_SPAM, TRAIN_HAM)


def test_the_shipped_model_loads_and_is_small() -> None:
    data = MODEL_PATH.read_bytes()
    assert len(data) < 4 * 1024 * 1024
    model = model_from_bytes(data)
    assert model.platt_a > 0
    assert int((model.weights != 0).sum()) > 10_000


def test_the_validation_split_depends_on_the_file_name_only() -> None:
    names = [f"spam/spam-{i:05d}.eml" for i in range(2000)]
    share = sum(is_validation(n) for n in names) / len(names)
    assert 0.15 < share < 0.25
    assert is_validation("a/b/spam/x.eml") == is_validation("other/x.eml")


def test_platt_scaling_fits_a_monotone_calibration() -> None:
    import numpy as np

    margins = np.array([-4.0, -3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0, -0.5, 0.5])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0], dtype=float)
    a, b = fit_platt(margins, labels)
    assert a > 0
    assert abs(b) < 1


_HAM_WORDS = [
    "meeting",
    "agenda",
    "slides",
    "notes",
    "lunch",
    "review",
    "draft",
    "thanks",
    "tomorrow",
    "project",
]
_SPAM_WORDS = ["winner", "prize", "offer", "cheap", "pills", "casino", "bonus", "free", "credit", "viagra"]
_SHARED = ["the", "and", "for", "with", "this", "that", "your", "have", "from", "about"]


def _message(rng: random.Random, spam: bool) -> bytes:
    own = _SPAM_WORDS if spam else _HAM_WORDS
    other = _HAM_WORDS if spam else _SPAM_WORDS
    body = rng.choices(own, k=12) + rng.choices(other, k=2) + rng.choices(_SHARED, k=8)
    return (
        f"From: a@example.com\r\nSubject: {' '.join(rng.choices(own, k=3))}\r\n\r\n{' '.join(body)}\r\n"
    ).encode()


def _corpus(path: Path, messages: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in sorted(messages.items()):
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(raw))


def test_the_validation_split_reaches_neither_weights_nor_calibration(tmp_path: Path) -> None:
    # The same training messages, and validation messages that differ in every way (other
    # words, labels swapped): the model file is the same bytes, calibration included.
    rng = random.Random(3)
    train: dict[str, bytes] = {}
    validation: list[tuple[str, bool]] = []
    for i in range(240):
        spam = i % 2 == 1
        name = f"spam-{i:04d}.eml" if spam else f"ham-{i:04d}.eml"
        if is_validation(name):
            validation.append((name, spam))
        else:
            train[f"c/{'spam' if spam else 'ham'}/{name}"] = _message(rng, spam)
    assert len(validation) > 20
    honest = {f"c/{'spam' if s else 'ham'}/{n}": _message(rng, s) for n, s in validation}
    swapped = {f"c/{'ham' if s else 'spam'}/{n}": _message(rng, not s) for n, s in validation}
    _corpus(tmp_path / "honest.tar.gz", train | honest)
    _corpus(tmp_path / "swapped.tar.gz", train | swapped)
    first = train_model(tmp_path / "honest.tar.gz")
    second = train_model(tmp_path / "swapped.tar.gz")
    assert first.validation_messages == second.validation_messages == len(validation)
    assert first.train_messages == len(train)
    assert first.model == second.model
    model = model_from_bytes(first.model)
    assert model.platt_a > 0


def test_the_calibration_folds_depend_on_the_file_name_only_and_split_evenly() -> None:
    names = [f"ham/ham-{i:05d}.eml" for i in range(5000) if not is_validation(f"ham-{i:05d}.eml")]
    counts = [0] * CALIBRATION_FOLDS
    for n in names:
        counts[calibration_fold(n)] += 1
    assert min(counts) > 0.8 * len(names) / CALIBRATION_FOLDS
    assert calibration_fold("a/b/ham/x.eml") == calibration_fold("x.eml")
