"""The thread count: what the process may use (affinity, cgroup quota), or --threads / $DALLEMINI_THREADS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dallemini.errors import InputError
from dallemini.threads import apply_threads, available_cpus, cgroup_cpu_limit, choose_threads

from .test_cli import run_here


@pytest.fixture(autouse=True)
def _no_thread_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DALLEMINI_THREADS", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
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
