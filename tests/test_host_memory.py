"""host_memory: glibc reuses the exchange's multi-MB buffers, in few arenas, instead of faulting in fresh pages."""

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


def run_last_number(script: str, mode: str, env: dict[str, str] | None) -> int:
    """The number `script` prints last, run in a fresh process with no MALLOC_ settings but `env`'s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (env or {})
    out = subprocess.run([sys.executable, "-c", script, mode], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def page_faults(mode: str, env: dict[str, str] | None = None) -> int:
    return run_last_number(SERIALIZE_LOOP, mode, env)


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


# What NVFlare's thread pools do while sending the weights: many threads alive at once, each in turn copying a few
# 25 MB tensors into buffers it frees again. Prints the MiB still held by the process afterwards.
THREADS_TAKING_TURNS = """
import ctypes, os, sys, threading
import host_memory
if sys.argv[1] == "apply":
    assert host_memory.apply()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
MB = 2**20
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
turn, alive = threading.Lock(), threading.Barrier(16)
def send_some():
    alive.wait()
    with turn:
        buffers = [libc.malloc(25 * MB) for _ in range(3)]
        for b in buffers:
            ctypes.memset(b, 1, 25 * MB)
        for b in buffers:
            libc.free(b)
before = rss()
threads = [threading.Thread(target=send_some) for _ in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print((rss() - before) // MB)
"""


def retained_mib(mode: str, env: dict[str, str] | None = None) -> int:
    return run_last_number(THREADS_TAKING_TURNS, mode, env)


@glibc_only
def test_threads_reuse_each_others_freed_buffers():
    default = retained_mib("default")
    # By default each of the 16 threads gets an arena of its own (up to 8 per core) and keeps what it freed.
    assert default > 16 * 75 / 3, default
    assert retained_mib("apply") < default / 3
    assert retained_mib("default", host_memory.ENV) < default / 3
