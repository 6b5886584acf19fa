"""Request batching for one replica: a batch forms when the replica is free to run it.

``@serve.batch`` forms the next batch as soon as the current one has *started*: while batch A
runs, requests arriving within ``batch_wait_timeout_s`` of the first queued one become batch B,
later ones batch C, and B and C wait for A in line. On a replica that runs one batch at a time
(our backends do: hooks live on shared modules) that caps batches at what arrives inside one wait
window, about 5 rows at concurrency 16 on the demo LM.

:class:`ReplicaBatcher` collects instead while the replica is busy: when a batch finishes, every
request queued meanwhile (up to ``max_batch_size``) joins the next one at once, and only a batch
that is not yet full waits up to ``batch_wait_timeout_s`` for company. Under load batches grow to
the concurrency; a lone request on an idle replica waits at most the configured timeout.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, Sequence, TypeVar

Job = TypeVar("Job")
Outcome = TypeVar("Outcome")


class ReplicaBatcher(Generic[Job, Outcome]):
    """Runs ``run(jobs) -> outcomes`` (same length and order) on batches of submitted jobs, one
    batch at a time. Must be used from one event loop (the replica's)."""

    def __init__(self, run: Callable[[list[Job]], Awaitable[Sequence[Outcome]]], max_batch_size: int, batch_wait_timeout_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
        self._run = run
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._queue: asyncio.Queue[tuple[Job, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, job: Job) -> Outcome:
        """Queue ``job`` and wait for its outcome. Cancelling the caller drops a job that has not
        started; a job already running finishes (its outcome is discarded)."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._serve_forever())
        assert self._queue is not None
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, future))
        return await future

    async def _next_batch(self) -> list[tuple[Job, asyncio.Future]]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.batch_wait_timeout_s
        while len(batch) < self.max_batch_size:
            while len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            remaining = deadline - loop.time()
            if len(batch) >= self.max_batch_size or remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [(job, fut) for job, fut in batch if not fut.done()]  # callers gone before the start

    async def _serve_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                outcomes = list(await self._run([job for job, _ in batch]))
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} jobs returned {len(outcomes)} outcomes")
            except Exception as err:  # noqa: BLE001 - every caller of this batch gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, fut), outcome in zip(batch, outcomes):
                if not fut.done():
                    fut.set_result(outcome)
