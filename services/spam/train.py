"""Training of the base model, deterministic from the corpus file to the model's bytes.

The corpus is a ``.tar.gz`` of raw messages under ``.../ham/`` and ``.../spam/``. Members are
read in name order; a message belongs to the validation split when the CRC-32 of its file
name is divisible by :data:`VALIDATION_MODULUS` (about one in five), so the split does not
depend on order or on a random generator. The logistic regression is fitted by full-batch
Adam for a fixed number of steps in float64, with sums in a fixed order (``bincount``,
``reduceat``), on the training split.

Platt scaling is fitted on the training split too, never on the validation split (whose
figures would then be partly fitted to it: the calibration sets where the threshold cuts the
raw margin). Margins of messages a model was trained on are overconfident, so the margins come
from cross-fitting: the training split is cut into :data:`CALIBRATION_FOLDS` folds by the
CRC-32 of the file name (:func:`calibration_fold`, fixed like the validation split), a model is
fitted on all folds but one, with the same steps, and scores the fold it did not see; Platt's
two parameters are fitted on those out-of-fold margins of the whole training split. The
shipped weights are still fitted on the whole training split. Weights are quantized (the fold
models' before they score, as the shipped ones are when written) and the bias and Platt's two
parameters rounded, so the last bits of a float never reach the file.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from zlib import crc32

import numpy as np

from services.spam.features import base_features
from services.spam.model import HEADER_DIGITS, WEIGHT_SCALE, model_bytes, quantize
from services.spam.parse import parse_message

VALIDATION_MODULUS = 5
CALIBRATION_FOLDS = 5
STEPS = 400
LEARNING_RATE = 0.05
L2 = 5e-5
MAX_MEMBER_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Example:
    name: str
    is_spam: bool
    raw: bytes


def is_validation(name: str) -> bool:
    return crc32(PurePosixPath(name).name.encode()) % VALIDATION_MODULUS == 0


def calibration_fold(name: str) -> int:
    """The cross-fitting fold (0 to ``CALIBRATION_FOLDS - 1``) of a training message: the
    CRC-32 of its file name, past the part that decides the validation split."""
    return crc32(PurePosixPath(name).name.encode()) // VALIDATION_MODULUS % CALIBRATION_FOLDS


def read_corpus(path: Path) -> Iterator[Example]:
    """The messages of a corpus archive, in name order."""
    # Read in archive order (a gzip stream cannot seek back cheaply), then sort by name.
    found: list[Example] = []
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = PurePosixPath(member.name).parts
            if "ham" in parts:
                label = False
            elif "spam" in parts:
                label = True
            else:
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                found.append(Example(member.name, label, handle.read(MAX_MEMBER_BYTES)))
    found.sort(key=lambda ex: ex.name)
    yield from found


def _csr(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    cols = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return indptr, cols


def _margins(w: np.ndarray, bias: float, indptr: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = np.full(len(indptr) - 1, bias, dtype=np.float64)
    if len(cols) == 0:
        return out
    nonempty = indptr[1:] > indptr[:-1]
    sums = np.add.reduceat(w[cols], indptr[:-1][nonempty])
    out[nonempty] += sums
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


def fit_logistic(rows: list[np.ndarray], labels: np.ndarray, n_features: int) -> tuple[np.ndarray, float]:
    """Weights (over ``n_features`` compact columns) and bias of an L2 logistic regression."""
    indptr, cols = _csr(rows)
    lengths = np.diff(indptr)
    n = len(rows)
    w = np.zeros(n_features, dtype=np.float64)
    bias = 0.0
    m_w = np.zeros_like(w)
    v_w = np.zeros_like(w)
    m_b = v_b = 0.0
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, STEPS + 1):
        p = _sigmoid(_margins(w, bias, indptr, cols))
        r = (p - labels) / n
        g_w = np.bincount(cols, weights=np.repeat(r, lengths), minlength=n_features) + L2 * w
        g_b = float(r.sum())
        m_w = beta1 * m_w + (1 - beta1) * g_w
        v_w = beta2 * v_w + (1 - beta2) * g_w * g_w
        m_b = beta1 * m_b + (1 - beta1) * g_b
        v_b = beta2 * v_b + (1 - beta2) * g_b * g_b
        c1 = 1 - beta1**step
        c2 = 1 - beta2**step
        w -= LEARNING_RATE * (m_w / c1) / (np.sqrt(v_w / c2) + eps)
        bias -= LEARNING_RATE * (m_b / c1) / (np.sqrt(v_b / c2) + eps)
    return w, bias


def fit_platt(margins: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Platt scaling ``sigmoid(a*z + b)`` by Newton's method, with Platt's smoothed targets."""
    n_pos = float(labels.sum())
    n_neg = float(len(labels) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return 1.0, 0.0
    t = np.where(labels > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    a, b = 1.0, 0.0
    for _ in range(100):
        p = _sigmoid(a * margins + b)
        d = p - t
        s = p * (1 - p) + 1e-12
        g = np.array([float((d * margins).sum()), float(d.sum())])
        h = np.array(
            [[float((s * margins * margins).sum()), float((s * margins).sum())], [0.0, float(s.sum())]]
        )
        h[1, 0] = h[0, 1]
        h[0, 0] += 1e-9
        h[1, 1] += 1e-9
        det = h[0, 0] * h[1, 1] - h[0, 1] * h[1, 0]
        da = (h[1, 1] * g[0] - h[0, 1] * g[1]) / det
        db = (h[0, 0] * g[1] - h[1, 0] * g[0]) / det
        a -= da
        b -= db
        if abs(da) < 1e-12 and abs(db) < 1e-12:
            break
    return a, b


def _stored_margins(w: np.ndarray, bias: float, indptr: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Margins with the weights and bias as a model file would hold them."""
    stored = quantize(w).astype(np.float64) * WEIGHT_SCALE
    return _margins(stored, round(bias, HEADER_DIGITS), indptr, cols)


def out_of_fold_margins(
    rows: list[np.ndarray], labels: np.ndarray, folds: np.ndarray, n_features: int
) -> np.ndarray:
    """Each row's margin under the model fitted on the other folds (module doc)."""
    indptr, cols = _csr(rows)
    out = np.zeros(len(rows), dtype=np.float64)
    for k in range(CALIBRATION_FOLDS):
        held = folds == k
        if not held.any() or held.all():
            continue
        fitted = [r for r, h in zip(rows, held, strict=True) if not h]
        w, bias = fit_logistic(fitted, labels[~held], n_features)
        out[held] = _stored_margins(w, bias, indptr, cols)[held]
    return out


@dataclass(frozen=True)
class TrainResult:
    model: bytes
    train_messages: int
    validation_messages: int
    features: int


def train_model(corpus: Path) -> TrainResult:
    """Train the base model from the corpus archive; the bytes are the model file."""
    train_rows: list[np.ndarray] = []
    train_labels: list[float] = []
    train_folds: list[int] = []
    validation_messages = 0
    for ex in read_corpus(corpus):
        if is_validation(ex.name):
            # Neither fitted nor calibrated on: what `mailroom spam eval` measures.
            validation_messages += 1
            continue
        feats = np.array(sorted(base_features(parse_message(ex.raw, time_budget=10.0))), dtype=np.int64)
        train_rows.append(feats)
        train_labels.append(1.0 if ex.is_spam else 0.0)
        train_folds.append(calibration_fold(ex.name))
    all_train = np.concatenate(train_rows) if train_rows else np.zeros(0, dtype=np.int64)
    columns = np.unique(all_train)
    compact = [np.searchsorted(columns, r) for r in train_rows]
    labels = np.array(train_labels)
    w, bias = fit_logistic(compact, labels, len(columns))
    margins = out_of_fold_margins(compact, labels, np.array(train_folds, dtype=np.int64), len(columns))
    platt_a, platt_b = fit_platt(margins, labels)
    return TrainResult(
        model=model_bytes(columns, w, bias, platt_a, platt_b),
        train_messages=len(train_rows),
        validation_messages=validation_messages,
        features=len(columns),
    )
