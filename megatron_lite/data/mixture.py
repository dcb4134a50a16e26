"""Plan a data mixture: from weights (or target token counts) per source to what training will
actually see - tokens, documents, epochs of each source - before any GPU time is spent.

A spec (YAML) looks like::

    total_tokens: 2.0e9        # or num_samples + seq_length
    max_epochs: 4              # warn when a source would be repeated more often
    mixture:
      - {prefix: data/web, weight: 0.7}
      - {prefix: data/code, weight: 0.3}      # or `tokens: 6.0e8` on every entry instead of weights
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from megatron_lite.data.blend import build_blending_indices, normalize_weights
from megatron_lite.data.indexed import IndexedDataset


class MixtureError(ValueError):
    """A mixture spec the user can fix; the message names the entry."""


@dataclass
class SourcePlan:
    prefix: str
    weight: float  # normalised
    documents: int
    tokens: int  # in the dataset
    tokens_drawn: float  # by the mixture
    realised_share: float

    @property
    def epochs(self) -> float:
        return self.tokens_drawn / self.tokens if self.tokens else float("inf")


@dataclass
class MixturePlan:
    sources: list[SourcePlan]
    total_tokens: int
    num_samples: int
    max_epochs: float

    @property
    def warnings(self) -> list[str]:
        return [
            f"{s.prefix} would be repeated {s.epochs:.2f} times (more than max_epochs={self.max_epochs:g}); "
            f"lower its weight or add data"
            for s in self.sources if s.epochs > self.max_epochs
        ]

    def mixture_yaml(self) -> str:
        entries = [{"prefix": s.prefix, "weight": round(s.weight, 6)} for s in self.sources]
        return yaml.safe_dump({"data": {"mixture": entries}}, sort_keys=False)

    def table(self) -> str:
        rows = ["| source | weight | realised | documents | tokens | tokens drawn | epochs |", "|---|---|---|---|---|---|---|"]
        for s in self.sources:
            rows.append(f"| {s.prefix} | {s.weight:.4f} | {s.realised_share:.4f} | {s.documents} | {s.tokens} | "
                        f"{s.tokens_drawn:.0f} | {s.epochs:.2f} |")
        return "\n".join(rows)


def load_spec(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MixtureError(f"mixture spec {path} does not exist")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("mixture"), list) or not spec["mixture"]:
        raise MixtureError(f"{path} must hold a mapping with a non-empty 'mixture' list of {{prefix, weight | tokens}}")
    return spec


def plan_mixture(spec: dict, seq_length: int | None = None) -> MixturePlan:
    entries = spec["mixture"]
    seq_length = int(seq_length or spec.get("seq_length", 2048))
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "prefix" not in entry:
            raise MixtureError(f"mixture entry {index} must be a mapping with a 'prefix'")
    has_tokens = ["tokens" in e for e in entries]
    if any(has_tokens) and not all(has_tokens):
        raise MixtureError("give every mixture entry either a 'weight' or a 'tokens' target, not a mix of both")
    datasets = [IndexedDataset(e["prefix"]) for e in entries]
    if all(has_tokens):
        targets = np.array([float(e["tokens"]) for e in entries])
        total_tokens = int(spec.get("total_tokens", targets.sum()))
        raw_weights = targets
    else:
        raw_weights = np.array([float(e.get("weight", 1.0)) for e in entries])
        total_tokens = _total_tokens(spec, seq_length)
    try:
        weights = normalize_weights(raw_weights)
    except ValueError as exc:
        raise MixtureError(str(exc)) from None
    num_samples = max(1, -(-total_tokens // seq_length))
    source, _ = build_blending_indices(raw_weights, num_samples)  # normalised once, inside
    shares = np.bincount(source, minlength=len(weights)) / num_samples
    sources = [
        SourcePlan(e["prefix"], float(w), len(ds), ds.num_tokens, float(share * num_samples * seq_length), float(share))
        for e, ds, w, share in zip(entries, datasets, weights, shares)
    ]
    return MixturePlan(sources, total_tokens, num_samples, float(spec.get("max_epochs", 4.0)))


def _total_tokens(spec: dict, seq_length: int) -> int:
    if "total_tokens" in spec:
        return int(float(spec["total_tokens"]))
    if "num_samples" in spec:
        return int(spec["num_samples"]) * seq_length
    raise MixtureError("the spec needs 'total_tokens' (or 'num_samples') when entries give weights")
