"""Fitting a stitch between two loaded models: paired activations, SVCCA layer choice, the fit.

Paired rows come from the project's :class:`ActivationStore` run over the same texts on both
models; the two models must share a tokenizer (same vocabulary), so row i is the same token of
the same text on both sides. Padding positions are dropped on both sides alike.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from sae_runtime.errors import InvalidArgument
from sae_runtime.stitch.maps import Stitch, StitchConfig, fit_stitch, pick_layer
from sae_runtime.training.activations import ActivationStore


def check_same_tokenizer(tok_a: Any, tok_b: Any) -> None:
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise InvalidArgument("the two models must share a tokenizer (paired tokens)", field="model_b")


def collect(model: nn.Module, tok: Any, texts: Sequence[str], hook: str) -> Tensor:
    """Activations (N, d) of every non-padding position of ``texts`` at ``hook``."""
    return ActivationStore.collect(model, tok, list(texts), hook, batch_size=64, max_length=128, progress=False).tensor()


def n_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def choose_layer_b(model_a: nn.Module, model_b: nn.Module, tok: Any, texts: Sequence[str], hook_a: str) -> tuple[str, dict[str, float]]:
    """B's ``blocks.L.hook_resid_post`` with the highest SVCCA against A's ``hook_a`` over ``texts``."""
    a = collect(model_a, tok, texts, hook_a)
    candidates = {f"blocks.{layer}.hook_resid_post": collect(model_b, tok, texts, f"blocks.{layer}.hook_resid_post") for layer in range(n_layers(model_b))}
    return pick_layer(a, candidates)


def fit_between(
    model_a: nn.Module,
    model_b: nn.Module,
    tok: Any,
    texts: Sequence[str],
    hook_a: str,
    hook_b: str | None = None,
    cfg: StitchConfig = StitchConfig(),
    *,
    svcca_texts: int = 64,
    eval_fraction: float = 0.1,
    names: tuple[str | None, str | None] = (None, None),
) -> Stitch:
    """Fit the stitch A.hook_a <-> B.hook_b on ``texts`` (``hook_b`` None: chosen by SVCCA over
    the first ``svcca_texts`` texts). The last ``eval_fraction`` of the texts is held out for
    the FVUs in ``meta``; ``meta["svcca"]`` holds every candidate's score when B's layer was picked."""
    if len(texts) < 4:
        raise InvalidArgument("need at least 4 texts", field="texts")
    scores: dict[str, float] = {}
    if hook_b is None:
        hook_b, scores = choose_layer_b(model_a, model_b, tok, texts[:svcca_texts], hook_a)
    n_eval = max(1, int(len(texts) * eval_fraction))
    fit_texts, eval_texts = texts[:-n_eval], texts[-n_eval:]
    stitch = fit_stitch(
        collect(model_a, tok, fit_texts, hook_a), collect(model_b, tok, fit_texts, hook_b), cfg,
        eval_a=collect(model_a, tok, eval_texts, hook_a), eval_b=collect(model_b, tok, eval_texts, hook_b),
        hook_a=hook_a, hook_b=hook_b, model_a=names[0], model_b=names[1],
    )  # fmt: skip
    if scores:
        stitch.meta["svcca"] = scores
    return stitch


__all__ = ["check_same_tokenizer", "choose_layer_b", "collect", "fit_between"]
