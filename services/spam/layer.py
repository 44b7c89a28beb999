"""A tenant's own layer over the base model: sparse weight deltas, learned one verdict at a time.

``learn`` moves the weights of the message's features (the base model's, plus the sender's
address and domain) by a few bounded steps until the message lands on the user's side with
a margin, never changing one feature by more than :data:`MAX_DELTA` in total. Only this
layer changes, so one tenant's lesson moves only its own verdicts. At most
:data:`MAX_FEATURES` deltas are kept (the smallest go first), so the stored bytes stay small:

    magic  b"MRTL1\\n"   count <I>   then count x (<I index> <f delta>), index ascending
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable

MAGIC = b"MRTL1\n"
MAX_FEATURES = 20_000
MAX_DELTA = 3.0
MAX_STEPS = 4
# A learned message must end this far (in log-odds) on the user's side of the default
# threshold, so that a nearby threshold does not flip it back.
TARGET_MARGIN = 2.0
_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<If")


class LayerFormatError(ValueError):
    """The bytes are not a tenant layer this code wrote."""


class TenantLayer:
    """Sparse per-feature deltas added to the base model's log-odds (see the module doc)."""

    def __init__(self, deltas: dict[int, float] | None = None) -> None:
        self.deltas: dict[int, float] = dict(deltas or {})

    def __len__(self) -> int:
        return len(self.deltas)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TenantLayer) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    def logit(self, features: Iterable[int]) -> float:
        get = self.deltas.get
        return sum(get(f, 0.0) for f in features)

    def learn(self, raw: bytes, is_spam: bool, *, threshold: float | None = None) -> None:
        """Teach this layer the user's verdict on ``raw`` (a spam when ``is_spam``): the
        message ends on that side of ``threshold`` (the tenant's; ``DEFAULT_THRESHOLD`` when
        not given) with a margin, unless the per-feature cap stops it first."""
        from services.spam.scorer import DEFAULT_THRESHOLD, analyse, logit

        analysis = analyse(raw, layer=self)
        feats = sorted(analysis.features)
        if not feats:
            return
        cut = logit(DEFAULT_THRESHOLD if threshold is None else threshold)
        target = cut + (TARGET_MARGIN if is_spam else -TARGET_MARGIN)
        current = analysis.logit
        for _ in range(MAX_STEPS):
            need = target - current
            if (is_spam and need <= 0) or (not is_spam and need >= 0):
                break
            # Spread the change over the message's features, each within its cap.
            per_feature = need / len(feats)
            moved = 0.0
            for f in feats:
                old = self.deltas.get(f, 0.0)
                new = min(MAX_DELTA, max(-MAX_DELTA, old + per_feature))
                if new != old:
                    self.deltas[f] = new
                    moved += new - old
            if moved == 0.0:
                break
            current += moved
        self._prune()

    def _prune(self) -> None:
        self.deltas = {f: d for f, d in self.deltas.items() if abs(d) >= 1e-4}
        if len(self.deltas) > MAX_FEATURES:
            keep = sorted(self.deltas.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:MAX_FEATURES]
            self.deltas = dict(keep)

    def to_bytes(self) -> bytes:
        items = sorted(self.deltas.items())
        out = bytearray(MAGIC)
        out += _COUNT.pack(len(items))
        for f, d in items:
            out += _ENTRY.pack(f, d)
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> TenantLayer:
        """A layer from :meth:`to_bytes`; empty bytes give an empty layer. Raises
        :class:`LayerFormatError` on anything else."""
        if not data:
            return cls()
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _COUNT.size:
            raise LayerFormatError("not a tenant spam layer")
        (count,) = _COUNT.unpack_from(data, len(MAGIC))
        start = len(MAGIC) + _COUNT.size
        if count > MAX_FEATURES or len(data) != start + count * _ENTRY.size:
            raise LayerFormatError("tenant spam layer has the wrong length")
        deltas: dict[int, float] = {}
        for f, d in _ENTRY.iter_unpack(data[start:]):
            if not math.isfinite(d):
                raise LayerFormatError("tenant spam layer holds a non-finite weight")
            deltas[f] = d
        return cls(deltas)
