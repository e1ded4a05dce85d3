"""The CPU allocator setting: freed tensor memory stays in the process instead of being faulted in every step."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pixelformer.runtime import tune_cpu_allocator

# Allocates, touches and frees a 64 MiB tensor several times (as every training step does with its activations) and
# reports the minor page faults that took, after tuning the allocator or not.
PROBE = """
import json, resource, statistics, sys, torch
from pixelformer.runtime import tune_cpu_allocator, cpu_allocator_tuned
tuned = tune_cpu_allocator() if sys.argv[1] == "tuned" else False
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2 ** 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median step: glibc may still move the block once or twice while the heap settles.
print(json.dumps({"tuned": tuned, "reported": cpu_allocator_tuned(), "faults": statistics.median(faults)}))
"""


def _probe(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tuned_allocator_stops_page_faults_per_step():
    system, tuned = _probe("system"), _probe("tuned")
    if not tuned["tuned"]:
        pytest.skip("not glibc: the allocator setting is a no-op here")
    assert tuned["reported"]
    # 64 MiB fresh from the kernel is 16,384 faults of 4 KiB pages; kept in the heap it is next to none.
    assert system["faults"] > 10_000, system
    assert tuned["faults"] < 200, (system, tuned)


def test_system_setting_leaves_malloc_alone():
    result = _probe("tuned", PIXELFORMER_CPU_ALLOCATOR="system")
    assert result == {"tuned": False, "reported": False, "faults": result["faults"]}


def test_tuning_is_idempotent():
    first = tune_cpu_allocator()
    assert tune_cpu_allocator() == first
