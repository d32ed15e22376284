"""Benchmark: does `--torch_compile` keep compiling after the first round? Tiny model on CPU, mixed image sizes.

Trains 3 rounds of 10 steps with one `LocalTrainer` and prints, per round, its wall time, the step times and
TorchDynamo's count of compiled graphs so far: graphs added after round 0 are recompiles for new shapes.
Usage: python bench/bench_recompiles.py [--rounds 3] [--steps 10] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_trainer import StepTimer, build_dataset, build_model_dir  # noqa: E402

from local_trainer import LocalTrainer, TrainConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    from torch._dynamo.utils import counters

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_recompiles_"))
    model_dir = build_model_dir(work / "tiny-qwen3-vl", True, 448 * 448)
    build_dataset(work / "data", n=200, image_size=64, mixed_sizes=True)
    config = TrainConfig(
        model_name_or_path=str(model_dir), dataset_use=str(work / "data"), image_root=str(work / "data"),
        output_dir=str(work / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
        learning_rate=1e-5, max_pixels=4096, min_pixels=784, warmup_ratio=0.0, lr_scheduler_type="constant",
        logging_steps=100, bf16=False, torch_compile=True, max_steps=args.steps,
    )  # fmt: skip
    timer = StepTimer()
    trainer = LocalTrainer(config, callbacks=[timer])
    for r in range(args.rounds):
        timer.ends.clear()
        start = time.perf_counter()
        trainer.train_round(None)
        steps = [round(b - a, 2) for a, b in zip(timer.ends, timer.ends[1:], strict=False)]
        graphs = counters["stats"]["unique_graphs"]
        print(f"round {r}: {time.perf_counter() - start:.1f} s, step times {steps}, graphs compiled so far {graphs}")


if __name__ == "__main__":
    main()
