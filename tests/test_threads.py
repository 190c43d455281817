"""The thread count: what the process may use (affinity, cgroup quota), or --threads / $DALLEMINI_THREADS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dallemini import threads
from dallemini.config import BART_PRESETS, SamplingConfig
from dallemini.errors import InputError
from dallemini.generate import sample_image_tokens
from dallemini.models.bart import DalleBart
from dallemini.threads import (
    FIXED,
    ThreadTuner,
    apply_threads,
    available_cpus,
    cgroup_cpu_limit,
    choose_threads,
    tuner,
)

from .test_cli import run_here


@pytest.fixture(autouse=True)
def _no_thread_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "DALLEMINI_THREADS",
        "OMP_NUM_THREADS",
        "LOCAL_WORLD_SIZE",
        "DALLEMINI_TUNE_THREADS",
    ):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cgroup_quota_is_read_in_cpus(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    for text, want in (("max 100000\n", None), ("150000 100000\n", 1.5), ("junk", None)):
        cpu_max.write_text(text)
        assert cgroup_cpu_limit(cpu_max) == want
    assert cgroup_cpu_limit(tmp_path / "missing") is None
    cpu_max.write_text("50000 100000\n")  # half a CPU still gets one thread
    assert available_cpus(cpu_max) == 1


def test_requested_threads_win_and_bad_ones_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_threads(3) == 3
    monkeypatch.setenv("DALLEMINI_THREADS", "2")
    assert choose_threads() == 2 and choose_threads(1) == 1
    assert apply_threads() == 2 == torch.get_num_threads()
    for bad in ("two", "0"):
        monkeypatch.setenv("DALLEMINI_THREADS", bad)
        with pytest.raises(InputError, match="DALLEMINI_THREADS"):
            choose_threads()
    with pytest.raises(InputError, match="--threads"):
        choose_threads(0)


def test_torchrun_ranks_share_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(available_cpus() + 1))
    assert choose_threads() == 1


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity and at least 2 CPUs",
)
def test_a_restricted_affinity_gives_fewer_threads() -> None:
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "from dallemini.threads import choose_threads; print(choose_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DALLEMINI_THREADS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr


def test_threads_option_is_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_here(capsys, "generate", "--threads", "0", "--out", tmp_path, "a cat")
    assert code == 2 and "--threads must be between 1 and 1024" in err


def test_the_tuner_keeps_the_faster_count_and_probes_again() -> None:
    tuner = ThreadTuner(2, probe_every=3, trials=1)
    used = []
    for _ in range(14):
        with tuner.step() as n:
            used.append(n)
            time.sleep(0.03 if n == 2 else 0.001)  # as if another process held a core
    # probe one thread, then both (30 times slower: no need for a second turn), and keep one;
    # after 3 steps probe again (both first): confirmed, so wait 6, then 12
    assert used == [1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2]
    assert tuner.best == 1


def test_a_call_runs_on_the_tuned_count_and_leaves_the_count_as_it_found_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DALLEMINI_TUNE_THREADS", raising=False)
    apply_threads(None)
    torch.set_num_threads(2)
    monkeypatch.setitem(threads._STATE, "most", 2)
    loop = tuner("test-loop")
    assert isinstance(loop, ThreadTuner)
    with threads.tuned("test-loop"):
        for _ in range(4):
            with loop.step() as n:
                time.sleep(0.02 if n == 2 else 0.001)  # one thread wins
        assert torch.get_num_threads() == 1 and loop.best == 1  # between steps too
    assert torch.get_num_threads() == 2  # a trainer after an evaluation still has both
    with threads.tuned("test-loop"):
        assert torch.get_num_threads() == 1  # the next call starts on the count found fastest
    assert torch.get_num_threads() == 2


def test_a_probe_takes_its_trials_unless_one_count_is_far_slower() -> None:
    tuner = ThreadTuner(2, probe_every=2, trials=3)
    used = []
    for _ in range(10):
        with tuner.step() as n:
            used.append(n)
            time.sleep(0.004 if n == 2 else 0.006)  # an idle machine: both counts alike
    # the first probe (two steps each, in turns) confirms all threads, so 4 steps wait (not 2);
    # then 3 trials each
    assert used == [1, 2, 1, 2, 2, 2, 2, 2, 2, 1]
    assert tuner.best == 2


def test_a_later_probe_changes_the_count_only_for_a_clear_gain() -> None:
    """Once a count is chosen, a probe where the other is a little faster (a few lucky parallel
    steps on a busy CPU) keeps it; one where the other is clearly faster switches."""
    tuner = ThreadTuner(2, probe_every=2, trials=2)
    cost = {1: 0.004, 2: 0.012}  # busy: one thread first wins

    def steps(k: int) -> list[int]:
        used = []
        for _ in range(k):
            with tuner.step() as n:
                used.append(n)
                time.sleep(cost[n])
        return used

    steps(4)
    assert tuner.best == 1
    cost[2] = 0.0036  # 0.9x: not worth the risk
    steps(6)
    assert tuner.best == 1
    cost[2] = 0.001  # 4x faster: the other work has gone
    steps(12)
    assert tuner.best == 2


def test_a_chosen_thread_count_is_never_tuned(monkeypatch: pytest.MonkeyPatch) -> None:
    apply_threads(1)
    assert isinstance(tuner("decode"), type(FIXED))
    monkeypatch.setenv("DALLEMINI_THREADS", "2")
    apply_threads()
    assert tuner("decode") is FIXED
    monkeypatch.delenv("DALLEMINI_THREADS")
    apply_threads()  # automatic: tuned, and the same tuner for the same loop
    assert isinstance(tuner("decode"), ThreadTuner) and tuner("decode") is tuner("decode")
    monkeypatch.setenv("DALLEMINI_TUNE_THREADS", "0")
    assert tuner("decode") is FIXED


def test_switching_threads_between_steps_keeps_the_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = DalleBart(BART_PRESETS["tiny"]).eval()
    ids = torch.randint(3, 1000, (2, 12))
    mask = torch.ones_like(ids)
    u, um = ids[:1].clone(), torch.zeros_like(ids[:1])
    um[0, :2] = 1
    run = lambda: sample_image_tokens(model, ids, mask, u, um, [1, 2], SamplingConfig(), 60)  # noqa: E731
    monkeypatch.setenv("DALLEMINI_TUNE_THREADS", "0")
    torch.set_num_threads(2)
    fixed = run()
    monkeypatch.delenv("DALLEMINI_TUNE_THREADS")
    apply_threads()
    switching = ThreadTuner(2, probe_every=1, trials=1)  # 1, 2, 2, 1, ... threads
    monkeypatch.setitem(threads._TUNERS, ("decode", threading.get_ident()), switching)
    assert torch.equal(run(), fixed)


def test_training_settles_on_one_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop that keeps one count takes all threads unless they are not clearly faster now; a
    count the user chose stays as it is."""
    monkeypatch.delenv("DALLEMINI_TUNE_THREADS", raising=False)
    monkeypatch.delenv("DALLEMINI_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    apply_threads(None)
    monkeypatch.setitem(threads._STATE, "most", 2)
    busy = lambda: time.sleep(0.01 if torch.get_num_threads() == 2 else 0.005)  # noqa: E731
    assert threads.settle("train", busy) == 1 and torch.get_num_threads() == 1
    idle = lambda: time.sleep(0.003 if torch.get_num_threads() == 2 else 0.006)  # noqa: E731
    assert threads.settle("train", idle) == 2 and torch.get_num_threads() == 2
    alike = lambda: time.sleep(0.005)  # noqa: E731  # no clear gain: one thread risks less
    assert threads.settle("train", alike) == 1
    apply_threads(2)
    assert not threads.tuning("train") and threads.settle("train", busy) == 2
