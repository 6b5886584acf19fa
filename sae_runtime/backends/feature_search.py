"""SearchFeatures: a model's labelled latents by label substring or by meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from sae_runtime.backends.types import Backend, label_of


@dataclass(frozen=True)
class FeatureMatch:
    """A labelled latent found by :func:`search_features`; ``score`` is the cosine of the query's and
    the label's sentence embeddings when ranked by meaning, 1.0 for a label-substring match."""

    sae: str
    index: int
    label: str
    score: float = 1.0


#: Most features one search returns.
MAX_SEARCH_LIMIT = 1000


def search_features(backend: Backend, query: str, sae: str = "", index: int | None = None, limit: int = 20,
                    semantic: bool | None = None) -> list[FeatureMatch]:
    """Labelled latents of ``sae`` (or every SAE) matching ``query``; with ``index``, that latent
    alone (if its label contains ``query``: index lookups never rank by meaning).

    ``semantic=False``: labels containing ``query`` (case-insensitive), by SAE then index, score 1.0.
    ``semantic=True``: every labelled latent ranked by the cosine of its label's embedding to the
    query's (``backend.label_indexes``, built at load time), best first across SAEs; InvalidArgument
    naming ``semantic`` when the model has no embedded labels (the ``search`` extra is missing).
    ``semantic=None`` (default): substring matches when any label contains ``query`` (or the query is
    empty), else by meaning when the model has embedded labels, else none.
    InvalidArgument names ``limit`` / ``index``; NotFound names ``sae``."""
    from sae_runtime.errors import InvalidArgument
    from sae_runtime.search import rank

    if not 0 < limit <= MAX_SEARCH_LIMIT:
        raise InvalidArgument(f"must be in [1, {MAX_SEARCH_LIMIT}]", field="limit")
    widths = {s.name: s.d_sae for s in backend.info().saes}
    names = (sae,) if sae else tuple(widths)
    needle = query.lower()
    found: list[FeatureMatch] = []
    labelled: dict[str, Mapping[str, int]] = {}
    for name in names:
        labels = backend.feature_labels(name)  # NotFound(field="sae") for an unknown SAE
        labelled[name] = labels
        if index is not None:
            if not 0 <= index < widths[name]:
                raise InvalidArgument(f"latent {index} out of range [0, {widths[name]}) of SAE {name!r}", field="index")
            label = label_of(labels, index) or ""
            if needle in label.lower():
                found.append(FeatureMatch(name, index, label))
            continue
        for label, i in sorted(labels.items(), key=lambda kv: (kv[1], kv[0])):
            if needle in label.lower():
                found.append(FeatureMatch(name, int(i), label))
    substring_answer = semantic is None and (found or not query)
    if index is not None or semantic is False or substring_answer or not any(labelled.values()):
        return found[:limit]
    indexes = getattr(backend, "label_indexes", {})
    if not all(n in indexes and indexes[n].semantic for n, labels in labelled.items() if labels):
        if semantic:
            raise InvalidArgument("this model's labels are not embedded (install the 'search' extra)", field="semantic")
        return found[:limit]
    queries: dict[int, Any] = {}  # encoder id -> the query's embedding: encoded once per search
    for n in names:
        if labelled[n] and id(indexes[n].encoder) not in queries:
            queries[id(indexes[n].encoder)] = indexes[n].encoder.encode([query])[0]
    ranked = [FeatureMatch(n, i, label, score) for n in names if labelled[n]
              for i, label, score in rank(indexes[n], query, limit, queries[id(indexes[n].encoder)])]
    position = {n: k for k, n in enumerate(names)}
    return sorted(ranked, key=lambda f: (-f.score, position[f.sae], f.index))[:limit]


__all__ = ["FeatureMatch", "MAX_SEARCH_LIMIT", "search_features"]
