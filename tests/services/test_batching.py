"""ReplicaBatcher: batches form while the replica is busy, respect the size cap, keep each caller's
outcome, isolate failures to their batch and skip callers that left before their batch started."""

import asyncio

import pytest

from services.batching import ReplicaBatcher


class Recorder:
    """A stand-in backend call: records each batch, holds it until released, echoes job * 10."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_on = fail_on

    async def __call__(self, jobs: list[int]) -> list[int]:
        self.batches.append(list(jobs))
        await self.release.wait()
        if self.fail_on in jobs:
            raise ValueError(f"bad job {self.fail_on}")
        return [j * 10 for j in jobs]


async def _until(predicate, timeout: float = 5.0) -> None:
    async def poll():
        while not predicate():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout)


def test_requests_queued_while_busy_form_the_next_batch():
    async def main():
        run = Recorder()
        batcher = ReplicaBatcher(run, max_batch_size=16, batch_wait_timeout_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await _until(lambda: len(run.batches) == 1)  # batch [0] is running
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0.01)
        assert run.batches == [[0]]  # nothing else starts while the replica is busy
        run.release.set()
        results = await asyncio.gather(first, *rest)
        assert results == [i * 10 for i in range(11)]
        assert run.batches == [[0], list(range(1, 11))]

    asyncio.run(main())


def test_batches_are_capped_and_a_full_batch_does_not_wait():
    async def main():
        run = Recorder()
        run.release.set()
        # A 60 s wait would time the test out if a full batch waited for company.
        batcher = ReplicaBatcher(run, max_batch_size=4, batch_wait_timeout_s=60.0)
        results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(8))), 5)
        assert results == [i * 10 for i in range(8)]
        assert run.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]

    asyncio.run(main())


def test_a_batch_that_is_not_full_waits_for_company():
    async def main():
        run = Recorder()
        run.release.set()
        batcher = ReplicaBatcher(run, max_batch_size=8, batch_wait_timeout_s=0.5)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)  # well inside the wait
        second = asyncio.create_task(batcher.submit(2))
        assert await asyncio.gather(first, second) == [10, 20]
        assert run.batches == [[1, 2]]

    asyncio.run(main())


def test_a_failing_batch_fails_only_its_callers_and_serving_goes_on():
    async def main():
        run = Recorder(fail_on=3)
        batcher = ReplicaBatcher(run, max_batch_size=2, batch_wait_timeout_s=0.0)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4)]
        run.release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert [type(o) for o in outcomes[:2]] == [ValueError, ValueError]
        assert outcomes[2] == 40
        assert await batcher.submit(5) == 50
        assert run.batches == [[2, 3], [4], [5]]

    asyncio.run(main())


def test_a_caller_that_left_before_its_batch_started_is_skipped():
    async def main():
        run = Recorder()
        batcher = ReplicaBatcher(run, max_batch_size=8, batch_wait_timeout_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await _until(lambda: len(run.batches) == 1)
        gone = asyncio.create_task(batcher.submit(1))
        stays = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        run.release.set()
        assert await asyncio.gather(first, stays) == [0, 20]
        assert run.batches == [[0], [2]]
        with pytest.raises(asyncio.CancelledError):
            await gone

    asyncio.run(main())


@pytest.mark.parametrize("size, wait", [(0, 0.0), (4, -1.0)])
def test_bad_settings_are_refused(size, wait):
    with pytest.raises(ValueError):
        ReplicaBatcher(Recorder(), max_batch_size=size, batch_wait_timeout_s=wait)
