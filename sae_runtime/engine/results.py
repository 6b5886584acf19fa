"""What a text request returns: its result and its streamed tokens, built from the engine's readouts.

:class:`ResultBuilder` turns a request's rows (their text records and the per-slot readouts of
:class:`~.readout.SlotReadouts`) into a :class:`~sae_runtime.backends.types.TextResult`: completions
with per-token latents, pooled and prompt latents, risk scores, variants and timings; and, while
a request streams, its ready tokens and running risk.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from sae_runtime.backends.lm_results import LabelIndex, pooled_latents, position_latents, risk_pools
from sae_runtime.backends.types import Completion, GeneratedToken, TextResult, Timings, VariantResult
from sae_runtime.engine.readout import SlotReadouts
from sae_runtime.engine.request import RequestRun, SequenceRun


class ResultBuilder:
    """Results of one engine's requests. ``readouts``: the engine's per-slot readouts; ``labels``:
    latent labels by SAE; ``risk_probe`` (or None) reads ``probe_saes``; ``d_sae``: widths by SAE;
    ``vision_saes``: the SAEs read per image position, not per token."""

    def __init__(self, readouts: SlotReadouts, labels: LabelIndex, risk_probe: Any, d_sae: Mapping[str, int],
                 probe_saes: Sequence[str], vision_saes: frozenset[str]) -> None:
        self.readouts, self.labels, self.risk_probe = readouts, labels, risk_probe
        self.d_sae, self.probe_saes, self.vision_saes = d_sae, list(probe_saes), vision_saes

    def running_risks(self, runs: Sequence[RequestRun]) -> list[float | None]:
        """The streamed rows' risk so far (prompt and generated tokens), one per run; None without a probe."""
        if self.risk_probe is None:
            return [None] * len(runs)
        pools = self.readouts.risk_pools([r.steered.slot for r in runs], self.probe_saes, with_generated=True)
        return [s.probability for s in self.risk_probe.score_many(pools, "final")]

    def live_tokens(self, run: RequestRun, start: int, upto: int) -> list[GeneratedToken]:
        """Streamed tokens ``start .. upto-1`` of the steered row, latents read off this step's chunks."""
        req, seq = run.prepared.request, run.steered
        names = [n for n in req.readout.saes if n not in self.vision_saes] if req.readout else []
        out = []
        for j, rec in enumerate(seq.text.records[start:upto], start):
            latents: tuple = ()
            if names:
                one = {n: self.readouts.decode_position(seq.slot, n, j) for n in names}
                if all(v is not None for v in one.values()):
                    latents = position_latents(one, "decode", names, req.readout.top_k, self.labels)[0]
            out.append(GeneratedToken(id=rec.id, text=rec.text, logprob=rec.logprob, top_logprobs=rec.top_logprobs, latents=latents))
        return out

    def finals(self, runs: Sequence[RequestRun], now: float) -> list[TextResult]:
        """The results of ``runs``, which end at ``now`` (``time.monotonic()``): their readouts are
        finished here, and the risk probe scores them all in one pass per head."""
        readouts = [[self.readouts.finish(s.slot) for s in run.sequences] for run in runs]
        prompt: list = [None] * len(runs)
        final: list = [None] * len(runs)
        variant: dict[tuple[int, int], Any] = {}
        if self.risk_probe is not None and runs:
            def pools(readout: Mapping[str, Any], with_generated: bool) -> Any:
                return risk_pools(readout, self.probe_saes, self.d_sae, with_generated=with_generated)

            n = len(runs)
            variant_keys = [(i, j) for i, run in enumerate(runs) for j, seq in enumerate(run.sequences) if seq.variant >= 0]
            prompt = self.risk_probe.score_many([pools(r[0], False) for r in readouts], "prompt")
            scored = self.risk_probe.score_many([pools(r[0], True) for r in readouts]
                                                + [pools(readouts[i][j], True) for i, j in variant_keys], "final")
            final, variant = scored[:n], dict(zip(variant_keys, scored[n:]))
        return [self._result(run, readouts[i], prompt[i], final[i], {j: variant.get((i, j)) for j in range(len(run.sequences))}, now)
                for i, run in enumerate(runs)]

    def _result(self, run: RequestRun, readouts: list[Mapping[str, Any]], risk_prompt: Any, risk_final: Any,
                variant_risks: Mapping[int, Any], now: float) -> TextResult:
        req = run.prepared.request
        steered = readouts[0]
        names = list(req.readout.saes) if req.readout else []
        text_names = [n for n in names if n not in self.vision_saes]
        vision_names = [n for n in names if n in self.vision_saes]
        top_k = req.readout.top_k if req.readout else 1
        completions = []
        for seq, readout in zip(run.sequences, readouts):
            tokens = self._completion_tokens(run, seq, readout, text_names, top_k)
            completions.append(Completion(text=seq.text.text, tokens=tokens, finish_reason=seq.text.finish_reason or "length",
                                          stopped_by=seq.stopped_by))
        default = next((c for s, c in zip(run.sequences, completions) if s.default), None)
        variants = [VariantResult(completion=completion, risk_final=variant_risks.get(j), plan=seq.plan)
                    for j, (seq, completion) in enumerate(zip(run.sequences, completions)) if seq.variant >= 0]
        return TextResult(
            steered=completions[0],
            default=default,
            plan=run.steered.plan,
            variants=tuple(variants),
            prompt_latents=tuple(position_latents(steered, "prefill", text_names, top_k, self.labels)) if text_names else (),
            pooled=pooled_latents(steered, names, top_k, self.labels) if names else (),
            risk_prompt=risk_prompt,
            risk_final=risk_final,
            timings=Timings(
                queue_ms=((run.admitted or now) - run.submitted) * 1e3,
                compute_ms=(now - (run.admitted or now)) * 1e3,
                first_token_ms=((run.first_token or now) - (run.admitted or now)) * 1e3,
                batch_size=run.running_at_admission,
            ),
            vision_latents=tuple(position_latents(steered, "prefill", vision_names, top_k, self.labels)) if vision_names else (),
            mitigation=run.mitigation,
        )

    def _completion_tokens(self, run: RequestRun, seq: SequenceRun, readout: Mapping[str, Any], names: list[str],
                           top_k: int) -> tuple[GeneratedToken, ...]:
        per_position = position_latents(readout, "decode", names, top_k, self.labels) if names else []
        return tuple(
            GeneratedToken(id=r.id, text=r.text, logprob=r.logprob, top_logprobs=r.top_logprobs,
                           latents=per_position[j] if j < len(per_position) else ())
            for j, r in enumerate(seq.text.records)
        )


__all__ = ["ResultBuilder"]
