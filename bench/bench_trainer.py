"""Benchmark: local trainer throughput, real Qwen3-VL-2B architecture (random weights), PubMedVision-shaped data.

Builds the 2B model (random weights: speed does not depend on their values) and a synthetic dataset of one image
per sample (448x448, or a mix of sizes) with 100-400 text tokens, then times `LocalTrainer.train_round` after a
warm-up round. Prints one JSON line per configuration: samples/s, tokens/s, model TFLOP/s, MFU, peak GiB.
FLOPs are counted as in ../shared/bench/gpu_anchor.py (6 x params x tokens, vision over pre-merge patches,
attention scores; x4/3 with activation checkpointing), so the two are comparable.

Usage: python bench/bench_trainer.py [--tiny] [--steps 20] [--configs bs8,bs16,bs16-prox]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from local_trainer import LocalTrainer, TrainConfig  # noqa: E402
from model import build_tiny_processor, config_2b, tiny_config  # noqa: E402
from synthetic_data import write_dataset  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}
FILLER = (
    "The scan shows a well defined lesion with smooth margins and no surrounding oedema, consistent with a benign "
    "process; correlation with the clinical history and prior imaging is recommended."
)


def build_model_dir(path: Path, tiny: bool, max_pixels: int) -> Path:
    """Save a random-weight Qwen3-VL (2B or tiny) and a processor with Qwen's real tokenizer as a HF directory."""
    from transformers import Qwen3VLForConditionalGeneration

    if (path / "config.json").exists():
        return path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        config = tiny_config() if tiny else config_2b()
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    building = path.with_name(path.name + ".building")  # a failed build leaves no folder taken for a whole one
    shutil.rmtree(building, ignore_errors=True)
    model.save_pretrained(building)
    build_tiny_processor(min_pixels=784, max_pixels=max_pixels).save_pretrained(building)
    shutil.rmtree(path, ignore_errors=True)
    building.rename(path)
    return path


def build_dataset(root: Path, n: int, image_size: int, mixed_sizes: bool, seed: int = 0) -> Path:
    """Synthetic single-image records whose text is padded to 100-400 tokens, as in PubMedVision."""
    json_path = write_dataset(root, num_records=n, seed=seed, image_size=image_size, multi_image_fraction=0.0)
    rng = random.Random(seed)
    records = json.loads(json_path.read_text())
    if mixed_sizes:
        from PIL import Image

        for r in records:
            w, h = rng.choice([(448, 448), (512, 384), (640, 480), (336, 336), (384, 512)])
            p = root / r["image"][0]
            Image.open(p).resize((w, h)).save(p)
    for r in records:
        r["conversations"][0]["value"] = "<image>\n" + r["conversations"][0]["value"]
        r["conversations"][1]["value"] += " " + " ".join([FILLER] * rng.randint(3, 12))
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


def flops_per_sample(cfg, n_params: int, n_vision: int, tokens: float, patches: float, grad_ckpt: bool) -> float:
    """Training FLOPs for one sample, counted exactly as gpu_anchor.py does."""
    t, v = cfg.text_config, cfg.vision_config
    flops = 6 * (n_params - n_vision) * tokens + 6 * n_vision * patches
    flops += 12 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * tokens * tokens
    flops += 12 * v.depth * v.hidden_size * patches * patches
    return flops * (4 / 3 if grad_ckpt else 1)


def sample_shapes(trainer: LocalTrainer, n: int = 256) -> tuple[float, float]:
    """Mean tokens and pre-merge image patches per sample, from the trainer's own encoding of `n` records."""
    tokens = patches = 0
    for i in range(min(n, len(trainer.dataset))):
        sample = trainer.dataset.encode(i)
        tokens += len(sample["input_ids"])
        patches += int(sample["image_grid_thw"].prod(dim=-1).sum())
    count = min(n, len(trainer.dataset))
    return tokens / count, patches / count


class StepTimer:
    """A TrainerCallback that records when each optimizer step ends (after a device sync)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def loader_rate(trainer: LocalTrainer, batch_size: int, workers: int, batches: int = 30) -> float:
    """Batches per second the data pipeline alone delivers (decode, resize, tokenize, collate)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(trainer.dataset, batch_size=batch_size, num_workers=workers, collate_fn=trainer.collator,
                        shuffle=True)  # fmt: skip
    batches = min(batches, len(loader) - 1)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - start)


def device_busy(trainer: LocalTrainer, steps: int) -> dict:
    """Seconds per step the GPU spends running kernels and copies, and kernels launched per step, over a profiled
    round of `steps` steps (after the timed one). Busy time well under the steady step time means the GPU waits for
    the host (launching kernels) rather than the host for the GPU."""
    from torch.profiler import ProfilerActivity, profile

    trainer.config.max_steps = steps
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            trainer.train_round(None)
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in events)
    except Exception as e:  # a profiler that differs must not cost the row its other figures
        return {"device_busy_error": f"{type(e).__name__}: {e}"[:200]}
    return {"device_busy_step_s": round(busy_us / 1e6 / steps, 3), "kernels_per_step": round(len(events) / steps)}


def host_profile(trainer: LocalTrainer, steps: int, name: str, top: int = 35) -> None:
    """Print where the host's time goes over a round of `steps` steps (cProfile: Python functions, by own time and
    by cumulative time), to explain a host-bound step. cProfile slows Python calls, so shares matter, not seconds."""
    import cProfile
    import pstats

    trainer.config.max_steps = steps
    profiler = cProfile.Profile()
    profiler.runcall(trainer.train_round, None)
    for order in ("tottime", "cumulative"):
        print(f"--- host profile of {name}, {steps} steps, by {order}", flush=True)
        pstats.Stats(profiler).sort_stats(order).print_stats(top)


def run_case(
    name: str, cfg: TrainConfig, steps: int, profile_to: Path | None = None, busy_steps: int = 0, host_steps: int = 0
) -> dict:
    """Warm up with a 2-step round, then time a `steps`-step round of the same trainer (and, with `busy_steps`,
    measure the GPU's busy time in a profiled round of that many steps: `device_busy`; with `host_steps`, print a
    host profile of a round of that many steps)."""
    timer = StepTimer()
    trainer = LocalTrainer(cfg, callbacks=[timer])
    model = trainer.model
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    tokens, patches = sample_shapes(trainer)
    trainer.config.max_steps = 2
    trainer.train_round(None)
    trainer.config.max_steps = steps
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer.ends.clear()
    if profile_to:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            m = trainer.train_round(None).metrics
        key = "cuda" if torch.cuda.is_available() else "cpu"
        table = "\n".join(prof.key_averages().table(sort_by=f"{kind}{key}_time_total", row_limit=40,
                                                    max_name_column_width=70) for kind in ("", "self_"))  # fmt: skip
        profile_to.write_text(table)
        print(table, flush=True)
    else:
        m = trainer.train_round(None).metrics
    steady = sorted(b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False))[len(timer.ends) // 2 - 1]
    busy = device_busy(trainer, busy_steps) if busy_steps and torch.cuda.is_available() else {}
    if host_steps:
        host_profile(trainer, host_steps, name)
    loader = loader_rate(trainer, cfg.per_device_train_batch_size, cfg.dataloader_num_workers)
    steady_samples_per_s = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps / steady
    samples_per_s = m["samples"] / m["seconds"]
    flops = flops_per_sample(model.config, n_params, n_vision, tokens, patches, cfg.gradient_checkpointing)
    tflops = flops * samples_per_s / 1e12
    out = dict(
        case=name, batch=cfg.per_device_train_batch_size, grad_ckpt=cfg.gradient_checkpointing, steps=int(m["steps"]),
        samples=int(m["samples"]), seconds=round(m["seconds"], 2), samples_per_s=round(samples_per_s, 2),
        tokens_per_s=round(tokens * samples_per_s), tokens_per_sample=round(tokens, 1),
        patches_per_sample=round(patches, 1), tflops=round(tflops, 1), loss=round(m["loss"], 3),
        steady_step_s=round(steady, 3), steady_samples_per_s=round(steady_samples_per_s, 2),
        steady_tflops=round(flops * steady_samples_per_s / 1e12, 1),
        loader_batches_per_s=round(loader, 1),
    ) | busy  # fmt: skip
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
        out["mfu"] = round(tflops / peak, 3) if peak else None
        out["steady_mfu"] = round(flops * steady_samples_per_s / 1e12 / peak, 3) if peak else None
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="tiny model and images: a CPU smoke test")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per configuration")
    ap.add_argument(
        "--configs",
        default="bs8,bs16",
        help="comma list of bsN[-gc][-compile][-pad][-prox]: checkpointing, torch.compile, padded batches (not "
        "packed), FedProx (mu 0.01)",
    )
    ap.add_argument("--mixed_sizes", action="store_true", help="a mix of image sizes instead of 448x448 only")
    ap.add_argument("--profile", default=None, help="write a torch.profiler op table of the timed round to this file")
    ap.add_argument("--workdir", default=None, help="where to build the model and data (default: a temp dir)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_trainer_"))
    max_pixels = 448 * 448
    model_dir = build_model_dir(work / ("tiny-qwen3-vl" if args.tiny else "qwen3-vl-2b-random"), args.tiny, max_pixels)
    image_size = 64 if args.tiny else 448
    build_dataset(work / "data", n=2000 if not args.tiny else 64, image_size=image_size, mixed_sizes=args.mixed_sizes)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps(dict(device=device, torch=torch.__version__, mixed_sizes=args.mixed_sizes)), flush=True)
    for spec in args.configs.split(","):
        bs, *options = spec.split("-")
        bs = int(bs.removeprefix("bs"))
        cfg = TrainConfig(
            model_name_or_path=str(model_dir), dataset_use=str(work / "data"), image_root=str(work / "data"),
            output_dir=str(work / "out"), per_device_train_batch_size=bs, gradient_accumulation_steps=1,
            gradient_checkpointing="gc" in options, torch_compile="compile" in options,
            padding_free="pad" not in options, learning_rate=1e-5, fedprox_mu=0.01 if "prox" in options else 0.0,
            max_pixels=max_pixels, min_pixels=784, warmup_ratio=0.0, lr_scheduler_type="constant", logging_steps=1,
            dataloader_num_workers=0 if args.tiny else min(8, os.cpu_count() or 1), bf16=torch.cuda.is_available(),
        )  # fmt: skip
        t0 = time.time()
        res = run_case(spec, cfg, args.steps, Path(args.profile) if args.profile else None)
        res["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
