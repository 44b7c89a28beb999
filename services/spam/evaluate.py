"""Measuring the scorer on labelled mail: precision, recall, F1, false-positive rate, speed.

Used by ``mailroom spam eval`` and ``bench/bench_spam.py``. A folder of labelled mail holds
``ham/`` and ``spam/`` sub-folders of raw messages, one file each (either may be missing).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from services.spam.parse import MAX_BYTES
from services.spam.scorer import DEFAULT_THRESHOLD, score_message
from services.spam.verdict import Verdict


@dataclass(frozen=True)
class Sample:
    name: str
    is_spam: bool
    raw: bytes


@dataclass
class EvalResult:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    false_positives: list[str] = field(default_factory=list)
    false_negatives: list[str] = field(default_factory=list)

    @property
    def messages(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        """Also the detection rate: the share of spam caught."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None or r is None or p + r == 0:
            return None
        return 2 * p * r / (p + r)

    @property
    def false_positive_rate(self) -> float | None:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else None

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_messages_per_second(self) -> float:
        """Throughput on one core: messages per second of this process's CPU time."""
        return self.messages / self.cpu_seconds if self.cpu_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        out: dict[str, object] = {
            "messages": self.messages,
            "spam": self.tp + self.fn,
            "ham": self.tn + self.fp,
            "true_positives": self.tp,
            "false_positives": self.fp,
            "true_negatives": self.tn,
            "false_negatives": self.fn,
        }
        if self.tn + self.fp and self.tp + self.fn:
            out.update(
                precision=r(self.precision),
                recall=r(self.recall),
                f1=r(self.f1),
                false_positive_rate=r(self.false_positive_rate),
            )
        elif self.tp + self.fn:
            out["detection_rate"] = r(self.recall)
        else:
            out["false_positive_rate"] = r(self.false_positive_rate)
        out["messages_per_second"] = round(self.messages_per_second, 1)
        out["cpu_messages_per_second"] = round(self.cpu_messages_per_second, 1)
        return out


def read_folder(path: Path) -> list[Sample]:
    """The messages under ``path/ham`` and ``path/spam``, in name order."""
    samples: list[Sample] = []
    for label, is_spam in (("ham", False), ("spam", True)):
        folder = path / label
        if not folder.is_dir():
            continue
        for file in sorted(folder.iterdir()):
            if file.is_file():
                with file.open("rb") as handle:
                    samples.append(Sample(f"{label}/{file.name}", is_spam, handle.read(MAX_BYTES)))
    return samples


def evaluate(
    samples: Iterable[Sample],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    scorer: Callable[[bytes], Verdict] = score_message,
) -> EvalResult:
    """Score each sample and count the outcomes at ``threshold``; ``seconds`` (wall clock)
    and ``cpu_seconds`` count scoring only, not reading the files."""
    result = EvalResult()
    for sample in samples:
        started = time.perf_counter()
        cpu_started = time.process_time()
        verdict = scorer(sample.raw)
        result.cpu_seconds += time.process_time() - cpu_started
        result.seconds += time.perf_counter() - started
        flagged = verdict.is_spam(threshold)
        if sample.is_spam and flagged:
            result.tp += 1
        elif sample.is_spam:
            result.fn += 1
            result.false_negatives.append(sample.name)
        elif flagged:
            result.fp += 1
            result.false_positives.append(sample.name)
        else:
            result.tn += 1
    return result
