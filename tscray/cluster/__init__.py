"""Ray actors that execute a plan: a single-flight coordinator and shard workers owning devices.

The coordinator is one named async actor per sweep: every request for a step goes through it, so
a step asked for by many trials at the same moment is computed once (later askers await the same
future), and a step already in the store is never recomputed. Shard workers are long-lived actors
that each own a device (a GPU, a fraction of one, or CPU threads) and keep datasets resident; they
run :func:`tscray.steps.compute`. A worker that dies mid-step is replaced and the step retried.
Both are created outside trial placement groups, so trials (a sliver of CPU each) never hold the
resources the workers need.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import hashlib
import math
import os
import socket
import sys
import uuid
from typing import Any

import ray
from ray.exceptions import NodeDiedError, OutOfMemoryError, RayActorError

from tscray.plan import Step, cost_class, step_work

NAMESPACE = "tscray"
TRIAL_CPU = 0.005  # what a light Tune trial reserves; workers leave room for many of them
# a worker that died under a step: its actor died or is unreachable (RayActorError covers ActorDiedError and
# ActorUnavailableError), Ray's memory monitor killed it (OutOfMemoryError, not an actor error), or its node left
WORKER_LOST = (RayActorError, OutOfMemoryError, NodeDiedError)


@ray.remote(max_restarts=0)
class ShardWorker:
    """Owns a device and a torch thread budget; computes steps with resident data."""

    def __init__(self, store_uri: str, threads: int, use_gpu: bool, data_root: str | None, precision: str,
                 channels_last: bool | str, eval_batch: int) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        from tscray.steps import Context
        from tscray.store import Store

        torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.ctx = Context(Store(store_uri), device, data_root, precision, channels_last, eval_batch)

    def run(self, step: dict[str, Any], threads: int = 0) -> dict[str, Any]:
        """Compute ``step``, with ``threads`` torch threads when given (the worker's own count otherwise)."""
        import torch

        from tscray.steps import compute

        own = torch.get_num_threads()
        if threads and threads != own:
            torch.set_num_threads(threads)
        try:
            return compute(Step.from_dict(step), self.ctx)
        finally:
            if torch.get_num_threads() != own:
                torch.set_num_threads(own)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The Ray node this worker runs on (for placement checks and diagnostics)."""
        return ray.get_runtime_context().get_node_id()


class StepCoordinator:
    """Single-flight step execution over a pool of shard workers (run as the async actor ``Coordinator``;
    a plain class, so its logic is tested without Ray)."""

    def __init__(self, store_uri: str, resources: dict[str, Any], data_root: str | None, eval_batch: int,
                 fault_kill_at: int = 0, fault_die_at: int = 0, fault_marker: str = "") -> None:
        from tscray.store import Store

        self.store = Store(store_uri)
        self.res, self.data_root, self.eval_batch = resources, data_root, eval_batch
        self.inflight: dict[str, asyncio.Future] = {}
        self.waiting: set[str] = set()  # steps whose lease another driver holds now
        self.stats = {"computed": 0, "reused": 0, "failed": 0, "replaced_workers": 0, "dispatched": 0, "repaired": 0}
        self.verified: set[str] = set()  # step keys whose artifacts matched their hashes in this run
        self.stats["waited"] = 0
        # the driver names the owner, so it can drop the leases left behind when it stops (and a restarted
        # coordinator takes its predecessor's leases back at once)
        self.owner = resources.get("lease_owner") or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_ttl = float(resources.get("lease_ttl", 60.0))
        self.lease_poll = min(5.0, self.lease_ttl / 6)
        self.held: set[str] = set()  # leases this coordinator holds (renewed by the heartbeat)
        self._heartbeat_task: asyncio.Future | None = None
        # lease I/O on its own thread: on the default executor, a resume's many hash checks of large stored
        # artifacts queued ahead of the renewals, and a held lease expired while its step was computing
        self._lease_io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tscray-lease")
        self.checking: dict[str, asyncio.Future] = {}
        self.fault_kill_at = fault_kill_at
        # test hook: the coordinator's own process dies (as an OOM kill would) at that dispatch, once
        self.fault_die_at = 0 if fault_marker and os.path.exists(fault_marker) else fault_die_at
        self.fault_marker = fault_marker
        self.workers: list[Any] = []
        self.free: asyncio.Queue | None = None
        self._pool_lock = asyncio.Lock()
        self._wide_lock = asyncio.Lock()  # one step that needs several workers gathers them at a time
        self.wanted = 0  # dispatches waiting for a free worker
        self.computing = 0  # steps on workers now (a wide step counts once; its workers count in busy)
        self.ahead: collections.deque[Step] = collections.deque()  # steps to compute when a worker idles
        self._ahead_task: asyncio.Future | None = None
        self.ahead_running: dict[str, asyncio.Future] = {}  # steps being computed ahead
        self.joined: set[str] = set()  # of those, the ones a trial has asked for since
        self.stats["ahead"] = 0
        self.work: dict[str, list[float]] = {}  # cost class -> [steps computed, their step_work, their seconds]

    def _new_worker(self) -> Any:
        r = self.res
        gpus = float(r["gpus_per_step"])
        cpus = max(0.05, r["cpus_per_step"] - 0.05)  # leave room for light trials on a small machine
        # mypy ignores class decorators: it sees the plain class, not @ray.remote's ActorClass with .options
        memory = int(float(r.get("memory_gb_per_step", 0)) * 2**30)
        return ShardWorker.options(  # type: ignore[attr-defined]
            num_cpus=cpus, num_gpus=gpus, scheduling_strategy="DEFAULT", **({"memory": memory} if memory else {})).remote(
            self.store.uri, r["threads"], gpus > 0, self.data_root, r["precision"], r["channels_last"],
            self.eval_batch)

    async def start(self) -> int:
        """Create the worker pool: ``workers`` or as many as the cluster's resources hold.

        After Ray restarts a killed coordinator (OOM or otherwise), the first request calls this again:
        the old workers died with their owner, the store holds every finished step."""
        async with self._pool_lock:
            if self.free is not None:
                return len(self.workers)
            return await self._start()

    async def _start(self) -> int:
        n = self.res["workers"]
        if not n:
            total = ray.cluster_resources()
            gpus = float(self.res["gpus_per_step"])
            n = (math.floor(total.get("GPU", 0) / gpus) if gpus > 0
                 else math.floor(total.get("CPU", 1) / self.res["cpus_per_step"]))
            mem = float(self.res.get("memory_gb_per_step", 0)) * 2**30
            if mem and total.get("memory"):  # as many as the cluster's memory holds, too (no overcommit)
                n = min(n, math.floor(total["memory"] / mem))
            n = max(1, n)
        self.workers = [self._new_worker() for _ in range(n)]
        self.free = asyncio.Queue()
        for i in range(n):
            self.free.put_nowait(i)
        await asyncio.gather(*(w.pid.remote() for w in self.workers))
        return n

    async def compute_ahead(self, step_dicts: list[dict[str, Any]]) -> None:
        """Steps every pending trial will need (the driver sends its trials' backdoored models, in trial
        order): computed on workers that would otherwise idle, e.g. while the first attack's model gates all
        running trials, or while Tune starts its trials. Work is only reordered, never added."""
        self.ahead.extend(Step.from_dict(d) for d in step_dicts)
        if self._ahead_task is None:
            self._ahead_task = asyncio.ensure_future(self._compute_ahead())

    async def _compute_ahead(self) -> None:
        await self.start()
        assert self.free is not None
        while self.ahead:
            await asyncio.sleep(AHEAD_POLL_S)
            # One step ahead at a time that no trial has asked for yet, and only on a worker no request waits
            # for: requests never queue behind more than that one step. A step ahead that a trial then asks
            # for is that trial's work, and the next one may start.
            if self.free.qsize() == 0 or self.wanted > 0 or any(k not in self.joined for k in self.ahead_running):
                continue
            if self.free.qsize() < self._threads(self.ahead[0])[1]:
                continue  # a wide step starts ahead only when its workers are all idle: it never holds one waiting
            step = self.ahead.popleft()
            if step.key in self.inflight or self.store.has_step(step.kind, step.key):
                continue
            self.stats["ahead"] += 1
            task = asyncio.ensure_future(self._get(step))
            self.ahead_running[step.key] = task
            task.add_done_callback(functools.partial(self._ahead_done, step.key))

    def _ahead_done(self, key: str, task: asyncio.Future) -> None:
        self.ahead_running.pop(key, None)
        self.joined.discard(key)
        if not task.cancelled():
            task.exception()  # retrieved: a failure is reported by the trial that needs the step (it retries)

    async def get_stats(self) -> dict[str, Any]:
        busy = len(self.workers) - self.free.qsize() if self.free is not None else 0
        return {**self.stats, "inflight": len(self.inflight), "workers": len(self.workers),
                "busy": busy, "computing": self.computing, "waiting": len(self.waiting),
                "work": {k: list(v) for k, v in self.work.items()}}

    async def worker_pids(self) -> list[int]:
        return list(await asyncio.gather(*(w.pid.remote() for w in self.workers)))

    async def worker_nodes(self) -> list[str]:
        """The Ray node of each shard worker."""
        return list(await asyncio.gather(*(w.node.remote() for w in self.workers)))

    async def request(self, step_dict: dict[str, Any]) -> dict[str, Any]:
        """The manifest of a step, computing it (and its inputs) at most once."""
        step = Step.from_dict(step_dict)
        return await self._get(step)

    async def _join(self, step: Step, fut: asyncio.Future) -> dict[str, Any]:
        """Wait for a step another request is computing (one computed ahead is then this trial's work)."""
        self.stats["reused"] += 1
        if step.key in self.ahead_running:
            self.joined.add(step.key)
        return await asyncio.shield(fut)

    async def _get(self, step: Step) -> dict[str, Any]:
        fut = self.inflight.get(step.key)
        if fut is not None:
            return await self._join(step, fut)
        if self.store.has_step(step.kind, step.key) and await self._intact(step):
            self.stats["reused"] += 1
            return self.store.manifest(step.kind, step.key)
        fut = self.inflight.get(step.key)  # another request may have started it while this one checked
        if fut is not None:
            return await self._join(step, fut)
        fut = asyncio.get_running_loop().create_future()
        self.inflight[step.key] = fut
        try:
            await asyncio.gather(*(self._get(i) for i in step.inputs))
            manifest = await self._leased(step)
            fut.set_result(manifest)
            return manifest
        except BaseException as err:
            self.stats["failed"] += 1
            fut.set_exception(err)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self.inflight.pop(step.key, None)

    async def _leased(self, step: Step) -> dict[str, Any]:
        """Compute ``step`` under its lease in the store, so a second driver on the same storage waits for it
        (and reuses it) instead of computing it again; a lease whose driver died expires after ``lease_ttl``."""
        if self._heartbeat_task is None:
            self._heartbeat_task = asyncio.ensure_future(self._heartbeat())
        announced = False
        try:
            while not await self._lease(self.store.acquire_lease, step.key, self.owner, self.lease_ttl):
                if not announced:
                    announced = True
                    self.stats["waited"] += 1
                    self.waiting.add(step.key)
                    print(f"tscray: step {step.kind}/{step.key} is being computed by another driver; waiting for "
                          f"it", file=sys.stderr, flush=True)
                await asyncio.sleep(self.lease_poll)
                if self.store.has_step(step.kind, step.key) and await self._intact(step):
                    self.stats["reused"] += 1
                    return self.store.manifest(step.kind, step.key)
        finally:
            self.waiting.discard(step.key)
        self.held.add(step.key)
        try:
            if self.store.has_step(step.kind, step.key) and await self._intact(step):
                self.stats["reused"] += 1  # finished by another driver just before this one took the lease
                return self.store.manifest(step.kind, step.key)
            manifest = await self._dispatch(step)
            self.stats["computed"] += 1
            done = self.work.setdefault(cost_class(step), [0, 0.0, 0.0])
            done[0] += 1
            done[1] += step_work(step)
            done[2] += float(manifest.get("seconds") or 0.0)
            return manifest
        finally:
            self.held.discard(step.key)
            await self._lease(self.store.release_lease, step.key, self.owner)

    async def _lease(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._lease_io, fn, *args)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 4)
            for key in list(self.held):
                try:
                    await self._lease(self.store.renew_lease, key, self.owner)
                except Exception as err:  # a store error must not end the heartbeat: the next beat retries
                    print(f"tscray: renewing the lease of step {key} failed ({type(err).__name__}: {err}); "
                          "retrying", file=sys.stderr, flush=True)

    async def _intact(self, step: Step) -> bool:
        """Check a stored step's artifacts against their recorded hashes, once per coordinator; a damaged step
        is moved to quarantine/ and recomputed (its dependents keep their own, verified artifacts)."""
        if step.key in self.verified:
            return True
        check = self.checking.get(step.key)
        if check is None:  # one check per step, however many trials ask at once
            check = self.checking[step.key] = asyncio.ensure_future(self._check(step))
        try:
            return await asyncio.shield(check)
        finally:
            if check.done():
                self.checking.pop(step.key, None)

    async def _check(self, step: Step) -> bool:
        problem = await asyncio.to_thread(self.store.check_step, step.kind, step.key)
        if problem is None:
            self.verified.add(step.key)
            return True
        where = await asyncio.to_thread(self.store.quarantine_step, step.kind, step.key, problem)
        self.stats["repaired"] += 1
        print(f"tscray: step {step.kind}/{step.key} is damaged ({problem}); moved to {where}, recomputing",
              file=sys.stderr, flush=True)
        return False

    async def _dispatch(self, step: Step) -> dict[str, Any]:
        if self.free is None:  # a restarted coordinator: its pool died with the old process
            await self.start()
        assert self.free is not None
        attempts = 1 + int(self.res["step_retries"])
        threads, width = self._threads(step)
        for attempt in range(attempts):
            self.wanted += 1
            try:
                slots = await self._slots(width)
            finally:
                self.wanted -= 1
            idx = slots[0]
            self.computing += 1
            try:
                self.stats["dispatched"] += 1
                ref = self.workers[idx].run.remote(step.to_dict(), threads)
                if self.fault_kill_at and self.stats["dispatched"] == self.fault_kill_at:
                    asyncio.get_running_loop().call_later(1.0, ray.kill, self.workers[idx])
                if self.fault_die_at and self.stats["dispatched"] == self.fault_die_at:
                    with open(self.fault_marker, "w") as f:
                        f.write("died once\n")
                    asyncio.get_running_loop().call_later(1.0, os._exit, 1)
                return await ref
            except WORKER_LOST:
                self.workers[idx] = self._new_worker()  # replace the dead worker, then retry
                self.stats["replaced_workers"] += 1
                if attempt == attempts - 1:
                    raise
            finally:
                self.computing -= 1
                for i in slots:
                    self.free.put_nowait(i)
        raise RuntimeError("unreachable")

    def _threads(self, step: Step) -> tuple[int, int]:
        """The step's torch threads (``step_threads`` of its kind, else 0: the worker's own) and how many
        workers of the pool it holds while it runs, so its threads have cores no other step uses."""
        own = int(self.res["threads"])
        n = int(self.res.get("step_threads", {}).get(step.kind, 0))
        if not n or n == own:
            return 0, 1
        return n, max(1, min(len(self.workers), math.ceil(n / own)))

    async def _slots(self, width: int) -> list[int]:
        """``width`` free workers. A wide step gathers its workers one at a time under a lock, so two wide steps
        never each hold part of what the other waits for; the queue serves waiters in order, so it is not
        overtaken by narrow steps that ask after it."""
        assert self.free is not None
        if width == 1:
            return [await self.free.get()]
        async with self._wide_lock:
            slots: list[int] = []
            try:
                while len(slots) < width:
                    slots.append(await self.free.get())
            except BaseException:
                for i in slots:
                    self.free.put_nowait(i)
                raise
            return slots


AHEAD_POLL_S = 1.0  # how often idle workers are looked for, to compute steps ahead


Coordinator = ray.remote(StepCoordinator)


def coordinator_name(sweep_id: str, owner: str) -> str:
    """The coordinator's actor name: one per driver (``owner`` names its leases), so a second driver of the same
    sweep on the same Ray cluster starts its own instead of killing the first's (they share work through
    the store's leases)."""
    return f"tscray-coordinator-{sweep_id}-{hashlib.sha256(owner.encode()).hexdigest()[:12]}"


# A killed coordinator (Ray's OOM killer, a crash) is restarted this many times; calls in flight to it are
# retried on the new process, which rebuilds its pool and reads finished steps from the store.
COORDINATOR_RESTARTS = 3


def start(store_uri: str, sweep_id: str, resources: dict[str, Any], data_root: str | None, eval_batch: int,
          fault_kill_at: int = 0, fault_die_at: int = 0, fault_marker: str = "") -> tuple[Any, int]:
    """Create this driver's coordinator of the sweep (``resources["lease_owner"]`` names the driver) and its
    workers; returns (handle, worker count)."""
    name = coordinator_name(sweep_id, resources["lease_owner"])
    coord: Any = Coordinator.options(
        name=name, namespace=NAMESPACE, max_concurrency=10_000, num_cpus=0, scheduling_strategy="DEFAULT",
        max_restarts=COORDINATOR_RESTARTS, max_task_retries=COORDINATOR_RESTARTS).remote(
        store_uri, resources, data_root, eval_batch, fault_kill_at, fault_die_at, fault_marker)
    n = ray.get(coord.start.remote())
    return coord, n
