"""ComputeSteeringVector: the difference of mean activations (DiffMean / CAA) between two prompt sets.

For a hook site s and prompt sets P (positive) and N (negative), with a_t(p) the activation at s
of position t of prompt p (the model's plain forward, no steering, every prompt position):

    d = mean over (p in P, t) of a_t(p)  -  mean over (q in N, t) of a_t(q)        (d_site,)

Each prompt runs alone (no padding), so the vector does not depend on how prompts are batched.
With an SAE, the result also lists the latents whose decoder rows are closest to d by cosine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from sae_runtime.backends.types import SteeringVectorRequest, SteeringVectorResult, label_of
from sae_runtime.errors import InvalidArgument, NotFound, TooLarge
from sae_runtime.sites import HookSite

if TYPE_CHECKING:
    from sae_runtime.backends.causal_lm import CausalLmBackend

#: Most closest latents a request may ask for.
MAX_CLOSEST = 256


def check_request(backend: "CausalLmBackend", request: SteeringVectorRequest) -> HookSite:
    """Validate a steering-vector request; returns its (text) hook site. Errors name the field."""
    site = HookSite.parse(request.site, field="site")
    if not site.is_text:
        raise InvalidArgument(f"site {site.name} is not a language-model site", field="site")
    try:
        width = site.width(backend.model)
    except NotFound as err:  # a layer the model lacks
        raise NotFound(err.message, field="site") from None
    limit = backend.limits.max_vector_prompts
    for name in ("positive", "negative"):
        prompts = getattr(request, name)
        if not prompts:
            raise InvalidArgument("needs at least one prompt", field=name)
        if len(prompts) > limit:
            raise TooLarge(f"{len(prompts)} prompts exceed the limit of {limit}", field=name)
    if request.sae and request.sae not in backend.saes:
        raise NotFound(f"unknown SAE {request.sae!r} (available: {', '.join(sorted(backend.saes)) or 'none'})", field="sae")
    if request.sae and backend.saes[request.sae].d_in != width:
        raise InvalidArgument(f"SAE {request.sae!r} reads {backend.saes[request.sae].d_in}-dim inputs, site {site.name} "
                              f"has width {width}", field="sae")
    if not isinstance(request.top_n, int) or not 1 <= request.top_n <= MAX_CLOSEST:
        raise InvalidArgument(f"must be an integer in [1, {MAX_CLOSEST}]", field="top_n")
    return site


def prompt_activation_sum(backend: "CausalLmBackend", site: HookSite, prompts: Sequence[str], field: str) -> tuple[Tensor, int]:
    """Sum over every position of every prompt of the activation at ``site`` (float64), and the count."""
    from sae_runtime.backends.lm_validation import prompt_token_ids

    total: Tensor | None = None
    count = 0
    seen: list[Tensor] = []

    def capture(x: Tensor, grid: object) -> None:
        seen.append(x.detach())

    device = next(backend.model.parameters()).device
    handle = site.attach(backend.model, capture)
    try:
        for n, prompt in enumerate(prompts):
            ids = prompt_token_ids(backend, prompt, (), f"{field}[{n}]")
            seen.clear()
            with torch.no_grad():
                backend.model(input_ids=torch.tensor([ids], device=device))
            x = seen[0][0].double()  # (T, d)
            total = x.sum(0) if total is None else total + x.sum(0)
            count += x.shape[0]
    finally:
        handle.remove()
    assert total is not None
    return total, count


def closest_latents(direction: Tensor, backend: "CausalLmBackend", sae_name: str, top_n: int) -> tuple[tuple[int, str | None, float], ...]:
    """The ``top_n`` latents of ``sae_name`` whose decoder rows have the highest cosine with ``direction``."""
    sae = backend.saes[sae_name]
    rows = sae.decoder_rows(torch.arange(sae.d_sae, device=sae.W_dec.device)).detach().double().cpu()
    cos = torch.nn.functional.cosine_similarity(rows, direction.double().cpu()[None], dim=-1)
    values, idx = cos.topk(min(top_n, sae.d_sae))
    return tuple((int(i), label_of(sae.labels, int(i)), float(v)) for v, i in zip(values.tolist(), idx.tolist()))


def compute_steering_vector(backend: "CausalLmBackend", request: SteeringVectorRequest) -> SteeringVectorResult:
    """DiffMean of ``request`` on ``backend``'s model (see the module docstring). Call it where the
    model's hooks are not in use by a running step (the engine's ``call``)."""
    site = check_request(backend, request)
    pos_sum, n_pos = prompt_activation_sum(backend, site, request.positive, "positive")
    neg_sum, n_neg = prompt_activation_sum(backend, site, request.negative, "negative")
    direction = (pos_sum / n_pos - neg_sum / n_neg).float()
    closest = closest_latents(direction, backend, request.sae, request.top_n) if request.sae else ()
    return SteeringVectorResult(site=site.name, direction=direction.cpu(), n_positive_tokens=n_pos,
                                n_negative_tokens=n_neg, sae=request.sae, closest=closest)


__all__ = ["MAX_CLOSEST", "check_request", "closest_latents", "compute_steering_vector", "prompt_activation_sum"]
