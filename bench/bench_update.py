"""Benchmark: how much of a site's round reaches the server, and how many bytes it takes each way.

Trains the real Qwen3-VL-2B architecture (random weights, as Hugging Face initializes them: the same scale as real
ones) with the local trainer on PubMedVision-shaped synthetic samples, one round per `--learning_rate` from the same
bf16 start (as every FL round starts from the global model's bf16 rounding), with the language model training as
job.py's sites do (`--tune_mm_llm True`), a constant learning rate and no warm-up. Per learning rate it prints one
JSON line comparing, over all trained weights, with the trainer's true fp32 change:

- `rounded`: what the sites sent before (the fp32 result rounded to bf16, minus the start), and
- `update`: what they send now (the fp32 change itself rounded to bf16, `TrainResult.update`).

For each: `kept` (the share of the true change the sent one carries, its projection), `cosine`, `rel_err` (of the
sent change against the true one) and `moved_lost` (the share of moved weights that come back unchanged). Bytes: the
update raw and packed (`transport.pack`, job.py's `--compress_weights`), the new global model's bf16 rounding packed
(what every site downloads), and that rounding as a delta against the previous one, zigzag-coded and packed the same
way (what the removed `--delta_weights` sent down, measured to say what removing it costs).

Usage: python bench/bench_update.py [--tiny] [--steps 20] [--learning_rate 5e-7 1e-5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_fl_round import TRAIN_ARGS  # noqa: E402
from bench_trainer import build_dataset, build_model_dir  # noqa: E402

import transport  # noqa: E402
from local_trainer import LocalTrainer, parse_train_args  # noqa: E402


def retention(true: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
    """Sums over one tensor (float64): <sent, true>, |true|^2, |sent|^2, |sent - true|^2, moved, moved and lost."""
    true, sent = true.double(), sent.double()
    moved = true != 0
    return torch.stack([
        (sent * true).sum(), (true * true).sum(), (sent * sent).sum(), ((sent - true) ** 2).sum(),
        moved.sum(), (moved & (sent == 0)).sum(),
    ]).cpu()  # fmt: skip


def summary(sums: torch.Tensor) -> dict[str, float]:
    dot, true2, sent2, err2, moved, lost = sums.tolist()
    return {
        "kept": round(dot / true2, 4),
        "cosine": round(dot / (true2 * sent2) ** 0.5, 4) if sent2 else 0.0,
        "rel_err": round((err2 / true2) ** 0.5, 4),
        "moved_lost": round(lost / moved, 4),
    }


def delta_packed_bytes(new: torch.Tensor, old: torch.Tensor) -> int:
    """The bytes of bf16 `new` as a delta against `old`: each 16-bit word's difference, zigzag-coded, high and low
    bytes packed as `transport.pack` packs them."""
    diff = new.reshape(-1).view(torch.int16).numpy() - old.reshape(-1).view(torch.int16).numpy()  # wraps, as int16
    zigzag = (np.left_shift(diff, 1) ^ np.right_shift(diff, 15)).view("<u2")
    high, low = transport._planes(zigzag)
    return len(high) + len(low)


def sizes(update: torch.Tensor, new_global: torch.Tensor, old_global: torch.Tensor) -> np.ndarray:
    """Bytes of one tensor: update raw and packed, new global packed whole and as a delta against the old one."""
    return np.array([
        transport.nbytes(update), len(transport.encode({"t": update}, packed=True)),
        len(transport.encode({"t": new_global}, packed=True)), delta_packed_bytes(new_global, old_global),
    ])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of this script")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of the round")
    ap.add_argument("--batch", type=int, default=8, help="per-device batch size")
    ap.add_argument("--learning_rate", type=float, nargs="+", default=[5e-7, 1e-5], help="job.py's default: 5e-7")
    ap.add_argument("--workdir", default="/tmp/bench_fl_round", help="bench_fl_round.py's: the 2B model is reused")
    args = ap.parse_args()
    work = Path(args.workdir)
    model_dir = build_model_dir(work / ("tiny-qwen3-vl" if args.tiny else "qwen3-vl-2b-random"), args.tiny, 448 * 448)
    build_dataset(work / "images", n=max(64, args.batch * 4), image_size=64 if args.tiny else 448, mixed_sizes=False)
    flags = TRAIN_ARGS + (" --bf16 False --max_pixels 4096" if args.tiny else "")
    flags += f" --tune_mm_llm True --per_device_train_batch_size {args.batch} --lr_scheduler_type constant"
    for lr in args.learning_rate:
        argv = [*flags.split(), "--model_name_or_path", str(model_dir), "--dataset_use", str(work / "images"),
                "--image_root", str(work / "images"), "--learning_rate", str(lr), "--output_dir", str(work / "update"),
                "--report_to", "none", "--max_steps", str(args.steps)]  # fmt: skip
        trainer = LocalTrainer(parse_train_args(argv))
        start = {k: v.cpu() for k, v in trainer.state_dict().items()}
        began = time.perf_counter()
        update = trainer.train_round({k: v.clone() for k, v in start.items()}).update
        seconds = time.perf_counter() - began
        params = dict(trainer.model.named_parameters())
        rounded_sums, update_sums, work_items = torch.zeros(6, dtype=torch.float64), torch.zeros(6), []
        with torch.no_grad():
            for key, sent in update.items():
                fp32, begin = params[key].detach(), start[key].to(params[key].device).float()
                true = fp32 - begin
                rounded_sums += retention(true, fp32.to(torch.bfloat16).float() - begin)
                update_sums += retention(true, sent.float())
                new_global = (begin + sent.float()).to(torch.bfloat16).cpu()
                work_items.append((sent.cpu(), new_global, start[key]))
        with ThreadPoolExecutor(8) as pool:  # zstd and numpy leave the interpreter free
            update_raw, update_packed, global_packed, global_delta = sum(pool.map(lambda a: sizes(*a), work_items))
        frozen = [v for k, v in start.items() if k not in update]  # the same in both global models
        frozen_packed = sum(len(transport.encode({"t": v}, packed=True)) for v in frozen)
        row = {
            "learning_rate": lr, "steps": args.steps, "batch": args.batch, "train_s": round(seconds, 1),
            "trained_tensors": len(update), "rounded": summary(rounded_sums.double()),
            "update": summary(update_sums.double()), "update_raw_mb": round(update_raw / 1e6),
            "update_packed_mb": round(update_packed / 1e6),
            "global_packed_mb": round((global_packed + frozen_packed) / 1e6),
            "global_delta_mb": round(global_delta / 1e6),  # frozen tensors' deltas (zeros) left out
            "frozen_raw_mb": round(sum(map(transport.nbytes, frozen)) / 1e6),
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        del trainer, update, params


if __name__ == "__main__":
    main()
