"""Admission each step: FIFO, a token budget per step, a cap on running rows, a KV-token bound.

A request is admitted whole (its steered row and its unsteered twin together). Admission stops
at the first waiting request that does not fit, so requests are admitted in arrival order and a
long one is never overtaken indefinitely; nothing is ever dropped: a request that does not fit
waits for rows to finish. The KV bound counts *reserved* tokens (prompt + max_new_tokens per
sequence), so a running row can always finish without evicting anyone.
"""

from __future__ import annotations

from collections import deque

from sae_runtime.backends.spec import EngineConfig
from sae_runtime.engine.request import RequestRun


class Scheduler:
    """Decides, each step, which waiting requests join the running rows."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.waiting: deque[RequestRun] = deque()
        self.reserved = 0  # KV tokens reserved by running requests
        self.rows = 0  # running sequences

    def admit(self) -> list[RequestRun]:
        """Pop the waiting requests that fit this step, in arrival order."""
        c = self.config
        budget = c.max_tokens_per_step - self.rows
        admitted: list[RequestRun] = []
        while self.waiting:
            run = self.waiting[0]
            n = run.prepared.n_sequences
            prompt_tokens = n * len(run.prepared.prompt_ids)
            reserved = run.prepared.reserved_tokens
            idle = not admitted and self.rows == 0
            if self.rows + n > c.max_running_rows or self.reserved + reserved > c.max_kv_tokens:
                break
            if prompt_tokens > budget and not idle:
                break
            self.waiting.popleft()
            admitted.append(run)
            budget -= prompt_tokens
            self.rows += n
            self.reserved += reserved
        return admitted

    def retire(self, run: RequestRun) -> None:
        """``run`` (admitted earlier) leaves: its rows and reservation are free again."""
        self.rows -= run.prepared.n_sequences
        self.reserved -= run.prepared.reserved_tokens


__all__ = ["EngineConfig", "Scheduler"]
