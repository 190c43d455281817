"""The serving batcher: merged decoder batches, bounds, queue limit, deadlines, cancellation, shutdown."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from dallemini.errors import InputError
from dallemini.pipeline import GeneratedImage, TextToImage
from dallemini.random_model import create_random_model
from dallemini.serve.batcher import Batcher, Job, JobCancelled, JobTimeout, Rejected
from tests.serve_utils import GatedPipe


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> TextToImage:
    d = create_random_model(tmp_path_factory.mktemp("batcher") / "tiny", preset="tiny")
    return TextToImage.from_pretrained(d, device="cpu")


def same(a: list[GeneratedImage], b: list[GeneratedImage]) -> None:
    """The same images: seeds and tokens equal; pixels equal up to one level of rounding.

    The VQGAN decoder's convolutions may round differently for another batch size, so an image decoded
    in a merged batch can differ from the one decoded alone by one level in a few pixels.
    """
    assert [g.seed for g in a] == [g.seed for g in b]
    assert [g.tokens for g in a] == [g.tokens for g in b]
    for x, y in zip(a, b, strict=True):
        diff = np.abs(np.asarray(x.image, dtype=np.int16) - np.asarray(y.image, dtype=np.int16))
        assert diff.max() <= 1


def hold(gated: GatedPipe, batcher: Batcher) -> Job:
    """Close the gate and put a one-image job in the worker's hands, so later jobs queue."""
    gated.gate.clear()
    gated.entered.clear()
    blocker = batcher.submit("blocker", 1, 0, gated.sampling())
    assert gated.entered.wait(10)
    return blocker


def test_one_call_for_several_requests_gives_each_its_own_images(pipe: TextToImage) -> None:
    merged = pipe(["a red cat", "blue"], num_images=[2, 3], seed=[10, 50], rerank=False)
    same(merged[0], pipe("a red cat", num_images=2, seed=10))
    same(merged[1], pipe("blue", num_images=3, seed=50))
    with pytest.raises(InputError, match="2 seeds given for 3 prompts"):
        pipe(["a", "b", "c"], seed=[1, 2])


def test_concurrent_requests_are_merged_into_one_decoder_batch(pipe: TextToImage) -> None:
    gated = GatedPipe(pipe)
    b = Batcher(gated, max_batch_images=16, max_wait_ms=20).start()
    hold(gated, b)
    settings = pipe.sampling()
    with ThreadPoolExecutor(6) as ex:
        jobs = list(ex.map(lambda i: b.submit(f"cat {i}", 2, 100 * i, settings), range(6)))
    other = b.submit("cat 0", 1, 7, pipe.sampling(top_k=5))  # other settings: its own batch
    gated.gate.set()
    assert b.close(30)
    assert [kind for kind, _, _ in gated.calls] == ["call", "call", "call"]
    _, prompts, counts = gated.calls[1]
    assert sorted(prompts) == [f"cat {i}" for i in range(6)] and counts == [2] * 6
    assert gated.calls[2][1:] == (["cat 0"], [1])
    for i, job in enumerate(jobs):
        assert job.state == "done"
        same(job.result, pipe(f"cat {i}", num_images=2, seed=100 * i))
    same(other.result, pipe("cat 0", num_images=1, seed=7, top_k=5))
    assert b.stats.batches == 3 and b.stats.done == 8


def test_requests_arriving_together_share_batches_without_a_gate(pipe: TextToImage) -> None:
    gated = GatedPipe(pipe)
    b = Batcher(gated, max_batch_images=16, max_wait_ms=400).start()
    settings = pipe.sampling()
    start = threading.Barrier(8)

    def client(i: int) -> Job:
        start.wait()
        job = b.submit(f"dog {i}", 1, i, settings)
        assert job.wait(30)
        return job

    with ThreadPoolExecutor(8) as ex:
        jobs = list(ex.map(client, range(8)))
    assert b.close(30)
    assert all(j.state == "done" for j in jobs)
    assert len(gated.calls) < 8  # merged: fewer decoder batches than requests


def test_batches_stay_within_max_batch_images(pipe: TextToImage) -> None:
    gated = GatedPipe(pipe)
    b = Batcher(
        gated, max_batch_images=4, max_wait_ms=0
    )  # not started: close() runs the queue here
    settings = pipe.sampling()
    jobs = [b.submit(f"p{i}", 2, i, settings) for i in range(5)] + [b.submit("big", 6, 9, settings)]
    assert b.close()
    assert [c for _, _, c in gated.calls] == [
        [2, 2],
        [2, 2],
        [2],
        [6],
    ]  # the 6 alone, in chunks of 4
    assert [len(j.result) for j in jobs] == [2, 2, 2, 2, 2, 6]
    same(jobs[-1].result, pipe("big", num_images=6, seed=9))


def test_full_queue_rejects_with_429_and_retry_after(pipe: TextToImage) -> None:
    gated = GatedPipe(pipe)
    b = Batcher(gated, max_queue=4).start()
    hold(gated, b)
    s = pipe.sampling()
    first = b.submit("three", 3, 1, s)
    b.submit("one", 1, 1, s)
    with pytest.raises(Rejected) as e:
        b.submit("too many", 1, 1, s)
    assert e.value.status == 429 and e.value.retry_after >= 1
    assert "queue is full" in str(e.value)
    assert b.depth()["queued_images"] == 4 and b.stats.rejected == 1
    assert b.cancel(first)
    b.submit("fits now", 3, 1, s)
    gated.gate.set()
    assert b.close(30)


def test_a_request_past_its_deadline_is_dropped_before_it_runs(pipe: TextToImage) -> None:
    gated = GatedPipe(pipe)
    b = Batcher(gated).start()
    hold(gated, b)
    late = b.submit("late", 1, 1, pipe.sampling(), timeout_s=0.05)
    time.sleep(0.1)
    gated.gate.set()
    assert late.wait(10)
    assert late.state == "expired" and isinstance(late.error, JobTimeout)
    assert b.close(30)
    assert "late" not in gated.prompts_run() and b.stats.expired == 1


def test_cancel_drops_queued_work_and_stops_a_batch_nobody_waits_for(pipe: TextToImage) -> None:
    gated = GatedPipe(pipe)
    b = Batcher(gated).start()
    blocker = hold(gated, b)
    dropped = b.submit("dropped", 2, 1, pipe.sampling())
    kept = b.submit("kept", 1, 1, pipe.sampling(top_k=3))
    assert b.cancel(dropped)
    assert dropped.state == "cancelled" and isinstance(dropped.error, JobCancelled)
    assert b.depth()["queued_images"] == 1
    assert not b.cancel(blocker)  # running: it cannot be dropped, but its batch stops early
    gated.gate.set()
    assert b.close(30)
    assert blocker.state == "cancelled" and kept.state == "done"
    assert "dropped" not in gated.prompts_run()


def test_close_finishes_every_accepted_job_and_refuses_new_ones(pipe: TextToImage) -> None:
    gated = GatedPipe(pipe)
    b = Batcher(gated, max_batch_images=3).start()
    blocker = hold(gated, b)
    jobs = [blocker] + [
        b.submit(f"job {i}", 1 + i % 2, i, pipe.sampling(top_k=i % 3)) for i in range(6)
    ]
    closer = threading.Thread(target=b.close)
    closer.start()
    deadline = time.monotonic() + 10
    while b.accepting and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Rejected) as e:
        b.submit("after", 1, 1, pipe.sampling())
    assert e.value.status == 503
    gated.gate.set()
    closer.join(30)
    assert not closer.is_alive()
    assert [j.state for j in jobs] == ["done"] * 7
    assert [len(j.result) for j in jobs] == [1] + [1 + i % 2 for i in range(6)]


def test_streaming_requests_share_a_batch_and_get_their_own_frames(pipe: TextToImage) -> None:
    gated = GatedPipe(pipe)
    b = Batcher(gated, max_wait_ms=0)
    frames: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}

    def sink(name: str) -> Any:
        return lambda images, done, total: frames[name].append((len(images), done))

    ja = b.submit("a", 2, 5, pipe.sampling(), on_frame=sink("a"))
    jb = b.submit("b", 1, 8, pipe.sampling(), on_frame=sink("b"))
    assert b.close()
    assert gated.calls == [("stream", ["a", "b"], [2, 1])]
    assert frames == {"a": [(2, 4), (2, 8), (2, 12)], "b": [(1, 4), (1, 8), (1, 12)]}
    same(ja.result, pipe("a", num_images=2, seed=5))
    same(jb.result, pipe("b", num_images=1, seed=8))


class Recording(GatedPipe):
    """Records the `sampling` each call and stream is handed."""

    def __init__(self, pipe: TextToImage) -> None:
        super().__init__(pipe)
        self.handed: list[Any] = []

    def __call__(self, prompts: Any, **kwargs: Any) -> Any:
        self.handed.append(kwargs["sampling"])
        return super().__call__(prompts, **kwargs)

    def stream(self, prompts: Any, **kwargs: Any) -> Any:
        self.handed.append(kwargs["sampling"])
        return super().stream(prompts, **kwargs)


def test_the_requests_sampling_config_is_handed_down_as_is(pipe: TextToImage) -> None:
    rec = Recording(pipe)
    b = Batcher(rec, max_wait_ms=0)
    plain, greedy = pipe.sampling(), pipe.sampling(top_k=1)
    jobs = [b.submit("a", 1, 1, plain), b.submit("b", 1, 2, greedy)]
    jobs.append(b.submit("c", 1, 3, greedy, on_frame=lambda *a: None))
    assert b.close()
    assert all(j.state == "done" for j in jobs)
    assert [id(s) for s in rec.handed] == [id(plain), id(greedy), id(greedy)]
    with pytest.raises(TypeError, match="settings must be a SamplingConfig, got dict"):
        b.submit("d", 1, 1, {"top_k": 1})  # type: ignore[arg-type]


class Boom(GatedPipe):
    """Fails every call that holds the prompt 'boom'."""

    def __call__(self, prompts: Any, **kwargs: Any) -> Any:
        if "boom" in prompts:
            self.calls.append(("call", list(prompts), []))
            raise RuntimeError("boom")
        return super().__call__(prompts, **kwargs)


def test_a_failing_request_fails_alone(pipe: TextToImage) -> None:
    b = Batcher(Boom(pipe), max_wait_ms=0)
    good = b.submit("good", 1, 1, pipe.sampling())
    bad = b.submit("boom", 1, 1, pipe.sampling())
    assert b.close()
    assert good.state == "done" and len(good.result) == 1
    assert bad.state == "failed" and str(bad.error) == "boom"


def test_a_closed_batcher_can_start_again(pipe: TextToImage) -> None:
    b = Batcher(pipe).start()
    assert b.close(30)
    with pytest.raises(Rejected):
        b.submit("a", 1, 1, pipe.sampling())
    b.start()  # an ASGI host may run the app's lifespan more than once
    job = b.submit("a", 1, 1, pipe.sampling())
    assert job.wait(30) and job.state == "done"
    assert b.close(30)
