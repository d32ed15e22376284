"""Benchmark: what a site's per-round evaluation costs next to its training, at job.py's defaults.

Builds the Qwen3-VL-2B architecture (random weights) and PubMedVision-shaped records (bench_trainer.py's), then
times, on one `LocalTrainer` at the trainer's default settings: a warm-up round, a round of `--steps` optimizer steps,
and `LocalTrainer.evaluate` on a val.json of `--val_records` records with generation on `--eval_samples` of them
(job.py's `--eval_samples 16 --eval_max_new_tokens 256`). Random weights rarely stop early, so every answer runs to
`--max_new_tokens`: the generation time is an upper bound. Prints one JSON line: the seconds of each, the seconds per
training step, and the evaluation's share of a round of `--round_steps` steps (README's example run: 100).

Usage: python bench/bench_evaluation.py [--tiny] [--steps 10] [--val_records 32] [--eval_samples 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_trainer import build_dataset, build_model_dir  # noqa: E402

from local_trainer import LocalTrainer, parse_train_args  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of this script")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps of the timed round")
    ap.add_argument("--round_steps", type=int, default=100, help="steps of the round the evaluation is compared with")
    ap.add_argument("--val_records", type=int, default=32, help="records of val.json (loss on all of them)")
    ap.add_argument("--eval_samples", type=int, default=16, help="records answered for the generation metrics")
    ap.add_argument("--max_new_tokens", type=int, default=256, help="longest answer")
    ap.add_argument("--workdir", default="/tmp/bench_evaluation")
    args = ap.parse_args()

    work = Path(args.workdir)
    model_dir = build_model_dir(work / ("tiny-qwen3-vl" if args.tiny else "qwen3-vl-2b-random"), args.tiny, 50176)
    train = build_dataset(work / "images", n=256, image_size=64 if args.tiny else 448, mixed_sizes=False)
    val = work / "val.json"
    val.write_text(json.dumps(json.loads(train.read_text())[: args.val_records]))
    cpu = ["--bf16", "False", "--torch_compile", "False", "--per_device_train_batch_size", "2"] if args.tiny else []
    trainer = LocalTrainer(parse_train_args([
        "--model_name_or_path", str(model_dir), "--dataset_use", str(train), "--image_root", str(work / "images"),
        "--output_dir", str(work / "out"), "--learning_rate", "5e-7", "--max_steps", str(args.steps),
        "--report_to", "none", *cpu,
    ]))  # fmt: skip
    trainer.train_round(round_num=0)  # warm-up: compilation, allocator
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    result = trainer.train_round(round_num=1)
    sync()
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = trainer.evaluate(str(val), generate_samples=args.eval_samples, max_new_tokens=args.max_new_tokens)
    sync()
    eval_s = time.perf_counter() - start
    loss_only_s = trainer.evaluate(str(val))["val_seconds"]
    per_step = train_s / result.metrics["steps"]
    print(json.dumps(dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", steps=result.metrics["steps"],
        train_round_s=round(train_s, 1), seconds_per_step=round(per_step, 3),
        val_records=args.val_records, eval_samples=args.eval_samples, max_new_tokens=args.max_new_tokens,
        evaluation_s=round(eval_s, 1), loss_only_s=round(loss_only_s, 1),
        share_of_a_round=round(eval_s / (eval_s + args.round_steps * per_step), 3), round_steps=args.round_steps,
        val_generated=scores.get("val_generated"),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
    )), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
