"""Continuous batching in front of one pipeline: requests join the running decoder batch at any step.

The worker keeps one `continuous.RunningBatch`. At every step boundary it drops the rows of requests
whose clients left, admits queued requests (oldest first) while their rows fit, runs one decoding step
for every row, sends streaming requests their partial frames, and answers each request whose rows
are all done (VQGAN-decoded, reranked if asked). Requests with any sampling settings share the batch,
and each image is the one its prompt, seed and settings give alone. The queue, its bounds, deadlines,
Retry-After and shutdown are the request-level `Batcher`'s.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from ..continuous import Row, RowRequest, RunningBatch
from ..errors import DalleMiniError
from ..pipeline import GeneratedImage
from .batcher import Batcher, Job, JobCancelled

log = logging.getLogger("dallemini.serve")


@dataclass(eq=False)
class _Running:
    """A request in the running batch: its rows, those still to admit (a request larger than the
    batch joins in parts), and when its first token came."""

    job: Job
    rows: list[Row]
    pending: list[RowRequest]
    first_token: float | None = None

    @property
    def done(self) -> int:
        """Tokens every row of the request has (0 while some rows wait)."""
        return 0 if self.pending else min(row.done for row in self.rows)

    @property
    def finished(self) -> bool:
        return not self.pending and all(row.done == row.tokens.shape[0] for row in self.rows)


class ContinuousBatcher(Batcher):
    """A bounded queue and one worker that runs requests as rows of one continuous decoder batch of
    at most `max_batch_images` images (see the module doc)."""

    def __init__(
        self,
        pipe,  # a TextToImage: row_requests / running_batch / decode / partial_images / rerank
        max_batch_images: int = 16,
        max_queue: int = 64,
        stream_every: int | None = None,
    ) -> None:
        super().__init__(pipe, max_batch_images, 0.0, max_queue, stream_every)
        self._batch: RunningBatch | None = None
        self._runs: list[_Running] = []
        self._requests: dict[Job, list[RowRequest]] = {}

    def _work(self) -> None:
        """Worker loop: admit, step, answer, until closed with nothing queued or running."""
        while not self._abandoned and self._wait_for_work():
            self._drop_cancelled()
            self._admit()
            if self._runs:
                self._step()

    def _wait_for_work(self) -> bool:
        """Block until something is queued or running (False: closed and drained); drop expired jobs."""
        with self._cond:
            while True:
                late = self._expire_locked()
                if late or self._queue or self._runs:
                    break
                if self._closing:
                    return False
                self._cond.wait(0.5)
        for job in late:
            self._requests.pop(job, None)
            self._drop(job, expired=True)
        return True

    def _drop_cancelled(self) -> None:
        """Free the rows of running requests whose clients went away."""
        for run in [r for r in self._runs if r.job.cancel_requested]:
            self._leave(run)
            self.stats.cancelled += 1
            run.job._finish("cancelled", None, JobCancelled("the client went away"))

    def _leave(self, run: _Running) -> None:
        """Take a request out of the running batch."""
        if self._batch is not None:
            for row in run.rows:
                self._batch.drop(row.key)
        self._runs.remove(run)
        with self._cond:
            self._running.remove(run.job)

    def _fitting(self, requests: list[RowRequest], planned: list[RowRequest]) -> int:
        """How many of these rows, from the first, fit in the batch now beside the planned ones."""
        assert self._batch is not None
        k = 0
        while k < len(requests) and self._batch.fits(planned + requests[: k + 1]):
            k += 1
        return k

    def _plan(
        self, run: _Running, plan: list[tuple[_Running, int]], rows: list[RowRequest]
    ) -> bool:
        """Plan to admit as many of a request's waiting rows as fit; True when none waits then."""
        k = self._fitting(run.pending, rows)
        if k:
            plan.append((run, k))
            rows.extend(run.pending[:k])
        return k == len(run.pending)

    def _admit(self) -> None:
        """Admit the waiting rows of running requests, then queued requests, oldest first, while
        their rows fit in the batch: all of them at once (one encoder pass for their prompts)."""
        for job in [j for j in self._requests if j.state != "queued"]:  # cancelled or expired
            del self._requests[job]
        if self._batch is None:
            try:
                self._batch = self.pipe.running_batch(self.max_batch_images)
            except Exception as e:  # e.g. no memory for its cache: the oldest request learns why
                with self._cond:
                    job = self._queue[0] if self._queue else None
                if job is not None:
                    self._fail_queued(job, e)
                return
        plan: list[tuple[_Running, int]] = []
        rows: list[RowRequest] = []
        if all(self._plan(run, plan, rows) for run in self._runs if run.pending):
            self._plan_queued(plan, rows)  # room is left: queued requests join too
        if not plan:
            return
        try:
            admitted = self._batch.admit(rows)
        except Exception:  # one request's rows are at fault: each on its own, so only it fails
            for run, k in plan:
                self._admit_alone(run, k)
            return
        start = 0
        for run, k in plan:
            run.rows += admitted[start : start + k]
            run.pending = run.pending[k:]
            start += k

    def _admit_alone(self, run: _Running, k: int) -> None:
        """Admit a request's first k waiting rows by themselves; fail the request if they cannot be."""
        assert self._batch is not None
        try:
            run.rows += self._batch.admit(run.pending[:k])
        except Exception as e:
            self._leave(run)
            self._fail(run.job, e)
            return
        run.pending = run.pending[k:]

    def _plan_queued(self, plan: list[tuple[_Running, int]], rows: list[RowRequest]) -> None:
        """Start queued requests, oldest first, while their first rows fit beside the planned ones."""
        while True:
            with self._cond:
                if not self._queue:
                    return
                job = self._queue[0]
            try:
                requests = self._row_requests(job)
            except Exception as e:
                self._fail_queued(job, e)
                continue
            if not self._fitting(requests, rows):
                return  # it waits for rows to finish
            with self._cond:
                if not self._queue or self._queue[0] is not job:
                    continue  # cancelled meanwhile
                self._queue.popleft()
                self._queued_images -= job.num_images
                job.state, job.started = "running", time.monotonic()
                self._running.append(job)
            self._requests.pop(job, None)
            run = _Running(job, [], requests)
            self._runs.append(run)
            self.stats.batches += 1
            if not self._plan(run, plan, rows):
                return  # no room for anyone behind it

    def _row_requests(self, job: Job) -> list[RowRequest]:
        """The job's image rows (made once, while it waits at the head of the queue)."""
        if job not in self._requests:
            self._requests[job] = self.pipe.row_requests(
                job.prompt, job.num_images, job.seed, job.settings, **job.completion()
            )
        return self._requests[job]

    def _fail_queued(self, job: Job, error: BaseException) -> None:
        """Fail the job at the head of the queue without running it."""
        with self._cond:
            if self._queue and self._queue[0] is job:
                self._queue.popleft()
                self._queued_images -= job.num_images
        self._requests.pop(job, None)
        self._fail(job, error)

    def _fail(self, job: Job, error: BaseException) -> None:
        if not isinstance(error, DalleMiniError):
            log.error("request %s failed", job.id, exc_info=error)
        self.stats.failed += 1
        job._finish("failed", None, error)

    def _step(self) -> None:
        """One decoding step of the running batch, then frames and answers."""
        assert self._batch is not None
        rows = self._batch.used_slots
        t0 = time.monotonic()
        try:
            self._batch.step()
        except Exception as e:  # the batch's state is unknown: fail its requests, start afresh
            log.exception("a decoding step failed; failing its %d requests", len(self._runs))
            self._batch = None
            for run in list(self._runs):
                self._runs.remove(run)
                with self._cond:
                    self._running.remove(run.job)
                self._fail(run.job, e)
            return
        now = time.monotonic()
        self._account(now - t0, rows)
        finished = []
        for run in list(self._runs):
            if run.first_token is None:
                run.first_token = now
                if self.on_first_token is not None:
                    self.on_first_token(now - run.job.enqueued)
            if run.finished:
                finished.append(run)
            elif run.job.streaming:
                self._frame(run)
        if finished:
            self._answer(finished)

    def _account(self, seconds: float, rows: int) -> None:
        """Step counters, the step observer, and the time-per-image estimate behind Retry-After."""
        self.stats.steps += 1
        self.stats.busy_s += seconds
        if self.on_step is not None:
            self.on_step(seconds, rows)
        images = sum(len(run.rows) for run in self._runs)
        per = seconds * self.pipe.config.bart.image_length / max(images, 1)
        with self._cond:
            self._s_per_image = (
                per if not self._s_per_image else 0.95 * self._s_per_image + 0.05 * per
            )

    def _frame(self, run: _Running) -> None:
        """Send a streaming request its partial images every `stream_every` tokens."""
        every = self.stream_every or self.pipe.config.vqgan.grid_size
        done, total = run.done, run.rows[0].tokens.shape[0]
        if not done or done % every:
            return
        try:
            assert self._batch is not None
            self._batch.sync(run.rows)
            tokens = torch.stack([row.tokens[:done] for row in run.rows])
            run.job.on_frame(self.pipe.partial_images(tokens), done, total)
        except Exception:
            log.exception("job %s: frame callback failed", run.job.id)

    def _answer(self, runs: list[_Running]) -> None:
        """Decode the images of requests that finished together (one VQGAN pass: small images
        decode faster in groups), rerank those that asked, and hand them over."""
        for run in runs:
            self._leave(run)
        try:
            tokens = torch.stack([row.tokens for run in runs for row in run.rows])
            pictures = self.pipe.decode(tokens)
        except Exception as e:
            for run in runs:
                self._fail(run.job, e)
            return
        for run, (start, end) in zip(runs, _spans([len(run.rows) for run in runs]), strict=True):
            job = run.job
            try:
                made = zip(pictures[start:end], run.rows, tokens[start:end].tolist(), strict=True)
                images = [
                    GeneratedImage(im, job.prompt, row.request.seed, None, codes)
                    for im, row, codes in made
                ]
                if job.rerank and getattr(self.pipe, "scorer", None) is not None:
                    images = self.pipe.rerank([images])[0]
            except Exception as e:
                self._fail(job, e)
                continue
            self.stats.images += len(images)
            self.stats.done += 1
            job._finish("done", images, None)


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    """[(start, end)] of consecutive parts of these sizes."""
    ends = list(itertools.accumulate(sizes))
    return [(end - size, end) for size, end in zip(sizes, ends, strict=True)]
