"""`mailroom spam train` reproduces the shipped base model bit for bit from the corpus.

The corpus lives beside the repository (``../shared/corpora``), as on CI; the test is
skipped only where that file is absent.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.spam.model import MODEL_PATH, TRAIN_HAM, TRAIN_SPAM, model_from_bytes
from services.spam.train import fit_platt, is_validation, read_corpus

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
