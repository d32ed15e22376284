"""Benchmark: how many bytes a site's result takes as a delta against the global model it trained from.

Trains the real Qwen3-VL-2B architecture (random weights, as Hugging Face initializes them) with the local trainer
on PubMedVision-shaped synthetic samples, one round of each `--steps` count per `--learning_rate`, each round from
the same starting weights (as every FL round starts from the global model), and prints per round one JSON line: the
share of bf16 weights that changed, and the bytes the result travels as packed whole (`transport.pack`) and as a
delta against the start (`--delta_weights`, job.py's default), against the raw bf16 bytes. The trainer's flags are
bench_fl_round.py's, but with the language model training as job.py's sites train it (`--tune_mm_llm True`: the
language model and the mergers train, the vision tower stays as it is); `--merger_only` trains the mergers alone, as
bench_fl_round.py's sites do.

Usage: python bench/bench_delta.py [--tiny] [--steps 20 100 400] [--learning_rate 5e-7 1e-5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_fl_round import TRAIN_ARGS  # noqa: E402
from bench_trainer import build_dataset, build_model_dir  # noqa: E402

import transport  # noqa: E402
from local_trainer import LocalTrainer, parse_train_args  # noqa: E402


def travelled_bytes(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, float]:
    """The share of changed weights and the bytes `trained` travels as, whole and as a delta against `start`."""
    reference = transport.Reference(start)

    def sizes(key: str) -> tuple[int, int, int, int]:
        item = {key: trained[key].cpu()}
        changed = int((item[key].view(torch.int16) != start[key].view(torch.int16)).sum())
        whole = len(transport.encode(item, True))
        delta = len(transport.encode(item, True, reference, [key]))
        return changed, trained[key].numel(), whole, delta

    with ThreadPoolExecutor(8) as pool:  # zstd and numpy leave the interpreter free
        rows = list(pool.map(sizes, trained))
    raw = sum(transport.nbytes(v) for v in trained.values())
    changed, numel, whole, delta = (sum(column) for column in zip(*rows, strict=True))
    return dict(changed=round(changed / numel, 4), raw_mb=round(raw / 1e6), whole_packed_mb=round(whole / 1e6),
                delta_mb=round(delta / 1e6), delta_of_raw=round(delta / raw, 4))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of this script")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 100, 400], help="optimizer steps of each round")
    ap.add_argument("--learning_rate", type=float, nargs="+", default=[5e-7, 1e-5], help="job.py's default: 5e-7")
    ap.add_argument("--workdir", default="/tmp/bench_fl_round", help="bench_fl_round.py's: the 2B model is reused")
    ap.add_argument("--merger_only", action="store_true", help="train the mergers alone (bench_fl_round.py's sites)")
    args = ap.parse_args()
    work = Path(args.workdir)
    model_dir = build_model_dir(work / ("tiny-qwen3-vl" if args.tiny else "qwen3-vl-2b-random"), args.tiny, 448 * 448)
    build_dataset(work / "images", n=64, image_size=64 if args.tiny else 448, mixed_sizes=False)
    flags = TRAIN_ARGS + (" --bf16 False --max_pixels 4096" if args.tiny else "")
    flags += "" if args.merger_only else " --tune_mm_llm True"  # the later flag wins
    for lr in args.learning_rate:
        argv = [*flags.split(), "--model_name_or_path", str(model_dir), "--dataset_use", str(work / "images"),
                "--image_root", str(work / "images"), "--learning_rate", str(lr), "--output_dir", str(work / "delta"),
                "--report_to", "none"]  # fmt: skip
        trainer = LocalTrainer(parse_train_args(argv))
        start = {k: v.cpu() for k, v in trainer.state_dict().items()}
        for steps in args.steps:
            trainer.config.max_steps = steps
            began = time.perf_counter()
            trained = trainer.train_round({k: v.clone() for k, v in start.items()}).state_dict
            seconds = time.perf_counter() - began
            row = dict(merger_only=args.merger_only, learning_rate=lr, steps=steps, train_s=round(seconds, 1))
            row.update(travelled_bytes(start, trained))
            print(json.dumps(row), flush=True)
        del trainer


if __name__ == "__main__":
    main()
