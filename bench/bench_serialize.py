"""Benchmark: serializing one 24 MiB bf16 item, and how much of Python's interpreter that leaves to other threads.

NVFlare moves tensors in many threads of one process; a copy that holds the GIL stalls all of them. For each way of
serializing (safetensors' `save`, as NVFlare does, and `transport.serialize`), and for packing the item and unpacking
it (`transport.pack`, `unpack`: `--compress_weights`), and encoding it as a delta against its weights before a
fine-tuning-like change and rebuilding it (`transport.encode` with a `Reference`, `unpack`: `--delta_weights`), a
second thread counts in a Python loop while the item is processed over and over; its rate against an idle baseline
is the share of the interpreter that left free (1.0: none taken). The item holds random weights as Hugging Face
initializes them (std 0.02); `packed_ratio`: its packed size;
`delta_ratio`, `delta_changed`: its delta's size, and the share of its weights that changed (fp32 steps of std 1e-4
rounded to bf16, about what 100 steps at a learning rate of 1e-5 change in the 2B model, BENCHMARKS.md).
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=24, help="item size in MiB")
    ap.add_argument("--repeat", type=int, default=40)
    args = ap.parse_args()
    item = {"T0": (torch.randn(int(args.mb * 2**20) // 2) * 0.02).to(torch.bfloat16)}
    blob = transport.serialize(item)
    assert bytes(blob) == save(item)
    packed = transport.pack(blob)
    assert transport.unpack(packed) == bytes(blob)
    before = {"w": item["T0"]}
    g = torch.Generator().manual_seed(1)
    after = {"T0": (item["T0"].float() + torch.randn(item["T0"].shape, generator=g) * 1e-4).bfloat16()}
    held = transport.Reference(before)
    delta = transport.encode(after, True, held, ["w"])
    assert transport.unpack(delta, held) == bytes(transport.serialize(after))
    idle, _ = counting_rate(None, 0)
    rows = {}
    ways = {
        "safetensors.save": lambda: save(item),
        "transport.serialize": lambda: transport.serialize(item),
        "transport.pack": lambda: transport.pack(blob),
        "transport.unpack": lambda: transport.unpack(packed),
        "transport.encode delta": lambda: transport.encode(after, True, held, ["w"]),
        "transport.unpack delta": lambda: transport.unpack(delta, held),
    }
    for name, fn in ways.items():
        rate, per_call = counting_rate(fn, args.repeat)
        rows[name] = {"ms_per_item": round(per_call * 1e3, 2), "MB_per_s": round(args.mb * 2**20 / per_call / 1e6),
                      "interpreter_left_free": round(rate / idle, 2)}  # fmt: skip
    print(json.dumps({"mb": args.mb, "torch_threads": torch.get_num_threads(),
                      "packed_ratio": round(len(packed) / len(blob), 3),
                      "delta_ratio": round(len(delta) / len(blob), 3),
                      "delta_changed": round(float((after["T0"] != before["w"]).float().mean()), 3),
                      **rows}))  # fmt: skip


if __name__ == "__main__":
    main()
