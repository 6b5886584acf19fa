"""The text engine: continuous batching with per-request steering plans.

Requests are submitted (any thread), admitted by the :class:`~.scheduler.Scheduler` at a step
boundary into free slots (plan compiled into the :class:`~.plans.PlanTable`, sampler state,
readout state), prefilled, then decoded one token per step beside every other running row until
they finish; a finished, cancelled or expired request leaves at the end of its step and its slot
is reused. Each row samples with its own generator and is edited under its own plan and scope, so
its tokens equal its solo run whatever shares its steps.

Two ways to drive it, one code path:

- ``engine.start()`` runs the step loop on a background thread (the model replica); callers
  ``submit`` and receive :class:`~sae_runtime.backends.types.StreamEvent` callbacks from that thread,
  ``cancel`` at any time, and ``call`` a function on the engine thread between steps (Encode);
- without the thread, :meth:`generate` and :meth:`stream` step the engine in the caller's thread
  (library use, tests, benchmarks).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from sae_runtime.backends.completion import RowText
from sae_runtime.backends.lm_results import LabelIndex
from sae_runtime.backends.sampling import SlotSampler, new_generator, top_logprobs
from sae_runtime.backends.types import ConditionHit, StreamEvent, TextResult
from sae_runtime.engine.kv import SlotKvCache
from sae_runtime.engine.loop import StepLoop
from sae_runtime.engine.plans import PlanTable
from sae_runtime.engine.request import PreparedText, RequestRun, RequestStatus, SequenceRun
from sae_runtime.engine.results import ResultBuilder
from sae_runtime.engine.scheduler import EngineConfig, Scheduler
from sae_runtime.engine.step import ModalityPlugin, StepRunner
from sae_runtime.errors import Cancelled, DeadlineExceeded
from sae_runtime.mitigation import Action, MitigationResources, decide, mitigated_plan
from sae_runtime.plan import InterventionPlan
from sae_runtime.steering import AttachedSae


@dataclass(frozen=True)
class StepStats:
    """What one step did, for metrics: rows and requests, KV positions held, milliseconds."""

    running_rows: int
    waiting: int
    kv_tokens: int
    step_ms: float
    prefill_tokens: int
    decoded_rows: int
    first_token_ms: tuple[float, ...] = ()  # requests that got their first token this step
    inter_token_ms: tuple[float, ...] = ()  # one per token made ready this step (after the first)


class TextEngine(StepLoop):
    """A text model's step loop. ``saes``: the model's SAEs by name at their sites;
    ``vision_saes``: those of them on a vision tower (read per image position, not per token)."""

    thread_name = "text-engine"

    def __init__(self, model: nn.Module, tokenizer: Any, saes: Mapping[str, AttachedSae], *, eos_ids: frozenset[int],
                 pad_id: int, vocab_size: int, labels: LabelIndex, risk_probe: Any = None,
                 config: EngineConfig = EngineConfig(), plugin: ModalityPlugin | None = None,
                 vision_saes: Sequence[str] = ()) -> None:
        super().__init__()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eos_ids, self.labels, self.risk_probe = eos_ids, labels, risk_probe
        self.vision_saes = frozenset(vision_saes)
        self.d_sae = {n: a.sae.d_sae for n, a in saes.items()}
        self.probe_saes = [n for n, _ in risk_probe.layout.saes] if risk_probe is not None else []
        n_slots = config.max_running_rows
        self.plans = PlanTable(model, saes, n_slots)
        self.results = ResultBuilder(self.plans.readouts, labels, risk_probe, self.d_sae, self.probe_saes, self.vision_saes)
        self.kv = SlotKvCache()
        self.runner = StepRunner(model, self.plans, self.kv, pad_id, plugin)
        self.plugin = plugin
        self.sampler = SlotSampler(n_slots, vocab_size, self.runner.device)
        self.scheduler = Scheduler(config)
        self._free = list(range(n_slots - 1, -1, -1))
        self._running: list[RequestRun] = []
        self._ids = itertools.count()
        self.mitigation_resources = MitigationResources.from_probe(risk_probe)
        self._restarts: list[tuple[SequenceRun, RequestRun]] = []  # rows whose prompt is read again (mitigation)
        self.on_step: Callable[[StepStats], None] | None = None

    # -- submitting ------------------------------------------------------------------------------
    def submit(self, prepared: PreparedText, on_event: Callable[[StreamEvent], None] | None = None, *,
               stream: bool = False, deadline: float | None = None) -> RequestRun:
        """Queue a validated request. ``on_event`` gets the token events (``stream``) and always the
        final event (result or error), from the engine thread. ``deadline``: ``time.monotonic()``
        by which it must end (DeadlineExceeded otherwise, at the next step boundary)."""
        self.config.check_fits(prepared.n_sequences, prepared.reserved_tokens, "sampling.max_new_tokens")
        req = prepared.request
        reads = self._reads(req)
        rows: list[tuple[bool, InterventionPlan | None, int]] = [(False, prepared.plan, -1)]
        if req.include_default:
            rows.append((True, None, -1))
        rows += [(False, plan, v) for v, plan in enumerate(prepared.variant_plans)]
        sequences = []
        for default, plan, variant in rows:
            text = RowText(self.tokenizer, req.sampling.stop, req.sampling.max_new_tokens, self.eos_ids)
            # A stop_when row feeds its last token too: the condition is read at every generated position.
            feeds_last = bool(reads) or (plan is not None and plan.stop_when is not None)
            sequences.append(SequenceRun(default, plan, new_generator(prepared.seed)[0], text, feeds_last,
                                         logprobs=req.logprobs, variant=variant))
        run = RequestRun(next(self._ids), prepared, sequences, on_event, deadline, stream=stream, reads=reads)
        self._enqueue(run)
        return run

    def _reads(self, req: Any) -> dict[str, int]:
        reads = {n: 0 for n in self.probe_saes}
        if req.readout is not None:
            for n in req.readout.saes:
                reads[n] = max(1, req.readout.top_k)
        return reads

    # -- driving ---------------------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self.scheduler.waiting or self._running)

    def generate(self, prepared: Sequence[PreparedText]) -> list[TextResult]:
        """Results of ``prepared``, in order (all submitted at once, so they share steps)."""
        runs = [self.submit(p) for p in prepared]
        self.wait(runs)
        for run in runs:
            if run.error is not None:
                raise run.error
        return [run.result for run in runs]

    def stream(self, prepared: PreparedText) -> Iterator[StreamEvent]:
        """Token events of one request as its steps produce them, then the final event."""
        import queue

        events: queue.SimpleQueue = queue.SimpleQueue()
        run = self.submit(prepared, events.put, stream=True)
        try:
            while True:
                while events.empty():
                    if not self.threaded:
                        self.step()
                    else:
                        run.done.wait(0.05)
                event = events.get()
                yield event
                if event.result is not None or event.error is not None:
                    if event.error is not None:
                        raise event.error
                    return
        finally:
            if not run.status.ended:
                self.cancel(run)

    # -- one step --------------------------------------------------------------------------------
    @torch.inference_mode()  # nothing a step computes is differentiated; the engine's tensors stay in it
    def _step(self, incoming: list[RequestRun]) -> StepStats | None:
        """Retire ended requests, admit waiting ones, run the step's forwards, emit events."""
        self.scheduler.waiting.extend(incoming)
        started = time.monotonic()
        self._retire_stopped(started)
        self.kv.keep(self._live_slots())  # before admission: a freed slot may be taken again this step
        admitted = self.scheduler.admit()
        if not admitted and not self._running and not self._restarts:
            return None
        try:
            stats = self._forwards(admitted, started)
        except Exception as err:  # noqa: BLE001 - the step's requests fail; the engine goes on
            for run in list(self._running):
                self._end(run, RequestStatus.FAILED, err)
            self.kv.keep([])
            self.plans.detach()
            return None
        if not self._running and not self._restarts:
            self.plans.detach()  # idle: the model is plain again
        if self.on_step is not None:
            self.on_step(stats)
        return stats

    def _before_calls(self) -> None:
        self.plans.detach()

    def _retire_stopped(self, now: float) -> None:
        for run in list(self.scheduler.waiting) + self._running:
            if run.cancel_requested:
                self._end(run, RequestStatus.CANCELLED, Cancelled("the request was cancelled"))
            elif run.deadline is not None and now > run.deadline:
                self._end(run, RequestStatus.FAILED, DeadlineExceeded("the request did not finish before its deadline"))

    def _forwards(self, admitted: list[RequestRun], started: float) -> StepStats:
        new_rows: list[SequenceRun] = [seq for seq, _ in self._restarts]
        owners = {id(seq): run for seq, run in self._restarts}
        self._restarts = []
        for run in admitted:
            run.status, run.admitted = RequestStatus.PREFILLING, started
            self._running.append(run)  # first: a failure below ends it like every running request
            for seq in run.sequences:
                seq.slot = self._free.pop()
                self.plans.assign(seq.slot, seq.plan, run.reads)
                self.sampler.assign(seq.slot, run.prepared.request.sampling, seq.generator, run.prepared.prompt_ids)
                new_rows.append(seq)
        for run in admitted:
            run.running_at_admission = len(self._running)
        prefill_tokens = 0
        with self.plans:
            if new_rows:
                owners.update({id(s): run for run in admitted for s in run.sequences})
                if self.plugin is not None:
                    self.plugin.admit([(s, owners[id(s)].prepared) for s in new_rows], self.plans)
                prompts = [owners[id(s)].prepared.prompt_ids for s in new_rows]
                prefill_tokens = sum(len(p) for p in prompts)
                logits = self.runner.prefill(new_rows, prompts)
                self._sample(new_rows, logits)
                for run in admitted:
                    run.status = RequestStatus.DECODING
                self._mitigate(admitted)
            by_slot = {s.slot: s for run in self._running for s in run.sequences}
            self.kv.keep([s for s in self.kv.slots if by_slot[s].needs_feed])  # a first token may have been eos
            decoded = len(self.kv.slots)
            if decoded:
                rows = [by_slot[s] for s in self.kv.slots]
                tokens = torch.tensor([r.text.records[-1].id for r in rows], device=self.runner.device)
                logits = self.runner.decode(tokens)
                for r in rows:
                    r.n_fed = len(r.text.records)
                self._stop_on_conditions(rows)
                sampling = [j for j, r in enumerate(rows) if not r.text.done]
                if sampling:
                    keep = torch.tensor(sampling, device=logits.device)
                    self._sample([rows[j] for j in sampling], logits.index_select(0, keep))
        ttft, itl = self._emit(time.monotonic())
        self.kv.keep(self._live_slots())
        return StepStats(self.scheduler.rows, len(self.scheduler.waiting), self.kv.tokens_in_use,
                         (time.monotonic() - started) * 1e3, prefill_tokens, decoded, tuple(ttft), tuple(itl))

    def _mitigate(self, runs: list[RequestRun]) -> None:
        """Risk-gated mitigation of the steered rows of ``runs`` just prefilled (sae_runtime.mitigation):
        an abstaining row ends with the abstention text; a steered row gets the decision's edits and
        its prompt is read again next step (its first token was sampled without them)."""
        asked = [r for r in runs if r.prepared.request.mitigation is not None and not r.mitigation_decided]
        if not asked or self.risk_probe is None:
            return
        pools = self.plans.readouts.risk_pools([r.steered.slot for r in asked], self.probe_saes, with_generated=False)
        for run, score in zip(asked, self.risk_probe.score_many(pools, "prompt")):
            run.mitigation_decided = True
            decision = decide(run.prepared.request.mitigation, score.probability, self.mitigation_resources)
            seq = run.steered
            if decision.action is Action.ABSTAIN:
                ids = list(self.tokenizer(decision.text, add_special_tokens=False)["input_ids"])
                seq.text.replace_with(ids, decision.text, "stop")
                seq.n_fed = len(seq.text.records)  # nothing more to read: the row leaves this step
                run.mitigation = "abstain"
            elif decision.action is Action.STEER:
                req = run.prepared.request
                seq.plan = mitigated_plan(seq.plan or req.plan, decision)
                seq.text = RowText(self.tokenizer, req.sampling.stop, req.sampling.max_new_tokens, self.eos_ids)
                seq.generator, seq.n_fed = new_generator(run.prepared.seed)[0], 0
                self.plans.assign(seq.slot, seq.plan, run.reads)
                self.sampler.assign(seq.slot, req.sampling, seq.generator, run.prepared.prompt_ids)
                self._restarts.append((seq, run))
                run.mitigation = "steer"

    def _stop_on_conditions(self, rows: list[SequenceRun]) -> None:
        """End the rows whose plan's ``stop_when`` held on the token this decode forward read: that
        token is the last kept, finish_reason "condition" (whatever else ended the row there)."""
        hits = self.plans.stop_hits()
        if not hits:
            return
        for r in rows:
            hit = hits.get(r.slot)
            if hit is not None and r.stopped_by is None:
                _, sae, latent, value = hit
                r.stopped_by = ConditionHit(position=len(r.text.records) - 1, sae=sae, latent=latent, value=value)
                r.text.finish_reason = "condition"

    def _live_slots(self) -> list[int]:
        return [s.slot for run in self._running for s in run.sequences if not s.finished]

    def _sample(self, rows: list[SequenceRun], logits: torch.Tensor) -> None:
        """Sample one token for each of ``rows`` (all still generating) from logits (b, V)."""
        step = self.sampler.step(logits, [r.slot for r in rows])
        n_logprobs = max(r.logprobs for r in rows)
        chosen = top_vals = top_ids = None
        if n_logprobs > 0:
            chosen, top_vals, top_ids = (t.tolist() for t in top_logprobs(step.logprobs, step.tokens, n_logprobs))
        for j, (r, token) in enumerate(zip(rows, step.tokens.tolist())):
            n = r.logprobs
            if n > 0:
                top = tuple((self.tokenizer.decode([t]), float(v)) for t, v in zip(top_ids[j][:n], top_vals[j][:n]))
                r.text.push(token, float(chosen[j]), top)
            else:
                r.text.push(token)

    # -- events and results ----------------------------------------------------------------------
    def _emit(self, now: float) -> tuple[list[float], list[float]]:
        """Token events of streaming requests, final events of finished ones; TTFT / ITL samples."""
        ttft: list[float] = []
        itl: list[float] = []
        streams = []
        for run in list(self._running):
            ready = run.steered.ready
            if ready > run.sent:
                if run.first_token is None:
                    run.first_token = now
                    ttft.append((now - run.submitted) * 1e3)
                    itl.extend([0.0] * (ready - run.sent - 1))
                else:
                    itl.extend([(now - run.last_token) * 1e3 / (ready - run.sent)] * (ready - run.sent))
                run.last_token = now
                if run.stream:
                    streams.append(run)
                else:
                    run.sent = ready
        if streams:
            risks = self.results.running_risks(streams)
            for run, risk in zip(streams, risks):
                ready = run.steered.ready
                for tok in self.results.live_tokens(run, run.sent, ready):
                    run.emit(StreamEvent(token=tok, risk=risk))
                run.sent = ready
        finished = [run for run in self._running if all(s.finished for s in run.sequences)]
        for run, result in zip(finished, self.results.finals(finished, now)):
            run.result = result
            self._end(run, RequestStatus.FINISHED, None)
        return ttft, itl

    def _end(self, run: RequestRun, status: RequestStatus, error: BaseException | None) -> None:
        """``run`` leaves: slots freed, its final event sent, waiters woken."""
        if run in self._running:
            self._running.remove(run)
            self.scheduler.retire(run)
            for seq in run.sequences:
                if seq.slot >= 0:
                    self.plans.release(seq.slot)
                    self._free.append(seq.slot)
                    self._free.sort(reverse=True)  # lowest slot first: the same arrivals get the same slots
                    seq.slot = -1
        elif run in self.scheduler.waiting:
            self.scheduler.waiting.remove(run)
        run.status, run.error = status, error
        run.emit(StreamEvent(token=None, result=run.result) if error is None else StreamEvent(token=None, error=error))
        run.done.set()

    @property
    def running_rows(self) -> int:
        return self.scheduler.rows

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._incoming)


__all__ = ["EngineConfig", "StepStats", "TextEngine"]
