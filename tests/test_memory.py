"""keep_freed_memory: freed large blocks are reused without page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flatworld.runs import memory

# A step's pattern: allocate two 64 MB activations, touch them in full, free them; repeat, and
# count the minor page faults per step after the first.
_PROBE = """
import resource, torch
from flatworld.runs import keep_freed_memory
kept = keep_freed_memory()
def step():
    x = torch.ones(16 << 20)
    y = torch.ones(16 << 20)
for _ in range(10):  # the heap grows to what the pattern needs, then stays
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _probe(setting: str) -> tuple[str, float]:
    env = {"FLATWORLD_KEEP_FREED_MEMORY": setting, "OMP_NUM_THREADS": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    kept, faults = _probe("1")
    off, faults_off = _probe("0")
    assert (kept, off) == ("True", "False")
    pages = 2 * (64 << 20) / 4096
    assert faults_off > 0.5 * pages  # malloc as it is: every step faults its pages in again
    assert faults < 0.01 * pages


def test_bad_setting_is_named(monkeypatch):
    monkeypatch.setattr(memory, "_done", None)
    monkeypatch.setenv("FLATWORLD_KEEP_FREED_MEMORY", "yes")
    with pytest.raises(ValueError, match="FLATWORLD_KEEP_FREED_MEMORY='yes'; accepted: 0 or 1"):
        memory.keep_freed_memory()
