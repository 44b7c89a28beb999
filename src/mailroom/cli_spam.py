"""``mailroom spam``: train the shipped base model and measure the scorer on labelled mail.

Neither command needs the database or any setting: both work on files only.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from services.spam.evaluate import evaluate, read_folder
from services.spam.model import MODEL_PATH
from services.spam.scorer import DEFAULT_THRESHOLD

# CI and developers keep the shared corpora beside the clone: <repo>/../shared/corpora.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "corpora" / "spamassassin-dev.tar.gz"


def _emit(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data))
        return
    for key, value in data.items():
        click.echo(f"{key}: {value}")


@click.group()
def spam() -> None:
    """The spam scorer's base model and its evaluation."""


@spam.command("train")
@click.option(
    "--corpus",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CORPUS,
    show_default="../shared/corpora/spamassassin-dev.tar.gz beside the repository",
    help="A .tar.gz of raw messages under ham/ and spam/.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=MODEL_PATH,
    show_default="services/spam/base_model.bin",
    help="Where to write the model.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def spam_train(corpus: Path, out: Path, as_json: bool) -> None:
    """Train the base model from CORPUS, deterministically: the same corpus gives the same
    bytes. Prints the split's sizes, the feature count, the file and its SHA-256."""
    from services.spam.train import train_model

    if not corpus.is_file():
        click.echo(f"mailroom: no corpus at {corpus} (give one with --corpus)", err=True)
        sys.exit(1)
    result = train_model(corpus)
    out.write_bytes(result.model)
    _emit(
        {
            "corpus": str(corpus),
            "train_messages": result.train_messages,
            "validation_messages": result.validation_messages,
            "features": result.features,
            "model": str(out),
            "bytes": len(result.model),
            "sha256": hashlib.sha256(result.model).hexdigest(),
        },
        as_json,
    )


@spam.command("eval")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_THRESHOLD,
    show_default=True,
    help="Score from which a message counts as spam.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def spam_eval(directory: Path, threshold: float, as_json: bool) -> None:
    """Score the raw messages in DIRECTORY/ham and DIRECTORY/spam (either may be missing).
    Prints counts, precision, recall, F1 and the false-positive rate (only the detection
    rate when there is no ham, only the false-positive rate when there is no spam), and
    messages per second of scoring."""
    samples = read_folder(directory)
    if not samples:
        click.echo(f"mailroom: no messages in {directory}/ham or {directory}/spam", err=True)
        sys.exit(1)
    result = evaluate(samples, threshold=threshold)
    _emit({"threshold": threshold, **result.as_dict()}, as_json)
