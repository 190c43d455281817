"""Dynamic batching in front of one pipeline: one worker thread owns it, concurrent requests share decoder batches.

Requests whose sampling settings are equal (and that both stream, or both do not) are merged into one
pipeline call of at most `max_batch_images` images; requests with different settings never share a
batch: they are grouped by settings and run one group after another, oldest first. Every image depends
only on its prompt, seed and settings (see dallemini.generate), so a merged request gets the tokens it
would get alone (the pixels too, up to the VQGAN decoder's float rounding for another batch size). Reranking is done per request after the shared call, with the pipeline's
own `rerank`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from PIL import Image

from ..config import SamplingConfig
from ..errors import DalleMiniError
from ..pipeline import GeneratedImage

log = logging.getLogger("dallemini.serve")

FrameCallback = Callable[[list[Image.Image], int, int], object]


class Rejected(Exception):
    """A request was not accepted: `status` is 429 (queue full) or 503 (shutting down); retry after `retry_after` s."""

    def __init__(self, status: int, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class JobTimeout(Exception):
    """The request's deadline passed before its images were made (dropped if it had not started)."""


class JobCancelled(Exception):
    """The request was cancelled (its client went away) before its images were made."""


class JobAbandoned(Exception):
    """The server shut down (past its drain deadline) before the request was finished."""


class _Abort(Exception):
    """Raised inside a pipeline progress callback to stop a batch nobody waits for any more."""


_ids = count(1)
ABANDON_JOIN_S = 2.5  # how long `abandon` waits for the worker to leave the model (a step)


@dataclass(eq=False)
class Job:
    """One accepted request: what to make, and (once finished) its images or its error."""

    prompt: str
    num_images: int
    seed: int
    settings: SamplingConfig
    rerank: bool = True
    on_frame: FrameCallback | None = None  # set: a streaming request, given partial images
    deadline: float = math.inf  # time.monotonic() by which it must be done
    init_image: Image.Image | None = None  # completion: keep this image's top keep_rows token rows
    keep_rows: int = 0
    request_id: str | None = None  # the HTTP request's X-Request-ID, for the logs
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "queued"  # queued -> running -> done | failed; queued -> cancelled | expired
    result: list[GeneratedImage] | None = None
    error: BaseException | None = None
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = (
        False  # its client left while it ran: a batch whose clients all left stops
    )
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _callbacks: list[Callable[[Job], object]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def streaming(self) -> bool:
        """True for a request that wants partial frames."""
        return self.on_frame is not None

    @property
    def key(self) -> tuple[SamplingConfig, bool, int]:
        """Requests with equal keys may share one pipeline call (a completion shares with none)."""
        return (self.settings, self.streaming, self.id if self.init_image is not None else 0)

    def completion(self) -> dict[str, Any]:
        """The pipeline's completion arguments for this job (none without an init image)."""
        if self.init_image is None:
            return {}
        return {"init_image": self.init_image, "keep_rows": self.keep_rows}

    def done(self) -> bool:
        """True once the job has a result or an error."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is finished (or the timeout passes); True when it is finished."""
        return self._done.wait(timeout)

    def add_done_callback(self, fn: Callable[[Job], object]) -> None:
        """Call fn(job) once finished (at once if it already is), from whichever thread finishes it."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(
        self, state: str, result: list[GeneratedImage] | None, error: BaseException | None
    ) -> bool:
        """Set the outcome once; later calls are ignored (returns False)."""
        with self._lock:
            if self._done.is_set():
                return False
            self.state, self.result, self.error = state, result, error
            self.finished = time.monotonic()
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a caller's callback must not kill the worker
                log.exception("job %s: done callback failed", self.id)
        return True


@dataclass
class BatcherStats:
    """Counters since start: pipeline calls, images made, jobs by outcome."""

    batches: int = 0
    images: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    rejected: int = 0
    busy_s: float = 0.0
    steps: int = 0  # decoding steps of a continuous batcher


class Batcher:
    """A bounded queue of jobs and one worker thread that runs them through `pipe`, merged into batches."""

    def __init__(
        self,
        pipe: Any,  # a TextToImage, or anything with its __call__ / stream / rerank / scorer
        max_batch_images: int = 16,
        max_wait_ms: float = 10.0,
        max_queue: int = 64,
        stream_every: int | None = None,
    ) -> None:
        if max_batch_images < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_images and max_queue must be >= 1, max_wait_ms >= 0")
        self.pipe = pipe
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue  # images waiting (not yet running)
        self.stream_every = stream_every
        self.stats = BatcherStats()
        self._queue: deque[Job] = deque()
        self._queued_images = 0
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._accepting = True
        self._closing = False
        self._abandoned = False  # shut down past the deadline: the worker stops at the next step
        self._thread: threading.Thread | None = None
        self._s_per_image = 0.0  # moving average of busy time per image, for Retry-After
        # Observers (set by the metrics): a decoding step's seconds and rows; a request's time to
        # its first image token.
        self.on_step: Callable[[float, int], object] | None = None
        self.on_first_token: Callable[[float], object] | None = None

    # ---- state -------------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """False once shutdown has begun."""
        return self._accepting

    def depth(self) -> dict[str, int]:
        """Queue depth: requests and images waiting, requests and images running."""
        with self._cond:
            return {
                "queued_requests": len(self._queue),
                "queued_images": self._queued_images,
                "running_requests": len(self._running),
                "running_images": sum(j.num_images for j in self._running),
                "max_queue_images": self.max_queue,
            }

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: roughly the time to work off the queue (at least 1)."""
        with self._cond:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> int:
        """retry_after() for a caller that holds the lock."""
        waiting = self._queued_images + sum(j.num_images for j in self._running)
        return max(1, math.ceil(self._s_per_image * waiting))

    # ---- life cycle --------------------------------------------------------------------------

    def start(self) -> Batcher:
        """Start the worker thread (idempotent; after close() it starts accepting again)."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._accepting, self._closing = True, False
                self._thread = threading.Thread(
                    target=self._work, name="dallemini-batcher", daemon=True
                )
                self._thread.start()
        return self

    def stop_accepting(self) -> None:
        """Begin shutdown: new submissions get 503; everything accepted still runs."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting, finish every accepted job, stop the worker; True when it has stopped."""
        with self._cond:
            self._accepting = False
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:  # never started: run what was accepted here
            self._work()
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def abandon(self, reason: str) -> int:
        """Fail every job not finished yet (queued or running), logging each with its request id;
        returns how many. For a shutdown past its drain deadline: nothing accepted goes unsaid."""
        with self._cond:
            self._accepting, self._closing, self._abandoned = False, True, True
            jobs = [*self._queue, *self._running]
            self._queue.clear()
            self._queued_images = 0
            self._cond.notify_all()
        n = 0
        for job in jobs:
            if job._finish("failed", None, JobAbandoned(reason)):
                n += 1
                log.warning(
                    "request %s (job %d, %d images, %s) not answered: %s",
                    job.request_id or "-",
                    job.id,
                    job.num_images,
                    job.state,
                    reason,
                )
        if self._thread is not None:  # out of the model before the process exits
            self._thread.join(ABANDON_JOIN_S)
        return n

    # ---- submitting --------------------------------------------------------------------------

    def submit(
        self,
        prompt: str,
        num_images: int,
        seed: int,
        settings: SamplingConfig,
        rerank: bool = True,
        on_frame: FrameCallback | None = None,
        timeout_s: float | None = None,
        init_image: Image.Image | None = None,
        keep_rows: int = 0,
        request_id: str | None = None,
    ) -> Job:
        """Queue a request, or raise Rejected (429 queue full, 503 shutting down)."""
        if not isinstance(settings, SamplingConfig):
            raise TypeError(f"settings must be a SamplingConfig, got {type(settings).__name__}")
        deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
        job = Job(prompt, num_images, seed, settings, rerank, on_frame, deadline)
        job.init_image, job.keep_rows, job.request_id = init_image, keep_rows, request_id
        with self._cond:
            if not self._accepting:
                self.stats.rejected += 1
                raise Rejected(503, "the server is shutting down; try again later", 5)
            if self._queued_images + num_images > self.max_queue:
                self.stats.rejected += 1
                full = (
                    f"the queue is full ({self._queued_images} of {self.max_queue} images waiting); "
                    "try again later"
                )
                raise Rejected(429, full, self._retry_after_locked())
            self._queue.append(job)
            self._queued_images += num_images
            self._cond.notify_all()
        return job

    def cancel(self, job: Job, expired: bool = False) -> bool:
        """Drop a job that has not started (True); a running one finishes but nobody gets it (False)."""
        with self._cond:
            if job.state != "queued" or job not in self._queue:
                job.cancel_requested = True
                return False
            self._queue.remove(job)
            self._queued_images -= job.num_images
        self._drop(job, expired)
        return True

    def _drop(self, job: Job, expired: bool) -> None:
        """Finish a queued job without running it."""
        if expired:
            self.stats.expired += 1
            job._finish("expired", None, JobTimeout("the request timed out before it started"))
        else:
            self.stats.cancelled += 1
            job._finish("cancelled", None, JobCancelled("the request was cancelled"))

    # ---- the worker --------------------------------------------------------------------------

    def _matching_images(self, key: tuple[SamplingConfig, bool]) -> int:
        """Images queued with this key (caller holds the lock)."""
        return sum(j.num_images for j in self._queue if j.key == key)

    def _expire_locked(self) -> list[Job]:
        """Remove queued jobs whose deadline has passed (caller holds the lock); returns them."""
        now = time.monotonic()
        late = [j for j in self._queue if j.deadline <= now]
        for j in late:
            self._queue.remove(j)
            self._queued_images -= j.num_images
        return late

    def _next_batch(self) -> list[Job] | None:
        """Wait for work; take the oldest job and every queued job that may share its call.

        Returns None when closed and drained, [] when there is nothing to run yet (expired jobs dropped).
        """
        with self._cond:
            while True:
                late = self._expire_locked()
                if late or self._queue:
                    break
                if self._closing:
                    return None
                self._cond.wait(0.5)
        for j in late:
            self._drop(j, expired=True)
        with self._cond:
            if not self._queue:
                return []
            first = self._queue[0]
            # Give others a moment to join: until the batch is full or the oldest job waited max_wait.
            while not self._closing:
                left = first.enqueued + self.max_wait_s - time.monotonic()
                if left <= 0 or self._matching_images(first.key) >= self.max_batch_images:
                    break
                self._cond.wait(left)
                if first not in self._queue:  # cancelled while we waited
                    return []
            batch, total = [], 0
            for j in list(self._queue):
                if j.key != first.key:
                    continue
                if batch and total + j.num_images > self.max_batch_images:
                    continue
                batch.append(j)
                total += j.num_images
            for j in batch:
                self._queue.remove(j)
                self._queued_images -= j.num_images
                j.state, j.started = "running", time.monotonic()
            self._running = batch
            return batch

    def _work(self) -> None:
        """Worker loop: run batches until closed and the queue is empty."""
        while not self._abandoned:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            t0 = time.monotonic()
            try:
                self._run_batch(batch)
            finally:
                busy = time.monotonic() - t0
                n = sum(j.num_images for j in batch)
                with self._cond:
                    self._running = []
                    self.stats.busy_s += busy
                    per = busy / n
                    self._s_per_image = (
                        per if not self._s_per_image else 0.8 * self._s_per_image + 0.2 * per
                    )

    def _run_batch(self, batch: list[Job]) -> None:
        """Run one batch; if it fails and holds several jobs, run each alone so one bad job fails alone."""
        try:
            results = self._generate(batch)
        except _Abort:
            for j in batch:
                self.stats.cancelled += 1
                j._finish("cancelled", None, JobCancelled("every client of this batch went away"))
            return
        except Exception as e:
            if len(batch) > 1:
                log.warning(
                    "batch of %d failed (%s); running its requests one by one", len(batch), e
                )
                for j in batch:
                    self._run_batch([j])
                return
            if not isinstance(e, DalleMiniError):
                log.exception("request %s failed", batch[0].id)
            self.stats.failed += 1
            batch[0]._finish("failed", None, e)
            return
        for j, images in zip(batch, results, strict=True):
            self.stats.done += 1
            j._finish("done", images, None)

    def _generate(self, batch: list[Job]) -> list[list[GeneratedImage]]:
        """One pipeline call for the batch; returns each job's images, reranked for jobs that asked."""
        pipe = self.pipe
        prompts = [j.prompt for j in batch]
        counts = [j.num_images for j in batch]
        seeds = [j.seed for j in batch]
        sampling = batch[0].settings  # one SamplingConfig: the batch's jobs all have equal settings
        self.stats.batches += 1
        if batch[0].streaming:
            groups = self._stream(batch, prompts, counts, seeds, sampling)
        else:

            def progress(done: int, total: int) -> None:
                if self._abandoned or all(j.cancel_requested for j in batch):
                    raise _Abort
                if done == 1 and self.on_first_token is not None:
                    now = time.monotonic()
                    for j in batch:
                        self.on_first_token(now - j.enqueued)

            groups = pipe(
                prompts,
                num_images=counts,
                seed=seeds,
                rerank=False,
                max_batch=self.max_batch_images,
                progress=progress,
                sampling=sampling,
                **batch[0].completion(),
            )
        self.stats.images += sum(counts)
        wanted = [i for i, j in enumerate(batch) if j.rerank]
        if wanted and getattr(pipe, "scorer", None) is not None:
            ranked = pipe.rerank([groups[i] for i in wanted])
            for i, g in zip(wanted, ranked, strict=True):
                groups[i] = g
        return groups

    def _stream(
        self,
        batch: list[Job],
        prompts: list[str],
        counts: list[int],
        seeds: list[int],
        sampling: SamplingConfig,
    ) -> list[list[GeneratedImage]]:
        """Run a streaming batch: hand each job its slice of every partial frame; build the final images."""
        starts = [sum(counts[:i]) for i in range(len(counts))]
        last = None
        for frame in self.pipe.stream(
            prompts,
            num_images=counts,
            seed=seeds,
            every=self.stream_every,
            sampling=sampling,
            **batch[0].completion(),
        ):
            last = frame
            if frame.done == frame.total:
                break
            if all(j.cancel_requested for j in batch):
                raise _Abort
            for j, s, n in zip(batch, starts, counts, strict=True):
                if j.cancel_requested:
                    continue
                try:
                    j.on_frame(frame.images[s : s + n], frame.done, frame.total)
                except Exception:
                    log.exception("job %s: frame callback failed", j.id)
        assert last is not None and last.tokens is not None
        rows = last.tokens.tolist()
        return [
            [
                GeneratedImage(last.images[s + k], j.prompt, j.seed + k, None, rows[s + k])
                for k in range(n)
            ]
            for j, s, n in zip(batch, starts, counts, strict=True)
        ]
