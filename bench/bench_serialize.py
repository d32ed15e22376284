"""Benchmark: serializing one 24 MiB bf16 item, and how much of Python's interpreter that leaves to other threads.

NVFlare moves tensors in many threads of one process; a copy that holds the GIL stalls all of them. For each way of
serializing (safetensors' `save`, as NVFlare does, and `transport.serialize`), for packing the item and unpacking it
(`transport.pack`, `unpack`: `--compress_weights`), and for encoding the item from fp32 tensors cast to bf16 on the
way, plain and packed, as the server sends its fp32 global model (`transport.encode` with `dtype`), a second thread
counts in a Python loop while the item is processed over and over; its rate against an idle baseline is the share of
the interpreter that left free (1.0: none taken). The item holds random weights as Hugging Face initializes them
(std 0.02); `packed_ratio`: its packed size. MB/s are of the bf16 item.
Usage: python bench/bench_serialize.py [--mb 24] [--repeat 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transport  # noqa: E402


def counting_rate(work: Callable[[], object] | None, repeat: int) -> tuple[float, float]:
    """(iterations per second of a thread counting in a Python loop, seconds per call of `work`) while `work` runs
    `repeat` times; `work` None: the thread counts alone for a second."""
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    start = time.perf_counter()
    if work is None:
        time.sleep(1.0)
    else:
        for _ in range(repeat):
            work()
    elapsed = time.perf_counter() - start
    done.set()
    counter.join()
    return ticks[0] / elapsed, elapsed / max(repeat, 1)


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=24, help="item size in MiB")
    ap.add_argument("--repeat", type=int, default=40)
    args = ap.parse_args()
    item = {"T0": (torch.randn(int(args.mb * 2**20) // 2) * 0.02).to(torch.bfloat16)}
    blob = transport.serialize(item)
    assert bytes(blob) == save(item)
    packed = transport.pack(blob)
    assert transport.unpack(packed) == bytes(blob)
    held = {"T0": item["T0"].float()}  # the server's fp32 global model, sent in bf16
    assert transport.encode(held, False, torch.bfloat16) == bytes(blob)  # bf16 values: the cast loses nothing
    idle, _ = counting_rate(None, 0)
    rows = {}
    ways = {
        "safetensors.save": lambda: save(item),
        "transport.serialize": lambda: transport.serialize(item),
        "transport.pack": lambda: transport.pack(blob),
        "transport.unpack": lambda: transport.unpack(packed),
        "transport.encode fp32 as bf16": lambda: transport.encode(held, False, torch.bfloat16),
        "transport.encode fp32 as bf16 packed": lambda: transport.encode(held, True, torch.bfloat16),
    }
    for name, fn in ways.items():
        rate, per_call = counting_rate(fn, args.repeat)
        rows[name] = {"ms_per_item": round(per_call * 1e3, 2), "MB_per_s": round(args.mb * 2**20 / per_call / 1e6),
                      "interpreter_left_free": round(rate / idle, 2)}  # fmt: skip
    print(json.dumps({"mb": args.mb, "torch_threads": torch.get_num_threads(),
                      "packed_ratio": round(len(packed) / len(blob), 3),
                      **rows}))  # fmt: skip


if __name__ == "__main__":
    main()
