"""Process memory settings: freed blocks are kept for the next step unless the user turns it off."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import torch
from dallemini.memory import keep_freed_memory

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

kept = keep_freed_memory()
before = rss_mb()
x = torch.ones(64 << 20)  # 256 MB, touched
del x
print(kept, rss_mb() - before)
"""


def _probe(setting: str) -> tuple[str, float]:
    env = {**os.environ, "DALLEMINI_KEEP_FREED_MEMORY": setting}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_memory_is_kept_unless_turned_off() -> None:
    """A freed 256 MB block stays in the process for the next step; with the setting off it goes back."""
    kept, grown = _probe("1")
    assert kept == "True" and grown > 200
    kept, grown = _probe("0")
    assert kept == "False" and grown < 50
