"""Benchmark: LoRA (`--peft lora`) against full fine-tuning in the built-in trainer, in one command.

The Qwen3-VL-2B architecture with random weights (speed and memory do not depend on their values) and
PubMedVision-shaped synthetic samples, as bench_trainer.py builds them. Each mode is timed as bench_trainer.py times
a configuration (a 2-step warm-up round, then a round of --steps steps, same trainer): samples/s, steady step time
and peak GPU memory, plus the parameters a site trains and the bytes it sends per round (full: its bf16 update of
every trained tensor; LoRA: B in fp32, and A too with naive averaging).

Modes: `full` (the trainer's defaults: LLM and mergers trained), `lora` (exact aggregation: A frozen, B trained),
`lora-naive` (A and B trained), `lora-nodrop` (`lora` with --lora_dropout 0).

Each mode starts from an empty TorchDynamo cache, as a job (one mode per process) does: all decoder layers and vision
blocks share one compiled code object, whose cache would otherwise keep every earlier mode's graphs and reach dynamo's
recompile limit (8), past which the remaining variants run eagerly. Each row says what the mode compiled: `graphs`,
`graph_breaks` and `recompile_limit_hits` (0 unless something ran eagerly).

Usage: python bench/bench_lora.py [--tiny] [--steps 20] [--batch 8] [--lora_r 16] [--modes full,lora,lora-naive]
       [--compile] [--gc] [--busy_steps N] [--host_steps N] [--records 2000] [--workdir DIR]
`--busy_steps N` (GPU) profiles N more steps per mode: `device_busy_step_s`, the GPU's kernel time per step,
against `steady_step_s` tells a host-bound step (the GPU waits for kernel launches) from a GPU-bound one.
`--host_steps N` prints a cProfile of N more steps per mode: where a host-bound step's time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import build_dataset, build_model_dir, run_case  # noqa: E402

import lora  # noqa: E402
from local_trainer import TrainConfig, set_trainable  # noqa: E402
from model import TIED_LM_HEAD  # noqa: E402

MODES = {
    "full": {},
    "lora": {"peft": "lora", "lora_aggregation": "exact", "tune_mm_mlp": False},
    "lora-naive": {"peft": "lora", "lora_aggregation": "naive", "tune_mm_mlp": False},
    "lora-nodrop": {"peft": "lora", "lora_aggregation": "exact", "tune_mm_mlp": False, "lora_dropout": 0.0},
}
FULL_2B_BYTES = 4.26e9  # the 2B model in bf16, as it travels to the sites


def exchange(cfg: TrainConfig) -> dict:
    """What a site of this configuration trains and sends each round, from the model's structure alone (meta)."""
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(cfg.model_name_or_path))
    settings = cfg.lora_settings()
    if settings:
        adapter = lora.initial_adapter(model, settings)
        sent = {k: v.numel() for k, v in adapter.items() if lora.trained(k, settings)}
        return {"trained_params": sum(sent.values()), "sent_bytes": 4 * sum(sent.values()),
                "received_bytes": 4 * sum(v.numel() for v in adapter.values())}  # fmt: skip
    set_trainable(model, cfg)
    trained = sum(p.numel() for k, p in model.named_parameters() if p.requires_grad and k != TIED_LM_HEAD)
    everything = sum(p.numel() for p in model.parameters())  # the tied lm_head counted once
    return {"trained_params": trained, "sent_bytes": 2 * trained, "received_bytes": 2 * everything}


@contextlib.contextmanager
def fresh_compile(stats: dict):
    """Empty TorchDynamo's cache, then put in `stats` what the block compiled: graphs, graph breaks and recompile-limit
    hits (frames left to run eagerly)."""
    from torch._dynamo.utils import counters

    def now() -> dict[str, int]:
        return {
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompile_limit_hits": sum(n for msg, n in counters["unimplemented"].items() if "recompile limit" in msg),
        }

    torch._dynamo.reset()
    before = now()
    yield
    stats.update({key: value - before[key] for key, value in now().items()})


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="tiny model and images: a CPU smoke test")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per mode")
    ap.add_argument("--batch", type=int, default=8, help="samples per step (one GPU, no accumulation)")
    ap.add_argument("--lora_r", type=int, default=16)
    ap.add_argument("--modes", default="full,lora,lora-naive", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--compile", action="store_true", help="torch.compile each layer (the trainer's GPU default)")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--busy_steps", type=int, default=0, help="GPU: profile this many more steps for device busy time")
    ap.add_argument("--host_steps", type=int, default=0, help="print a host profile (cProfile) of this many more steps")
    ap.add_argument("--records", type=int, default=2000, help="synthetic samples to build (--tiny: 64)")
    ap.add_argument("--workdir", default=None, help="where to build the model and data (default: a temp dir)")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := set(modes) - MODES.keys():
        ap.error(f"unknown --modes {sorted(unknown)}: choose from {', '.join(MODES)}")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_lora_"))
    max_pixels = 448 * 448
    model_dir = build_model_dir(work / ("tiny-qwen3-vl" if args.tiny else "qwen3-vl-2b-random"), args.tiny, max_pixels)
    build_dataset(
        work / "data", n=64 if args.tiny else args.records, image_size=64 if args.tiny else 448, mixed_sizes=False
    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": device, "torch": torch.__version__, "tiny": args.tiny}), flush=True)
    base = TrainConfig(
        model_name_or_path=str(model_dir), dataset_use=str(work / "data"), image_root=str(work / "data"),
        output_dir=str(work / "out"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        gradient_checkpointing=args.gc, torch_compile=args.compile, learning_rate=1e-5, max_pixels=max_pixels,
        min_pixels=784, warmup_ratio=0.0, lr_scheduler_type="constant", logging_steps=1, lora_r=args.lora_r,
        dataloader_num_workers=0 if args.tiny else min(8, os.cpu_count() or 1), bf16=torch.cuda.is_available(),
    )  # fmt: skip
    rows = []
    for mode in modes:
        cfg = replace(base, **MODES[mode])
        start, compiled = time.time(), {}
        with fresh_compile(compiled):
            row = run_case(mode, cfg, args.steps, busy_steps=args.busy_steps, host_steps=args.host_steps)
        row |= compiled | exchange(cfg) | {"lora_r": args.lora_r if cfg.peft == "lora" else None}
        row["sent_share_of_2b"] = round(row["sent_bytes"] / FULL_2B_BYTES, 4) if not args.tiny else None
        row["wall_s"] = round(time.time() - start, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
