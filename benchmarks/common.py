"""What every benchmark records beside its figures: the machine, its load, and a JSON results file."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        if not line.strip():
            break  # the end of the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else whatever platform knows."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


# Instruction sets that decide which native kernels and oneDNN paths run.
_CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_features() -> dict[str, object]:
    """The CPU's family/model numbers (virtual machines often hide the marketing name) and which
    of the instruction sets that matter here it has, from /proc/cpuinfo; {} elsewhere."""
    fields = _cpuinfo()
    if not fields:
        return {}
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_family": fields.get("cpu family"),
        "cpu_model_number": fields.get("model"),
        "cpu_isa": [f for f in _CPU_FEATURES if f in flags],
    }


def machine_info(device: torch.device) -> dict[str, object]:
    """What the figures were measured on, including load (other work on the box slows them)."""
    info: dict[str, object] = {
        "cpu": cpu_model(),
        **cpu_features(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m_before"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`, after one untimed warm-up call."""
    import time

    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _host_cpu_s() -> tuple[float, float] | None:
    """Seconds of CPU time the whole machine spent busy, and stolen by its hypervisor, since boot
    (/proc/stat's first line; None where there is none)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def run_child(name: str, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a benchmark's child process and parse the JSON of its last "RESULT " line; on failure
    show its output and stop, naming `name`.

    The result gains "host_cpu": the cores' worth of CPU time that other work on this machine took
    while the child ran (all busy time minus the child's own), and that the hypervisor stole: other
    work slows the figures; a load average mixes the child's own threads into it.
    """
    import resource
    import subprocess
    import sys
    import time

    def child_cpu_s() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    host0, own0, t0 = _host_cpu_s(), child_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    host1, own1, wall = _host_cpu_s(), child_cpu_s(), time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{name}: child failed with exit code {proc.returncode}")
    out = json.loads(lines[-1][len("RESULT ") :])
    if host0 is not None and host1 is not None and wall > 0:
        out["host_cpu"] = {
            "child_cores": round((own1 - own0) / wall, 3),
            "other_cores": round(max(0.0, host1[0] - host0[0] - (own1 - own0)) / wall, 3),
            "stolen_cores": round((host1[1] - host0[1]) / wall, 3),
        }
    return out


def merge_results(path: Path, key: str, record: dict[str, object]) -> None:
    """Store `record` under `key` in a JSON file, keeping the other keys' figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    if path.exists():
        try:
            results = json.loads(path.read_text())
        except ValueError:
            results = {}
    results[key] = record
    path.write_text(json.dumps(results, indent=2) + "\n")


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 3.0) -> float:
    """FLOP/s of an n×n @ n×n matmul, repeated for about `seconds`."""
    import time

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if reps % 4 == 0:
            sync(device)
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums over a float32 tensor of `nbytes` (far beyond any cache)."""
    import time

    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best
