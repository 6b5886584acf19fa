"""Causal-LM backend: a HF causal LM with SAEs at hook sites, generating under per-request plans.

Usage::

    backend = CausalLmBackend.from_spec(ModelSpec(name="tiny", kind="causal_lm", path=dir, saes=...))
    request = backend.validate(TextRequest(prompt="the cat", plan=plan, sampling=SamplingParams(...)))
    [result] = backend.generate([request])
    for event in backend.stream(request): ...

One ``generate`` call runs its requests as ONE batch: a left-padded prefill, then one KV-cached
decode step per token for every row (:mod:`.lm_loop`). Each row's plan is applied by a
SteeringContext at the positions its scope names (``prompt`` = prefill positions, ``generated`` =
decode positions); each row samples with its own generator (:mod:`.sampling`), so a row's tokens
do not depend on its batch mates. ``include_default`` adds the unsteered twin of a request (no
edits, same prompt, sampling parameters and seed) as one more row of the same batch.

Readouts (``request.readout``) give per prompt position and per generated token the top-k
latents of the named SAEs before/after the edits, and per sequence the pooled latents (see
:mod:`.lm_results`). With a risk probe, ``risk_prompt`` scores the prompt pools (the probe's
prompt head) and ``risk_final`` the prompt + generated pools (final head), both from the
after-edit latents; ``mitigate_risk_top_n`` appends ablations of the probe's N most
risk-positive latents to the plan (under the plan's scope).

Log-probs (``request.logprobs = n``) are those of :mod:`.sampling`: log_softmax of the logits
after repetition/frequency penalties and temperature (0 counted as 1), before top-k/top-p.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from sae_runtime.backends.completion import eos_ids_of
from sae_runtime.backends.lm_loop import LoopState, RowSpec, decode_loop
from sae_runtime.backends.lm_results import LabelIndex, pooled_latents, position_latents, risk_pools
from sae_runtime.backends.sampling import new_generator
from sae_runtime.backends.spec import Limits, ModelSpec
from sae_runtime.backends.types import (
    Backend,
    Completion,
    EncodeRequest,
    EncodeResult,
    GeneratedToken,
    ImageRequest,
    ModelInfo,
    SaeInfo,
    StreamEvent,
    TextRequest,
    TextResult,
    Timings,
)
from sae_runtime.backends.lm_validation import check_encode, check_text_request, prompt_token_ids
from sae_runtime.errors import InvalidArgument, TooLarge
from sae_runtime.plan import InterventionPlan, ReadoutSpec
from sae_runtime.saes.base import Sae
from sae_runtime.sites import HookSite
from sae_runtime.steering import AttachedSae, SteeringContext, check_widths


@dataclass
class _Row:
    """A batch row: which request it answers and whether it is the unsteered twin."""

    request: int
    default: bool
    spec: RowSpec
    plan: InterventionPlan | None


class CausalLmBackend(Backend):
    """A HF causal LM, its tokenizer, its SAEs (name -> Sae, ``cfg.hook_name`` set) and risk probe."""

    kind = "causal_lm"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        saes: Mapping[str, Sae],
        *,
        risk_probe: Any = None,
        name: str = "causal_lm",
        description: str = "",
        limits: Limits = Limits(),
        version: str = "",
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.saes = dict(saes)
        self.risk_probe = risk_probe
        self.name, self.description, self.limits, self.version = name, description, limits, version
        self.attached: dict[str, AttachedSae] = {}
        for sae_name, sae in self.saes.items():
            if not sae.cfg.hook_name:
                raise InvalidArgument(f"SAE {sae_name!r} names no hook site", field=f"saes.{sae_name}.hook_name")
            site = HookSite.parse(sae.cfg.hook_name, field=f"saes.{sae_name}.hook_name")
            if not site.is_text:
                raise InvalidArgument(f"site {site.name} is not a causal-LM site", field=f"saes.{sae_name}.hook_name")
            sae.eval().requires_grad_(False)
            self.attached[sae_name] = AttachedSae(sae_name, sae, site)
        check_widths(model, self.attached)
        if risk_probe is not None:
            for sae_name, d in risk_probe.layout.saes:
                if sae_name not in self.saes or self.saes[sae_name].d_sae != d:
                    raise InvalidArgument(f"the risk probe reads SAE {sae_name!r} with {d} latents, which this model lacks", field="risk_probe")
        self.labels = LabelIndex({n: s.labels for n, s in self.saes.items()})
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_positions = getattr(text_cfg, "max_position_embeddings", None)
        self.eos_ids = eos_ids_of(model.config, getattr(model, "generation_config", None), tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "CausalLmBackend":
        """Load model and tokenizer (``from_pretrained``: a local directory or a hub id), the SAEs
        and the risk probe ``spec`` names. FormatError names the path that failed to load."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sae_runtime.errors import FormatError
        from sae_runtime.backends.loading import load_spec_saes

        dtype = getattr(torch, spec.dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(spec.path)
        except OSError as err:
            raise FormatError(f"cannot load a causal LM and tokenizer: {err}", field=spec.path) from None
        model = model.to(spec.device).eval()
        saes, load_timings = load_spec_saes(spec)
        probe = None
        if spec.risk_probe:
            from sae_runtime.risk import RiskProbe

            probe = RiskProbe.load(spec.risk_probe)
        backend = cls(model, tokenizer, saes, risk_probe=probe, name=spec.name, description=spec.description, limits=spec.limits)
        backend.load_timings = load_timings
        return backend

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            kind=self.kind,
            description=self.description,
            saes=tuple(
                SaeInfo(name=n, hook_name=self.attached[n].site.name, architecture=s.cfg.architecture, d_in=s.d_in,
                        d_sae=s.d_sae, has_labels=bool(s.labels), version=self.version)
                for n, s in self.saes.items()
            ),
            has_risk_probe=self.risk_probe is not None,
            version=self.version,
        )

    # -- validation --------------------------------------------------------------------------
    def validate(self, request: TextRequest | ImageRequest | EncodeRequest, field_prefix: str = "") -> TextRequest | EncodeRequest:
        """Check a request against the model's limits, SAEs and tokenizer; labels are resolved in
        the returned request's plan. Errors name the field (``sampling.top_p``, ``plan.edits[0].latents``)."""
        if isinstance(request, EncodeRequest):
            check_encode(self, request, field_prefix)
            return request
        if not isinstance(request, TextRequest):
            raise InvalidArgument(f"causal_lm generates text, got a {type(request).__name__}", field=field_prefix.rstrip(".") or None)
        return check_text_request(self, request, field_prefix)

    # -- generation --------------------------------------------------------------------------
    def generate(self, requests: Sequence[TextRequest]) -> list[TextResult]:
        """Generate for the requests, ``limits.max_batch_size`` of them per batched pass.

        Every request is validated first (again: cheap and idempotent), so an error names its
        request (``requests[2].sampling.top_p``) before anything runs. Rows are isolated, so how
        requests are split into passes does not change any result.
        """
        if not requests:
            return []
        for i, r in enumerate(requests):
            self.validate(r, f"requests[{i}]." if len(requests) > 1 else "")
        limit = max(1, self.limits.max_batch_size)
        results: list[TextResult] = []
        for start in range(0, len(requests), limit):
            run = self._run(requests[start : start + limit])
            state = None
            for state in run.loop:
                pass
            results.extend(run.results(state))
        return results

    def stream(self, request: TextRequest) -> Iterator[StreamEvent]:
        """Yield one StreamEvent per generated token of the steered row (with the running risk when
        the model has a probe), then a final event whose ``result`` is the full TextResult, equal to
        ``generate([request])[0]`` (token latents and risk are attached once the token itself has run
        through the model, i.e. one decode step after it was sampled)."""
        events = self.stream_many([request])
        try:
            for _, event in events:
                yield event
        finally:
            events.close()

    def stream_many(self, requests: Sequence[TextRequest], streaming: Sequence[bool] | None = None) -> Iterator[tuple[int, StreamEvent]]:
        """Generate for ``requests`` in ONE batched pass, yielding ``(request index, StreamEvent)``.

        Requests flagged in ``streaming`` (default: all) get their token events as :meth:`stream`
        gives them, interleaved step by step; when the pass ends every request gets its final event
        (``result`` = what :meth:`generate` returns for it), in request order. At most
        ``limits.max_batch_size`` requests.
        """
        run = self._run(requests)
        flags = [True] * len(requests) if streaming is None else list(streaming)
        if len(flags) != len(requests):
            raise ValueError(f"{len(flags)} streaming flags for {len(requests)} requests")
        steered = run.steered_rows()
        sent = [0] * len(requests)
        try:
            state = None
            for state in run.loop:
                fresh = [i for i in range(len(requests)) if flags[i] and state.rows[steered[i]].ready > sent[i]]
                if not fresh:
                    continue
                risks = run._risks([steered[i] for i in fresh], final=True) if self.risk_probe is not None else [None] * len(fresh)
                for i, risk in zip(fresh, risks):
                    ready = state.rows[steered[i]].ready
                    for tok in run.tokens(state, steered[i], start=sent[i], upto=ready):
                        yield i, StreamEvent(token=tok, risk=None if risk is None else risk.probability)
                    sent[i] = ready
            for i, result in enumerate(run.results(state)):
                yield i, StreamEvent(token=None, result=result)
        finally:
            run.loop.close()  # detach the hooks now, also when the consumer stops early (run <-> loop is a cycle)

    def _run(self, requests: Sequence[TextRequest]) -> "_BatchRun":
        """One batched pass over at most ``limits.max_batch_size`` requests."""
        if len(requests) > self.limits.max_batch_size:
            raise TooLarge(f"{len(requests)} requests exceed the batch limit of {self.limits.max_batch_size}", field="requests")
        checked = [check_text_request(self, r, f"requests[{i}]." if len(requests) > 1 else "") for i, r in enumerate(requests)]
        return _BatchRun(self, checked)

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, request: EncodeRequest) -> EncodeResult:
        """Top latents of ``request.saes`` at every position of ``request.text`` (no generation), the
        pooled latents, and the probe's prompt-head risk when the model has a probe."""
        check_encode(self, request)
        ids = prompt_token_ids(self, request.text, (), "text")
        names = list(request.saes)
        probe_saes = [n for n, _ in self.risk_probe.layout.saes] if self.risk_probe is not None else []
        read = list(dict.fromkeys(names + probe_saes))
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        with torch.no_grad():
            if read:
                ctx = SteeringContext(self.model, self.attached, [None], ReadoutSpec(tuple(read), max(request.top_k, 1)))
                with ctx:
                    ctx.prefill()
                    self.model(input_ids=input_ids)
                readout = ctx.readouts()[0]
            else:
                readout = {}
        positions = position_latents(readout, "prefill", names, request.top_k, self.labels) if names else [() for _ in ids]
        risk = None
        if self.risk_probe is not None:
            d_sae = {n: self.saes[n].d_sae for n in probe_saes}
            risk = self.risk_probe.score_prompt(risk_pools(readout, probe_saes, d_sae, with_generated=False))
        return EncodeResult(
            tokens=tuple(self.tokenizer.decode([i]) for i in ids),
            latents=tuple(positions),
            pooled=pooled_latents(readout, names, request.top_k, self.labels),
            risk=risk,
        )


class _BatchRun:
    """One batched generation: rows, steering context, the running loop, and result assembly."""

    def __init__(self, backend: CausalLmBackend, requests: Sequence[TextRequest]) -> None:
        self.backend = backend
        self.requests = list(requests)
        self.started = time.perf_counter()
        probe = backend.risk_probe
        self.probe_saes = [n for n, _ in probe.layout.saes] if probe is not None else []
        self.rows: list[_Row] = []
        for i, req in enumerate(self.requests):
            ids = prompt_token_ids(backend, req.prompt, req.messages, "prompt")
            gen, seed = new_generator(req.sampling.seed)
            reads = bool(req.readout and req.readout.saes) or probe is not None
            plan = req.plan
            if req.mitigate_risk_top_n > 0:
                from sae_runtime.risk import mitigation_edits

                plan = replace(plan, edits=plan.edits + mitigation_edits(probe, req.mitigate_risk_top_n))
            self.rows.append(_Row(i, False, RowSpec(ids, req.sampling, gen, req.logprobs, reads), plan))
            if req.include_default:
                twin, _ = new_generator(seed)
                self.rows.append(_Row(i, True, RowSpec(list(ids), req.sampling, twin, req.logprobs, reads), None))
        read = [s for r in self.requests if r.readout for s in r.readout.saes] + self.probe_saes
        read = list(dict.fromkeys(read))
        top_k = max([r.readout.top_k for r in self.requests if r.readout] or [1])
        self.ctx = SteeringContext(backend.model, backend.attached, [r.plan for r in self.rows], ReadoutSpec(tuple(read), top_k) if read else None)
        self._readouts: list[dict] | None = None
        self._readouts_at = -1
        self.state: LoopState | None = None
        self.loop = self._loop()

    def _loop(self) -> Iterator[LoopState]:
        b = self.backend
        with self.ctx:  # hooks only: decode_loop sets grad mode per forward (thread-safe resumption)
            for state in decode_loop(b.model, b.tokenizer, [r.spec for r in self.rows], steering=self.ctx,
                                     eos_ids=b.eos_ids, pad_id=b.pad_id, vocab_size=b.vocab_size):
                self.state = state
                yield state

    def steered_rows(self) -> list[int]:
        """Per request, the index of its steered row (its unsteered twin, if any, is another row)."""
        return [next(j for j, r in enumerate(self.rows) if r.request == i and not r.default) for i in range(len(self.requests))]

    # -- readouts ------------------------------------------------------------------------------
    def readouts(self) -> list[dict]:
        """Per row: {sae: SaeReadout}, refreshed once per forward."""
        forwards = self.state.forwards if self.state is not None else 0
        if self._readouts is None or self._readouts_at != forwards:
            self._readouts = self.ctx.readouts() if self.ctx.readout is not None else [{} for _ in self.rows]
            self._readouts_at = forwards
        return self._readouts

    def tokens(self, state: LoopState, row: int, start: int = 0, upto: int | None = None) -> list[GeneratedToken]:
        """GeneratedTokens ``start .. upto-1`` of ``row``, with latents when the request reads any."""
        records = state.rows[row].text.records
        upto = len(records) if upto is None else upto
        req = self.requests[self.rows[row].request]
        latents: list[tuple] = []
        if req.readout and req.readout.saes:
            latents = position_latents(self.readouts()[row], "decode", req.readout.saes, req.readout.top_k, self.backend.labels,
                                       count=upto, start=start)
        return [
            GeneratedToken(id=r.id, text=r.text, logprob=r.logprob, top_logprobs=r.top_logprobs,
                           latents=latents[j] if j < len(latents) else ())
            for j, r in enumerate(records[start:upto])
        ]

    def _risks(self, rows: Sequence[int], final: bool) -> list[Any]:
        """Risk scores of plan ``rows`` (the final head, or the prompt head), one vectorised pass."""
        b = self.backend
        d_sae = {n: b.saes[n].d_sae for n in self.probe_saes}
        pools = [risk_pools(self.readouts()[row], self.probe_saes, d_sae, with_generated=final) for row in rows]
        return b.risk_probe.score_many(pools, "final" if final else "prompt")

    def _risk(self, row: int, final: bool) -> Any:
        return self._risks([row], final)[0]

    def running_risk(self, row: int) -> float:
        """The final head's probability on the prompt and the tokens generated so far."""
        return self._risk(row, final=True).probability

    # -- results -------------------------------------------------------------------------------
    def results(self, state: LoopState) -> list[TextResult]:
        compute_ms = (time.perf_counter() - self.started) * 1000.0
        out: list[TextResult] = []
        steered_rows = self.steered_rows()
        has_probe = self.backend.risk_probe is not None
        risk_prompt = self._risks(steered_rows, final=False) if has_probe else [None] * len(steered_rows)
        risk_final = self._risks(steered_rows, final=True) if has_probe else [None] * len(steered_rows)
        for i, req in enumerate(self.requests):
            steered = steered_rows[i]
            default = next((j for j, r in enumerate(self.rows) if r.request == i and r.default), None)
            prompt_latents: tuple = ()
            pooled: tuple = ()
            if req.readout and req.readout.saes:
                readout = self.readouts()[steered]
                prompt_latents = tuple(position_latents(readout, "prefill", req.readout.saes, req.readout.top_k, self.backend.labels))
                pooled = pooled_latents(readout, req.readout.saes, req.readout.top_k, self.backend.labels)
            out.append(TextResult(
                steered=self._completion(state, steered),
                default=None if default is None else self._completion(state, default),
                prompt_latents=prompt_latents,
                pooled=pooled,
                risk_prompt=risk_prompt[i],
                risk_final=risk_final[i],
                timings=Timings(compute_ms=compute_ms),
            ))
        return out

    def _completion(self, state: LoopState, row: int) -> Completion:
        text = state.rows[row].text
        return Completion(text=text.text, tokens=tuple(self.tokens(state, row)), finish_reason=text.finish_reason or "length")


__all__ = ["CausalLmBackend"]
