"""The CPU allocator setting: freed tensor memory stays in the process instead of being faulted in every step."""
from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import run_process

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
    out = run_process([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tuned_allocator_stops_page_faults_per_step():
    system, tuned = _probe("system"), _probe("tuned")
    if not tuned["tuned"]:
        pytest.skip("not glibc: the allocator setting is a no-op here")
    assert tuned["reported"]
    # 64 MiB fresh from the kernel is 16,384 faults of 4 KiB pages; kept in the heap it is next to none.
    assert system["faults"] > 10_000, system
    assert tuned["faults"] < 200, (system, tuned)


@pytest.mark.slow
def test_system_setting_leaves_malloc_alone():
    result = _probe("tuned", PIXELFORMER_CPU_ALLOCATOR="system")
    assert result == {"tuned": False, "reported": False, "faults": result["faults"]}


def test_tuning_is_idempotent():
    first = tune_cpu_allocator()
    assert tune_cpu_allocator() == first


def test_auto_precision_follows_the_measurements(monkeypatch):
    import torch

    from pixelformer.config import compose
    from pixelformer.engine import resolve_precision
    from pixelformer.runtime import BF16_MIN_WIDTH_CPU, auto_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert auto_precision("cpu", 64) == "32-true"  # narrow: bf16 measured at 0.52x fp32
    assert auto_precision("cpu", BF16_MIN_WIDTH_CPU) == "bf16-mixed"  # 192 wide: 1.5x
    assert auto_precision("mps", 768) == "32-true"
    cfg = compose(["model=pit_tiny", "trainer.accelerator=cpu"])
    assert cfg.trainer.precision == "auto" and resolve_precision(cfg) == "bf16-mixed" == cfg.trainer.precision
    cfg = compose(["model=pit_tiny", "model.embed_dim=96", "model.num_heads=3", "trainer.accelerator=cpu"])
    assert resolve_precision(cfg) == "32-true"
    assert resolve_precision(compose(["trainer.accelerator=cpu"])) == "32-true"  # the default pit_mini, 64 wide
    explicit = compose(["model=pit_tiny", "trainer.precision=32-true"])
    assert resolve_precision(explicit) == "32-true"  # only "auto" is resolved
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert auto_precision("cpu", 768) == "32-true"  # CPUs without AMX are not measured: stay in fp32
