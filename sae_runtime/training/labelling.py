"""Concept labels for SAE latents from tagged data.

A latent *fires* on a unit (a sequence, or a token) when its activation there is > 0 (for a
sequence: at any of its non-padding positions). For every (latent, concept) pair:

    precision = #units where the latent fires AND the concept is tagged / #units where it fires
    recall    = #units where the latent fires AND the concept is tagged / #units tagged with it

Each concept is given the latent with the best F1 (ties: higher precision, then lower latent
index), and each latent its best concept (ties: higher precision, then concept name order).
:func:`apply_labels` writes the per-concept choice into ``sae.labels`` (label -> latent index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from sae_runtime.errors import InvalidArgument
from sae_runtime.saes import Sae
from sae_runtime.training.activations import capture, tokenize


@dataclass(frozen=True)
class LatentLabel:
    latent: int
    concept: str
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class LabelTable:
    """Precision/recall of every (latent, concept) pair and the chosen matches."""

    concepts: tuple[str, ...]
    precision: Tensor  # (d_sae, C)
    recall: Tensor  # (d_sae, C)
    by_concept: tuple[LatentLabel, ...]  # best latent per concept (concepts with F1 > min_f1)
    by_latent: tuple[LatentLabel | None, ...]  # best concept per latent (None: never fires / F1 0)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per labelled concept, for printing or JSON."""
        return [
            {"concept": r.concept, "latent": r.latent, "precision": r.precision, "recall": r.recall, "f1": r.f1}
            for r in self.by_concept
        ]

    def format(self) -> str:
        lines = [f"{'concept':<24} {'latent':>6} {'prec':>6} {'recall':>6} {'f1':>6}"]
        lines += [f"{r.concept:<24} {r.latent:>6} {r.precision:>6.3f} {r.recall:>6.3f} {r.f1:>6.3f}" for r in self.by_concept]
        return "\n".join(lines)


def precision_recall(fires: Tensor, tagged: Tensor) -> tuple[Tensor, Tensor]:
    """fires (N, d_sae) bool, tagged (N, C) bool -> precision, recall, each (d_sae, C) float64.

    A latent that never fires has precision 0; a concept never tagged has recall 0.
    """
    f, t = fires.double(), tagged.double()
    tp = f.T @ t
    precision = tp / f.sum(0).clamp_min(1)[:, None]
    recall = tp / t.sum(0).clamp_min(1)[None, :]
    return precision, recall


def _f1(p: Tensor, r: Tensor) -> Tensor:
    return torch.where(p + r > 0, 2 * p * r / (p + r).clamp_min(1e-300), torch.zeros_like(p))


def _best(f1: Tensor, precision: Tensor) -> int:
    """Index of the max F1, ties to the higher precision, then the lowest index."""
    best = f1 == f1.max()
    p = torch.where(best, precision, torch.full_like(precision, -1.0))
    return int(torch.nonzero(p == p.max()).flatten()[0])


def label_table(fires: Tensor, tags: Sequence[Iterable[str]], *, concepts: Sequence[str] | None = None, min_f1: float = 0.0) -> LabelTable:
    """Match latents and concepts. fires (N, d_sae) (bool, or activations: fires = value > 0);
    ``tags[n]`` the concepts tagged on unit n. Concepts default to every tag seen, sorted."""
    fires = fires if fires.dtype == torch.bool else fires > 0
    tag_sets = [set(t) for t in tags]
    if fires.dim() != 2 or fires.shape[0] != len(tag_sets):
        raise InvalidArgument(f"fires must be (N={len(tag_sets)}, d_sae), got {tuple(fires.shape)}", field="fires")
    names = tuple(sorted(set().union(*tag_sets))) if concepts is None else tuple(concepts)
    tagged = torch.tensor([[c in s for c in names] for s in tag_sets], dtype=torch.bool).reshape(len(tag_sets), len(names))
    precision, recall = precision_recall(fires.cpu(), tagged)
    f1 = _f1(precision, recall)
    by_concept = []
    for c, name in enumerate(names):
        j = _best(f1[:, c], precision[:, c])
        if float(f1[j, c]) > min_f1:
            by_concept.append(LatentLabel(j, name, float(precision[j, c]), float(recall[j, c]), float(f1[j, c])))
    by_latent: list[LatentLabel | None] = []
    for j in range(fires.shape[1]):
        if not names or float(f1[j].max()) <= 0:
            by_latent.append(None)
            continue
        c = _best(f1[j], precision[j])
        by_latent.append(LatentLabel(j, names[c], float(precision[j, c]), float(recall[j, c]), float(f1[j, c])))
    return LabelTable(names, precision.float(), recall.float(), tuple(by_concept), tuple(by_latent))


def apply_labels(sae: Sae, table: LabelTable, prefix: str = "") -> dict[str, int]:
    """Set ``sae.labels[prefix + concept] = latent`` for every concept the table labelled."""
    new = {prefix + r.concept: r.latent for r in table.by_concept}
    sae.labels.update(new)
    return new


def latents_of_batches(
    model: nn.Module,
    sae: Sae,
    hook_name: str,
    batches: Iterable[tuple[Tensor, Tensor]],
) -> Iterable[tuple[Tensor, Tensor]]:
    """For each (input_ids, attention_mask) batch (B, T): (latents (B, T, d_sae), mask (B, T) bool)."""
    for ids, mask in batches:
        acts = capture(model, hook_name, ids, mask)
        with torch.no_grad():
            yield sae.encode(acts.to(sae.W_dec.dtype)), mask.bool()


def label_sae_on_texts(
    model: nn.Module,
    tokenizer: Any,
    sae: Sae,
    hook_name: str,
    tagged_texts: Sequence[tuple[str, Iterable[str]]],
    *,
    batch_size: int = 8,
    max_length: int = 128,
    min_f1: float = 0.0,
    prefix: str = "",
) -> LabelTable:
    """Sequence-level labelling: a latent fires on a text when it is > 0 at any of its tokens."""
    device = next(model.parameters()).device
    texts = [t for t, _ in tagged_texts]

    def batches():
        for s in range(0, len(texts), batch_size):
            b = tokenize(tokenizer, texts[s : s + batch_size], max_length)
            yield b["input_ids"].to(device), b["attention_mask"].to(device)

    fires = [((lat > 0) & mask[..., None]).any(1).cpu() for lat, mask in latents_of_batches(model, sae, hook_name, batches())]
    table = label_table(torch.cat(fires), [tags for _, tags in tagged_texts], min_f1=min_f1)
    apply_labels(sae, table, prefix)
    return table


def label_sae_on_tokens(
    model: nn.Module,
    sae: Sae,
    hook_name: str,
    tagged_tokens: Sequence[tuple[Sequence[int], Sequence[Iterable[str]]]],
    *,
    pad_id: int = 0,
    batch_size: int = 8,
    min_f1: float = 0.0,
    prefix: str = "",
) -> LabelTable:
    """Token-level labelling: ``tagged_tokens[n] = (token ids, tags of each token)``."""
    device = next(model.parameters()).device
    for n, (ids, tags) in enumerate(tagged_tokens):
        if len(ids) != len(tags) or not ids:
            raise InvalidArgument(f"{len(ids)} tokens but {len(tags)} tag sets", field=f"tagged_tokens[{n}]")

    def batches():
        for s in range(0, len(tagged_tokens), batch_size):
            rows = [list(ids) for ids, _ in tagged_tokens[s : s + batch_size]]
            t = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad_id] * (t - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows], device=device)
            yield ids, mask

    fires = [lat[mask].cpu() > 0 for lat, mask in latents_of_batches(model, sae, hook_name, batches())]
    tags = [set(t) for _, per_token in tagged_tokens for t in per_token]
    table = label_table(torch.cat(fires), tags, min_f1=min_f1)
    apply_labels(sae, table, prefix)
    return table
