"""The spam scorer on the development corpora, beside references measured in the same run.

Prints, at the default threshold:

* the validation split of ``spamassassin-dev`` (the messages training left out): precision,
  recall, F1, false-positive rate;
* ``phishing-dev``: the share of phishing caught;
* ``modern-ham-dev``: the false-positive rate on today's legitimate mail;
* how the threshold trades: the same figures at thresholds around the default, from one
  scoring of each message (the validation split's false positives, phishing caught and
  modern ham flagged move with it; nothing else is tuned on these sets);
* messages per second on one core (this process pinned to one CPU; CPU time and wall
  clock), beside Python's own ``email`` parser (compat32) reading the same messages;
* the base model alone (no rules), so the rules' share shows;
* the issue's reference, a plain linear model over hashed tokens, trained in the same run on
  the same training split: every token of the raw message (headers and body, HTML markup
  included, nothing left out), the same logistic regression, no calibration, no rules. It
  learns what tells the 2002 corpus' lists and mailers from today's mail, so its phishing and
  modern-ham columns show what such tokens are worth there;
* where the Debian ``spamassassin`` package is installed: SpamAssassin's local rules
  (a private spamd, no network tests, threshold 5) on the same messages, through
  ``services.spam.spamd``. Without it, that row says so.

The corpora are read from ``../shared/corpora`` beside the repository (``--corpora``) and
unpacked into a temporary folder only; nothing of them is written into the repository.

    python bench/bench_spam.py [--corpora DIR] [--sa-messages 300]
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from zlib import crc32

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from services.spam import DEFAULT_THRESHOLD, score_message  # noqa: E402
from services.spam.evaluate import EvalResult, Sample, evaluate  # noqa: E402
from services.spam.features import HASH_MASK  # noqa: E402
from services.spam.scorer import sigmoid  # noqa: E402
from services.spam.spamd import SpamdClient  # noqa: E402
from services.spam.train import fit_logistic, is_validation, read_corpus  # noqa: E402
from services.spam.verdict import Verdict  # noqa: E402


def samples_of(archive: Path) -> list[Sample]:
    return [Sample(ex.name, ex.is_spam, ex.raw) for ex in read_corpus(archive)]


def model_alone(raw: bytes) -> Verdict:
    verdict = score_message(raw)
    weight = next((i.weight for i in verdict.indicators if i.name == "statistical_tokens"), 0.0)
    return Verdict(sigmoid(weight))


_RAW_TOKEN = re.compile(rb"[A-Za-z][A-Za-z0-9'$.-]{1,30}")


def raw_tokens(raw: bytes) -> np.ndarray:
    """The plain reference's features: every distinct token of the first 64 KiB, headers and
    body alike, lower-cased and hashed into the base model's space."""
    found = {crc32(t.lower()) & HASH_MASK for t in _RAW_TOKEN.findall(raw[:65536])}
    return np.array(sorted(found), dtype=np.int64)


def plain_reference(train: list[Sample]) -> Callable[[bytes], Verdict]:
    """A plain linear model over hashed raw tokens, fitted on ``train`` as the base model is
    (same steps, rate, L2), without calibration: the issue's reference, trained here."""
    rows = [raw_tokens(s.raw) for s in train]
    columns = np.unique(np.concatenate(rows))
    compact = [np.searchsorted(columns, r) for r in rows]
    w, bias = fit_logistic(compact, np.array([1.0 if s.is_spam else 0.0 for s in train]), len(columns))
    weights = np.zeros(HASH_MASK + 1)
    weights[columns] = w

    def score(raw: bytes) -> Verdict:
        return Verdict(sigmoid(bias + float(weights[raw_tokens(raw)].sum())))

    return score


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def row(name: str, results: list[EvalResult], speed: str) -> None:
    val, phish, modern = results
    print(
        f"{name:<34} {num(val.precision):>9} {num(val.recall):>7} {num(val.f1):>7} "
        f"{pct(val.false_positive_rate):>8} {pct(phish.recall):>9} "
        f"{pct(modern.false_positive_rate):>9}  {speed}"
    )


def threshold_sweep(sets: list[list[Sample]], thresholds: tuple[float, ...]) -> None:
    """The scorer's validation F1 and errors, phishing caught and modern ham flagged at each of
    ``thresholds``, each message scored once."""
    scored = [[(s.is_spam, score_message(s.raw).score) for s in samples] for samples in sets]
    print(f"\n{'threshold':>9} {'val F1':>7} {'val FP':>6} {'val FN':>6} {'phishing':>9} {'modern':>9}")
    for t in thresholds:
        val, phish, modern = (
            EvalResult(
                tp=sum(y and p >= t for y, p in pairs),
                fp=sum(not y and p >= t for y, p in pairs),
                fn=sum(y and p < t for y, p in pairs),
                tn=sum(not y and p < t for y, p in pairs),
            )
            for pairs in scored
        )
        mark = "  (default)" if t == DEFAULT_THRESHOLD else ""
        print(
            f"{t:>9.2f} {num(val.f1):>7} {val.fp:>6} {val.fn:>6} {pct(phish.recall):>9} "
            f"{pct(modern.false_positive_rate):>9}{mark}"
        )


def throughput(samples: list[Sample], fn: Callable[[bytes], object]) -> tuple[float, float]:
    """(messages per CPU second, per wall second) of ``fn`` over ``samples``."""
    cpu, wall = time.process_time(), time.perf_counter()
    for s in samples:
        fn(s.raw)
    return len(samples) / (time.process_time() - cpu), len(samples) / (time.perf_counter() - wall)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_spamd(workdir: Path) -> Iterator[SpamdClient | None]:
    """A spamd with local rules only (no DNS, no network tests, no auto-learning), or None."""
    spamd = shutil.which("spamd")
    if not spamd or not Path("/etc/spamassassin").is_dir():
        yield None
        return
    conf = workdir / "sa"
    conf.mkdir()
    # spamd drops to "nobody", who must read its configuration and write its log.
    workdir.chmod(0o755)
    conf.chmod(0o755)
    for f in Path("/etc/spamassassin").iterdir():
        if f.suffix in (".pre", ".cf") and f.is_file():
            shutil.copy(f, conf / f.name)
    with (conf / "local.cf").open("a") as handle:
        handle.write("\ndns_available no\nskip_rbl_checks 1\nbayes_auto_learn 0\nuse_bayes 0\n")
    port = free_port()
    proc = subprocess.Popen(
        [spamd, "-x", "-u", "nobody", "-i", "127.0.0.1", "-p", str(port), "-m", "2",
         f"--siteconfigpath={conf}", "-s", str(workdir / "spamd.log"),
         "--pidfile", str(workdir / "spamd.pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            yield None
            return
        yield SpamdClient("127.0.0.1", port, timeout=60)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def spamassassin_eval(client: SpamdClient, samples: list[Sample]) -> EvalResult:
    def judge(raw: bytes) -> Verdict:
        result = client.check(raw)
        if result is None:
            return Verdict(0.0)
        return Verdict(1.0 if result.score >= result.threshold else 0.0)

    return evaluate(samples, threshold=0.5, scorer=judge)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpora", type=Path, default=ROOT.parent / "shared" / "corpora")
    parser.add_argument(
        "--sa-messages",
        type=int,
        default=150,
        help="messages per set for SpamAssassin (a random sample; it scores a few per second; 0: none)",
    )
    args = parser.parse_args()
    corpora: Path = args.corpora
    needed = ["spamassassin-dev.tar.gz", "phishing-dev.tar.gz", "modern-ham-dev.tar.gz"]
    missing = [n for n in needed if not (corpora / n).is_file()]
    if missing:
        sys.exit(f"bench_spam: missing in {corpora}: {', '.join(missing)}")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    spamassassin = samples_of(corpora / needed[0])
    validation = [s for s in spamassassin if is_validation(s.name)]
    training = [s for s in spamassassin if not is_validation(s.name)]
    phishing = samples_of(corpora / needed[1])
    modern = samples_of(corpora / needed[2])
    everything = validation + phishing + modern
    print(
        f"messages: validation {len(validation)} ({sum(s.is_spam for s in validation)} spam), "
        f"phishing {len(phishing)}, modern ham {len(modern)}; threshold {DEFAULT_THRESHOLD}; one core"
    )
    score_message(everything[0].raw)  # load the model before timing

    ours = [evaluate(s) for s in (validation, phishing, modern)]
    alone = [evaluate(s, scorer=model_alone) for s in (validation, phishing, modern)]
    cpu, wall = throughput(everything, score_message)
    compat = email.parser.BytesParser(policy=email.policy.compat32)
    ref_cpu, ref_wall = throughput(everything, compat.parsebytes)
    plain = plain_reference(training)
    plain_results = [evaluate(s, scorer=plain) for s in (validation, phishing, modern)]

    print()
    print(
        f"{'':<34} {'precision':>9} {'recall':>7} {'F1':>7} {'FPR':>8} {'phishing':>9} {'modern':>9}"
        "  speed (one core)"
    )
    print(f"{'':<34} {'(validation split)':>35} {'caught':>9} {'ham FPR':>9}")
    row("Mailroom scorer (model + rules)", ours, f"{cpu:,.0f} msg/s CPU, {wall:,.0f} msg/s wall")
    row("base model alone (reference)", alone, "")
    row("plain hashed raw tokens (ref.)", plain_results, "headers + body, no rules, no calibration")
    print(
        f"{'email compat32 parse (reference)':<34} {'':>63}  "
        f"{ref_cpu:,.0f} msg/s CPU, {ref_wall:,.0f} msg/s wall"
    )

    threshold_sweep([validation, phishing, modern], (0.4, 0.5, DEFAULT_THRESHOLD, 0.7, 0.8, 0.9))

    if args.sa_messages <= 0:
        print("SpamAssassin (local rules): not measured (--sa-messages 0)")
        return
    with tempfile.TemporaryDirectory(prefix="bench-spam-") as tmp, private_spamd(Path(tmp)) as client:
        if client is None:
            print("SpamAssassin (local rules): not measured (Debian package spamassassin not installed)")
            return
        rng = random.Random(7)
        subsets = [rng.sample(s, min(args.sa_messages, len(s))) for s in (validation, phishing, modern)]
        sa = [spamassassin_eval(client, s) for s in subsets]
        ours_same = [evaluate(s) for s in subsets]
        n = sum(len(s) for s in subsets)
        sa_speed = n / sum(r.seconds for r in sa)
        print(f"\nsame {args.sa_messages} random messages per set (seed 7):")
        row("SpamAssassin local rules (ref.)", sa, f"{sa_speed:,.1f} msg/s wall (spamd, 2 children)")
        row("Mailroom scorer", ours_same, "")


if __name__ == "__main__":
    main()
