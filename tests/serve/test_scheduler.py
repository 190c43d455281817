"""The continuous batcher: requests join and leave one running batch at step boundaries."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dallemini.pipeline import TextToImage
from dallemini.random_model import create_random_model
from dallemini.serve.batcher import Job
from dallemini.serve.scheduler import ContinuousBatcher
from tests.serve.test_batcher import same


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> TextToImage:
    d = create_random_model(tmp_path_factory.mktemp("scheduler") / "tiny", preset="tiny")
    return TextToImage.from_pretrained(d, device="cpu")


def at_step(batcher: ContinuousBatcher, actions: dict[int, object]) -> list[int]:
    """Run actions[k]() right after decoding step k; returns the rows of every step."""
    rows: list[int] = []

    def on_step(seconds: float, n: int) -> None:
        rows.append(n)
        action = actions.get(batcher.stats.steps)
        if action is not None:
            action()

    batcher.on_step = on_step
    return rows


def test_any_settings_share_the_batch_and_each_image_is_its_own(pipe: TextToImage) -> None:
    b = ContinuousBatcher(pipe, max_batch_images=8)  # not started: close() runs it here
    settings = [pipe.sampling(), pipe.sampling(top_k=5, temperature=1.5), pipe.sampling(top_p=0.8)]
    settings.append(pipe.sampling(condition_scale=1.0))  # one slot per image, not two
    jobs = [b.submit(f"cat {i}", 2, 10 * i, s) for i, s in enumerate(settings)]
    assert b.close()
    total = pipe.config.bart.image_length
    assert b.stats.steps == total  # all four requests in one batch, any settings
    for i, (job, s) in enumerate(zip(jobs, settings, strict=True)):
        assert job.state == "done"
        same(job.result, pipe(f"cat {i}", num_images=2, seed=10 * i, sampling=s))


def test_a_request_arriving_mid_batch_starts_at_the_next_step(pipe: TextToImage) -> None:
    b = ContinuousBatcher(pipe, max_batch_images=4)
    total = pipe.config.bart.image_length
    late: list[Job] = []
    rows = at_step(b, {3: lambda: late.append(b.submit("dog", 1, 5, pipe.sampling(top_k=3)))})
    first = b.submit("cat", 2, 1, pipe.sampling())
    b.start()  # running, so that it accepts the request submitted at step 3
    assert first.wait(30) and late and late[0].wait(30) and b.close(30)
    (second,) = late
    # admitted at step 4, it took its own `total` steps while the first finished at step `total`
    assert b.stats.steps == 3 + total
    assert rows[:3] == [4] * 3 and rows[3:total] == [6] * (total - 3) and rows[total:] == [2] * 3
    assert second.started < first.finished
    same(first.result, pipe("cat", num_images=2, seed=1))
    same(second.result, pipe("dog", num_images=1, seed=5, top_k=3))


def test_cancelling_a_running_request_frees_its_rows_for_the_queue(pipe: TextToImage) -> None:
    b = ContinuousBatcher(pipe, max_batch_images=2)
    first = b.submit("cat", 2, 1, pipe.sampling())  # fills the batch
    waiting = b.submit("dog", 2, 9, pipe.sampling())
    at_step(b, {5: lambda: b.cancel(first)})
    assert b.close()
    assert first.state == "cancelled" and waiting.state == "done"
    assert b.stats.steps == 5 + pipe.config.bart.image_length
    same(waiting.result, pipe("dog", num_images=2, seed=9))


def test_streaming_requests_get_their_own_frames(pipe: TextToImage) -> None:
    b = ContinuousBatcher(pipe, max_batch_images=4, stream_every=4)
    frames: list[tuple[int, int]] = []

    def on_frame(images: list[Image.Image], done: int, total: int) -> None:
        assert len(images) == 2
        frames.append((done, total))

    late: list[Job] = []
    at_step(b, {2: lambda: late.append(b.submit("dog", 2, 3, pipe.sampling(), on_frame=on_frame))})
    first = b.submit("cat", 2, 1, pipe.sampling())
    b.start()
    assert first.wait(30) and late and late[0].wait(30) and b.close(30)
    total = pipe.config.bart.image_length
    assert frames == [(k, total) for k in range(4, total, 4)]  # its own progress, not the batch's
    same(late[0].result, pipe("dog", num_images=2, seed=3))


def test_completion_keeps_the_rows_and_matches_the_pipeline(pipe: TextToImage) -> None:
    b = ContinuousBatcher(pipe, max_batch_images=4)
    init = pipe("an init image", seed=0, rerank=False)[0].image
    job = b.submit("cat", 2, 4, pipe.sampling(), init_image=init, keep_rows=2)
    plain = b.submit("cat", 1, 4, pipe.sampling())
    assert b.close()
    want = pipe("cat", num_images=2, seed=4, init_image=init, keep_rows=2, rerank=False)
    same(sorted(job.result, key=lambda g: g.seed), want)
    kept = 2 * pipe.config.vqgan.grid_size
    assert all(g.tokens[:kept] == want[0].tokens[:kept] for g in job.result)
    same(plain.result, pipe("cat", num_images=1, seed=4))


def test_a_request_larger_than_the_batch_joins_in_parts(pipe: TextToImage) -> None:
    b = ContinuousBatcher(pipe, max_batch_images=2)
    small = b.submit("dog", 1, 3, pipe.sampling())
    big = b.submit("cat", 5, 7, pipe.sampling(), on_frame=lambda *a: None)
    assert b.close()
    total = pipe.config.bart.image_length
    assert b.stats.steps == 3 * total  # 1 + 1 rows, then 2, then 1
    same(small.result, pipe("dog", num_images=1, seed=3))
    same(sorted(big.result, key=lambda g: g.seed), pipe("cat", num_images=5, seed=7, rerank=False))
