"""Benchmark: host time of the whole-model walks Hugging Face's Trainer makes every step, full model against LoRA.

The Qwen3-VL-2B architecture on the meta device (no weights: a walk's time depends on the modules, not on their
values), as is and with the default LoRA adapters injected (r=16 on the 7 projections: 4x the modules). Each row is
one walk's mean milliseconds: `model.train()` and `model.zero_grad()` (every step), `list(model.parameters())` (what
gradient clipping iterates), `num_parameters(exclude_embeddings=True)` (Hugging Face's per-step flop count, which
`RoundTrainer.floating_point_ops` does once per round instead).

Usage: python bench/bench_module_walks.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import config_2b  # noqa: E402

import lora  # noqa: E402


def mean_ms(walk, repeats: int) -> float:
    walk()
    start = time.perf_counter()
    for _ in range(repeats):
        walk()
    return round((time.perf_counter() - start) / repeats * 1e3, 2)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    from transformers import Qwen3VLForConditionalGeneration

    rows = []
    for mode in ("full", "lora"):
        with torch.device("meta"):
            model = Qwen3VLForConditionalGeneration._from_config(config_2b())
        if mode == "lora":
            lora.add_adapters(model, lora.LoraSettings())
        row = {"mode": mode, "modules": len(list(model.modules())), "parameters": len(list(model.parameters()))}
        row |= {
            "train_ms": mean_ms(model.train, args.repeats),
            "zero_grad_ms": mean_ms(model.zero_grad, args.repeats),
            "parameters_ms": mean_ms(lambda: list(model.parameters()), args.repeats),  # noqa: B023
            "num_parameters_ms": mean_ms(lambda: model.num_parameters(exclude_embeddings=True), args.repeats),  # noqa: B023
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
