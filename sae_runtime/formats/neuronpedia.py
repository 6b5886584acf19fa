"""Neuronpedia feature explanations as SAE labels.

Neuronpedia's explanation export (``/api/explanation/export?modelId=..&saeId=..``, or the bulk
dataset files) is a JSON array of explanation objects; JSON Lines (one object per line) is read too.
The keys read::

    {"modelId": "gpt2-small", "layer": "6-res-jb", "index": "14057",
     "description": " words about cats", "scores": [{"value": 0.61}], ...}

- ``modelId`` + ``layer`` (Neuronpedia's SAE id) name the SAE: SAELens records the pair as
  ``metadata.neuronpedia_id`` = ``"gpt2-small/6-res-jb"``. An export holding several SAEs needs
  that id to pick one (FormatError otherwise).
- ``index``: the latent (int or decimal string), in [0, d_sae).
- ``description``: the label, whitespace-stripped; empty descriptions are skipped.
- score: the largest of ``score`` / ``scores[].value`` / ``scores[]`` numbers; several explanations
  of one latent keep the highest-scored one (an unscored one ranks below any scored one; ties keep
  the first).

Labels map label -> latent, so one text cannot name two latents: a description shared by several
latents becomes ``"<description> [#<index>]"`` for each of them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from sae_runtime.errors import FormatError

#: Default file name looked for next to an SAE's weights.
EXPORT_FILE = "neuronpedia_explanations.json"


def _records(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FormatError(f"cannot read the Neuronpedia export: {exc.strerror or exc}", field=str(path)) from None
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise FormatError(f"not JSON or JSON Lines: {exc}", field=str(path)) from None
    if isinstance(data, Mapping):  # {"explanations": [...]} wrappers
        data = data.get("explanations", data.get("results"))
    if not isinstance(data, list):
        raise FormatError("expected a JSON array of explanation objects", field=str(path))
    return data


def _score(record: Mapping[str, Any]) -> float:
    values: list[Any] = [record.get("score")]
    scores = record.get("scores")
    if isinstance(scores, list):
        values += [s.get("value") if isinstance(s, Mapping) else s for s in scores]
    finite = [float(v) for v in values
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return max(finite) if finite else -math.inf


def _index(value: Any, d_sae: int, n: int, path: Path) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < d_sae:
        raise FormatError(f"explanation {n}: index {value!r} is not a latent index in [0, {d_sae})", field=str(path))
    return value


def _sae_ids(records: Iterable[Mapping[str, Any]]) -> set[str]:
    return {f"{r.get('modelId')}/{r.get('layer')}" for r in records}


def load_labels(path: str | Path, d_sae: int, *, neuronpedia_id: str | None = None) -> dict[str, int]:
    """Labels ``{description: latent index}`` from a Neuronpedia explanation export.

    ``neuronpedia_id`` (``"<modelId>/<layer>"``) keeps that SAE's explanations; without it the export
    must hold explanations of one SAE only. Raises FormatError (field = the file) naming the entry at fault.
    """
    path = Path(path)
    records = _records(path)
    for n, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise FormatError(f"explanation {n} is {type(r).__name__}, not an object", field=str(path))
    if neuronpedia_id is not None:
        picked = [r for r in records if f"{r.get('modelId')}/{r.get('layer')}" == neuronpedia_id]
        if records and not picked:
            raise FormatError(f"no explanations for SAE {neuronpedia_id!r} (the export has: "
                              f"{', '.join(sorted(_sae_ids(records)))})", field=str(path))
        records = picked
    elif len(_sae_ids(records)) > 1:
        raise FormatError(f"the export holds several SAEs ({', '.join(sorted(_sae_ids(records)))}): name one "
                          f"with neuronpedia_id", field=str(path))
    best: dict[int, tuple[float, str]] = {}
    for n, r in enumerate(records):
        description = r.get("description")
        if not isinstance(description, str) or not description.strip():
            continue
        index = _index(r.get("index"), d_sae, n, path)
        score = _score(r)
        if index not in best or score > best[index][0]:
            best[index] = (score, " ".join(description.split()))
    counts: dict[str, int] = {}
    for _, text in best.values():
        counts[text] = counts.get(text, 0) + 1
    return {(text if counts[text] == 1 else f"{text} [#{index}]"): index for index, (_, text) in sorted(best.items())}
