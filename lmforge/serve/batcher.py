"""Dynamic batching: requests wait in a bounded queue of sequences; a worker thread takes up to
max_batch_size sequences of the same kind (across requests and adapters), waiting at most max_wait
for a batch to fill, runs one forward pass for them and answers every request.

Long-running kinds (generation) have a lane of their own: their own queue and worker thread (at a
lower CPU priority), so a long generation never holds up the classification and embedding batches
behind it, and they run at the same time (the engine takes no lock another pass needs). Such a lane
waits for nothing: it takes whatever requests of its kind are queued when it is free (up to
max_batch_size), and the engine decodes them together.

The queue is bounded in sequences over all lanes (a request that does not fit is refused at once,
never queued), a failing batch is retried request by request so that an error answers only the
requests that caused it, and nothing a request sends can stop a worker thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lmforge.serve.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, depth: int, capacity: int, retry_after: int):
        super().__init__(f"the queue is full ({depth} of {capacity} sequences waiting); retry later")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass(eq=False)  # compared and hashed by identity
class Work:
    """One request: its sequences, and the future that gets their results in order."""
    kind: str
    items: list
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    results: list = field(default_factory=list)
    remaining: int = 0
    enqueued: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.results = [None] * len(self.items)
        self.remaining = len(self.items)

    def fail(self, error: BaseException) -> None:
        try:
            if not self.future.done():
                self.future.set_exception(error)
        except concurrent.futures.InvalidStateError:  # cancelled by a client that went away
            pass

    def put(self, index: int, result: Any) -> None:
        if self.future.done():
            return
        if isinstance(result, BaseException):
            self.fail(result)
            return
        self.results[index] = result
        self.remaining -= 1
        if self.remaining == 0:
            try:
                self.future.set_result(self.results)
            except concurrent.futures.InvalidStateError:
                pass


# A runner takes (kind, [item, ...]) and returns one result (or an exception instance) per item.
Runner = Callable[[str, list], list]


class _Lane:
    """One queue and the worker thread that empties it."""

    def __init__(self, name: str, single: bool):
        self.name, self.single = name, single
        self.queue: collections.deque[tuple[Work, int]] = collections.deque()
        self.thread: threading.Thread | None = None


def lane_niceness(current: int, more: int) -> int:
    """The niceness of a long-running lane: `more` above the process's own, within Linux's 19."""
    return min(19, current + more)


class Batcher:
    def __init__(self, runner: Runner, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, metrics: Metrics | None = None,
                 single_kinds: tuple[str, ...] = ("generate",), single_nice: int = 10):
        self.runner = runner
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.max_queue = max(1, int(max_queue))
        self.metrics = metrics or Metrics()
        self.single_kinds = single_kinds         # long-running kinds, each in a lane of its own that never waits
        self.single_nice = single_nice           # their threads' CPU niceness: short batches win a busy core
        self._batched = _Lane("batcher", single=False)
        self._lanes = {kind: _Lane(kind, single=True) for kind in single_kinds}
        self._cond = threading.Condition()       # guards every lane's queue
        self._stopping = False
        self._batch_seconds = 0.05               # running mean, for Retry-After
        for lane in self._all_lanes():
            lane.thread = threading.Thread(target=self._loop, args=(lane,), name=f"lmforge-{lane.name}",
                                           daemon=True)

    def _all_lanes(self) -> list[_Lane]:
        return [self._batched, *self._lanes.values()]

    def _lane(self, kind: str) -> _Lane:
        return self._lanes.get(kind, self._batched)

    # -- the request side -------------------------------------------------------------------------
    def start(self) -> "Batcher":
        for lane in self._all_lanes():
            lane.thread.start()
        return self

    @property
    def depth(self) -> int:
        return sum(len(lane.queue) for lane in self._all_lanes())

    def retry_after(self) -> int:
        batches = self.depth / self.max_batch_size + 1
        return max(1, int(batches * (self._batch_seconds + self.max_wait) + 0.999))

    def submit(self, kind: str, items: list) -> concurrent.futures.Future:
        """Queue one request's sequences; raises QueueFull (nothing queued) when they do not fit."""
        work = Work(kind, list(items))
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self.depth + len(work.items) > self.max_queue:
                self.metrics.inc("lmforge_queue_rejections_total")
                raise QueueFull(self.depth, self.max_queue, self.retry_after())
            self._lane(kind).queue.extend((work, i) for i in range(len(work.items)))
            self.metrics.set("lmforge_queue_depth", self.depth)
            self._cond.notify_all()   # workers of different lanes wait on the same condition
        if not work.items:
            work.future.set_result([])
        return work.future

    def stop(self, timeout: float | None = None) -> None:
        """Answer everything already queued, then end the worker threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for lane in self._all_lanes():
            if lane.thread.is_alive():
                lane.thread.join(timeout)

    # -- the worker side --------------------------------------------------------------------------
    def _take(self, lane: _Lane) -> list[tuple[Work, int]] | None:
        queue = lane.queue
        with self._cond:
            while not queue:
                if self._stopping:
                    return None
                self._cond.wait()
            # wait for the batch to fill, at most max_wait after the oldest sequence arrived
            while not lane.single and not self._stopping and len(queue) < self.max_batch_size:
                left = queue[0][0].enqueued + self.max_wait - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            kind = queue[0][0].kind
            limit = self.max_batch_size
            batch, rest = [], collections.deque()
            while queue and len(batch) < limit:
                work, i = queue.popleft()
                if work.future.done():              # cancelled (client gone) or already failed
                    continue
                (batch if work.kind == kind else rest).append((work, i))
            queue.extendleft(reversed(rest))
            self.metrics.set("lmforge_queue_depth", self.depth)
            return batch

    def _run(self, kind: str, batch: list[tuple[Work, int]]) -> None:
        results = self.runner(kind, [w.items[i] for w, i in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"runner returned {len(results)} results for {len(batch)} items")
        for (work, i), r in zip(batch, results):
            work.put(i, r)

    def _loop(self, lane: _Lane) -> None:
        if lane.single and self.single_nice:
            # A generation keeps a core busy for seconds; on a machine with few cores the short
            # classification batches should not have to share theirs with it on equal terms. Linux
            # keeps niceness per thread; elsewhere this is a no-op. Relative to the process's own
            # niceness: an absolute 10 would raise the lane above the others in a server started
            # with `nice -n 19` (as root), the opposite of the intent.
            try:
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, lane_niceness(os.getpriority(os.PRIO_PROCESS, tid),
                                                                   self.single_nice))
            except (AttributeError, OSError):
                pass
        while True:
            try:
                batch = self._take(lane)
            except BaseException:  # never let the worker die
                log.exception("batcher: taking a batch failed")
                continue
            if batch is None:
                return
            if not batch:
                continue
            kind = batch[0][0].kind
            now = time.monotonic()
            for work, _ in batch:
                self.metrics.observe("lmforge_queue_wait_seconds", now - work.enqueued)
            self.metrics.observe("lmforge_batch_size", len(batch), kind=kind)
            self.metrics.inc("lmforge_batches_total", kind=kind)
            start = time.perf_counter()
            try:
                try:
                    self._run(kind, batch)
                except Exception as e:
                    self.metrics.inc("lmforge_worker_errors_total")
                    works = list(dict.fromkeys(w for w, _ in batch))
                    if len(works) == 1:
                        log.error("batcher: a %s pass failed: %s", kind, e)
                        works[0].fail(e)
                    else:  # find the request that breaks it: each one alone answers only for itself
                        for w in works:
                            try:
                                self._run(kind, [(x, i) for x, i in batch if x is w])
                            except Exception as e2:
                                log.error("batcher: a %s pass failed: %s", kind, e2)
                                w.fail(e2)
            except BaseException as e:  # anything else: answer the batch, never let the worker die
                log.exception("batcher: unexpected error")
                for w, _ in batch:
                    w.fail(e if isinstance(e, Exception) else RuntimeError(repr(e)))
            finally:
                elapsed = time.perf_counter() - start
                if not lane.single:   # Retry-After estimates the batched lane's pace
                    self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
                self.metrics.observe("lmforge_batch_duration_seconds", elapsed, kind=kind)
