"""The coordinator's logic without Ray: its plain class driven by asyncio, with stand-in workers."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray.exceptions as rex

from tscray.cluster import StepCoordinator, coordinator_name
from tscray.plan import Step
from tscray.store import Store

RES = {"workers": 1, "gpus_per_step": 0, "cpus_per_step": 1, "threads": 1, "precision": "fp32",
       "channels_last": False, "step_retries": 2, "lease_owner": "A"}


class _Ref:
    """What ``worker.run.remote(...)`` returns: awaiting it gives the result or raises the worker's error."""

    def __init__(self, outcome):
        self.outcome = outcome

    def __await__(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome
        yield  # (a generator: awaitable)


class _Worker:
    def __init__(self, outcome, calls):
        self.outcome, self.calls = outcome, calls
        self.run = self  # worker.run.remote(step, threads)

    def remote(self, *args):
        self.calls.append(self)
        return _Ref(self.outcome)


def coordinator(tmp_path, **res) -> StepCoordinator:
    return StepCoordinator(str(tmp_path), {**RES, **res}, None, 64)


@pytest.mark.parametrize("death", [rex.OutOfMemoryError("Task was killed due to the node running low on memory"),
                                   rex.NodeDiedError("node lost"), rex.ActorDiedError()])
def test_a_worker_killed_under_a_step_is_replaced_and_the_step_retried(tmp_path, death):
    """Ray's memory monitor kills a worker with OutOfMemoryError, which is no actor error: the step failed
    without a retry and the dead worker went back to the pool, to fail the next step too."""
    c = coordinator(tmp_path)
    calls: list = []
    dead, fresh = _Worker(death, calls), _Worker({"records": []}, calls)
    c.workers, c._new_worker = [dead], lambda: fresh

    async def go():
        c.free = asyncio.Queue()
        c.free.put_nowait(0)
        return await c._dispatch(Step("backdoor", '{"seed": 0}'))

    assert asyncio.run(go()) == {"records": []}
    assert calls == [dead, fresh] and c.stats["replaced_workers"] == 1 and c.workers == [fresh]


def test_a_held_lease_stays_live_while_many_stored_steps_are_checked(tmp_path):
    """On a resume many trials ask for stored steps at once; their hash checks filled the default thread pool
    and the renewals queued behind them: a held lease expired while its step was still computing, and a
    second driver took it over."""
    c = coordinator(tmp_path, lease_ttl=1.0)  # renewed every 0.25 s
    c.store.check_step = lambda *a, **kw: time.sleep(1.0)  # a large artifact's hash on slow storage
    c.store.quarantine_step = lambda *a, **kw: "quarantine/x"
    other = Store(str(tmp_path))

    async def go():
        assert c.store.acquire_lease("k", c.owner, c.lease_ttl)
        c.held.add("k")
        beat = asyncio.ensure_future(c._heartbeat())
        checks = [asyncio.ensure_future(c._check(Step("backdoor", f'{{"seed": {i}}}'))) for i in range(40)]
        lapsed = []
        for _ in range(12):
            await asyncio.sleep(0.25)
            lapsed.append(not other.lease_holder("k")[1])
        beat.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        return lapsed

    assert not any(asyncio.run(go()))


def test_the_heartbeat_outlives_a_failing_renewal(tmp_path):
    """Only OSError was caught: any other error from the store (an unreadable lease is a ValueError) ended the
    heartbeat for good, and every lease held from then on expired under its step."""
    c = coordinator(tmp_path, lease_ttl=0.4)
    renewed = []

    def renew(key, owner):
        renewed.append(key)
        if len(renewed) == 1:
            raise ValueError("Expecting value: line 1 column 1 (char 0)")

    c.store.renew_lease = renew

    async def go():
        c.held.add("k")
        beat = asyncio.ensure_future(c._heartbeat())
        await asyncio.sleep(0.45)
        beat.cancel()

    asyncio.run(go())
    assert len(renewed) >= 3, renewed


def test_each_driver_has_its_own_coordinator_name():
    """Named by the sweep alone, a second driver of the same sweep on the same Ray cluster killed the first's
    coordinator (and with it the first driver's workers, mid-step)."""
    assert coordinator_name("s1", "hostA:1:aa") != coordinator_name("s1", "hostB:2:bb")
    assert coordinator_name("s1", "hostA:1:aa") == coordinator_name("s1", "hostA:1:aa")
