"""The one validated text request and its lifecycle in the engine.

:class:`PreparedText` is what ``backend.validate`` returns for a text request: everything the
engine needs, computed once at the edge of sae_runtime (token ids, the plan with labels resolved
and mitigation edits appended, the seed, and for LLaVA the image's pixel values). Nothing
downstream tokenises, resolves or decodes again.

In the engine a request runs as one or more :class:`SequenceRun` (the steered row; with
``include_default``, its unsteered twin; then one row per variant plan: same prompt, sampling
parameters and seed), each holding a slot while it runs. Lifecycle of a request (:class:`RequestStatus`):
``waiting -> prefilling -> decoding -> finished | cancelled | failed``.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from sae_runtime.backends.completion import RowText
from sae_runtime.backends.types import StreamEvent, TextRequest
from sae_runtime.plan import InterventionPlan


@dataclass(frozen=True)
class PreparedText:
    """A validated text request. ``request`` keeps what the caller asked (its plan resolved);
    ``plan`` is the steered row's plan as run (mitigation edits appended)."""

    request: TextRequest
    prompt_ids: tuple[int, ...]
    plan: InterventionPlan
    seed: int
    pixel_values: Tensor | None = None  # LLaVA: (1, 3, H, W), in the model's dtype
    #: The request's variant plans, resolved (``request.variants`` keeps them too).
    variant_plans: tuple[InterventionPlan, ...] = ()

    @property
    def n_sequences(self) -> int:
        return 1 + int(self.request.include_default) + len(self.variant_plans)

    @property
    def reserved_tokens(self) -> int:
        """KV positions the request may need at most (prompt + new tokens, per sequence)."""
        return self.n_sequences * (len(self.prompt_ids) + self.request.sampling.max_new_tokens)


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.CANCELLED, RequestStatus.FAILED)


@dataclass
class SequenceRun:
    """One engine row: a slot, its text bookkeeping and how far the model has read it."""

    default: bool  # the unsteered twin
    plan: InterventionPlan | None
    generator: torch.Generator
    text: RowText
    reads: bool  # its latents are recorded (readout or risk probe): the last kept token is run once more
    slot: int = -1
    n_fed: int = 0  # kept tokens that have been input to a forward
    logprobs: int = 0  # top-n log-probs per generated token
    features: Any = None  # LLaVA: the image features computed at admission, for the prefill
    variant: int = -1  # index into the request's variants, or -1 (the steered row or its twin)
    stopped_by: Any = None  # the ConditionHit that ended it (its plan's stop_when), if any

    @property
    def finished(self) -> bool:
        """No forward will change this row any more."""
        return self.text.done and (not self.reads or self.n_fed >= len(self.text.records))

    @property
    def ready(self) -> int:
        """Kept tokens whose record is final (latents included when the row reads them)."""
        return self.n_fed if self.reads else len(self.text.records)

    @property
    def needs_feed(self) -> bool:
        return len(self.text.records) > self.n_fed and (not self.text.done or self.reads)


class EventSink:
    """Delivers a request's events to its ``on_event`` callback (an attribute of the subclass)."""

    on_event: Callable[[StreamEvent], None] | None

    def emit(self, event: StreamEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a consumer gone away must not stop the engine
                self.on_event = None


@dataclass
class RequestRun(EventSink):
    """A request inside the engine: its sequences, status, timestamps and event sink."""

    id: int
    prepared: PreparedText
    sequences: list[SequenceRun]
    on_event: Callable[[StreamEvent], None] | None
    deadline: float | None  # time.monotonic() by which it must end, or None
    stream: bool = False  # token events go to on_event as they are ready
    reads: dict[str, int] = field(default_factory=dict)  # sae -> top-k per position (0 = pools only)
    status: RequestStatus = RequestStatus.WAITING
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    running_at_admission: int = 0  # requests running once it was admitted (its own included)
    sent: int = 0  # streamed tokens of the steered row
    cancel_requested: bool = False
    mitigation: str = ""  # what its mitigation did: "" (not asked / not gated), "abstain" or "steer"
    mitigation_decided: bool = False
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def steered(self) -> SequenceRun:
        return self.sequences[0]



__all__ = ["EventSink", "PreparedText", "RequestRun", "RequestStatus", "SequenceRun"]
