"""host_memory: glibc keeps the exchange's multi-MB buffers for reuse instead of faulting in fresh pages each time."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import host_memory

ROOT = Path(__file__).resolve().parents[1]

# What NVFlare does for every tensor it sends: a safetensors copy (a Rust buffer, then Python bytes), freed after.
SERIALIZE_LOOP = """
import resource, sys, torch
from safetensors.torch import save
import host_memory
if sys.argv[1] == "apply":
    assert host_memory.apply()
tensor = torch.zeros(6144, 2048, dtype=torch.bfloat16)  # one 25 MB Qwen3-VL-2B MLP matrix
save({"t": tensor})
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    save({"t": tensor})
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, env: dict[str, str] | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (env or {})
    out = subprocess.run(
        [sys.executable, "-c", SERIALIZE_LOOP, mode], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's mallopt")


@glibc_only
def test_apply_stops_page_faults_for_reused_buffers():
    default, tuned = page_faults("default"), page_faults("apply")
    # 20 x 50 MB of fresh pages by default: about 12,000 faults a copy; reused heap memory needs next to none.
    assert default > 20 * 6000, default
    assert tuned < default / 10, (default, tuned)


@glibc_only
def test_env_does_the_same_for_processes_started_with_it():
    assert page_faults("default", host_memory.ENV) < page_faults("default") / 10
