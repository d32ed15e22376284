"""Benchmark: samples/s of run_inference.py's batched generation on the real Qwen3-VL-2B architecture, by batch size.

The model has the 2B's architecture with random weights (speed does not depend on their values), the processor is
the tiny one from model.py (Qwen's real tokenizer and token ids), the images are synthetic. Each batch goes through
`run_inference.generate_token_ids` and `run_inference.decode_answers`, exactly what `generate_answers` runs.
`min_new_tokens` equals `max_new_tokens`, so every answer has the same length: random weights could otherwise emit
the end-of-turn token (eos, `<|im_end|>`) early and make large batches look faster than they are.
Images are in memory, so disk reads are not timed; the processor's resizing and tokenisation are.

Usage:
  python bench/bench_inference.py                  # one GPU: batch sizes 1, 4, 8, 16; 448x448 images
  python bench/bench_inference.py --tiny           # CPU smoke test with the tiny model
Prints one JSON line per batch size; the acceptance target is batch 16 at >= 5x the samples/s of batch 1.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run_inference as ri  # noqa: E402
from model import build_tiny_processor, config_2b, tiny_config  # noqa: E402
from synthetic_data import COLOURS, SHAPES, draw_image  # noqa: E402

QUESTIONS = [
    "What does this image show?",
    "Describe the main abnormality visible in this scan.",
    "Which imaging modality was used, and what body part is shown?",
    "Is there evidence of a mass or lesion? Explain where it is and how large it appears to be.",
    "What is the most likely diagnosis based on the findings in this image, and what features support it?",
]


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    """The random-weight model in eval mode, with Qwen3-VL-Instruct's generation ids."""
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(
            tiny_config() if tiny else config_2b(), dtype=dtype, attn_implementation="sdpa"
        )
    model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=False)
    return model.eval()


def make_prompts(num: int, image_size: int, seed: int) -> list[tuple[list, str]]:
    """(one synthetic image, a question of varied length) pairs."""
    rng = random.Random(seed)
    colours = list(COLOURS)
    return [
        ([draw_image(rng.choice(colours), rng.choice(SHAPES), image_size, rng)], QUESTIONS[i % len(QUESTIONS)])
        for i in range(num)
    ]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_batch_size(model, processor, prompts, batch_size: int, new_tokens: int, device: str) -> dict:
    """Generate answers for all prompts in batches of `batch_size`; one untimed warm-up batch first."""
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    ri.decode_answers(processor, ri.generate_token_ids(model, processor, prompts[:batch_size], **gen))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    generated = 0
    for batch in ri.batches(prompts, batch_size):
        token_ids = ri.generate_token_ids(model, processor, batch, **gen)
        ri.decode_answers(processor, token_ids)
        if token_ids.shape[1] != new_tokens:
            raise RuntimeError(
                f"generated {token_ids.shape[1]} tokens instead of {new_tokens}: min_new_tokens ignored?"
            )
        generated += token_ids.numel()
    synchronize(device)
    seconds = time.perf_counter() - start
    result = {
        "batch_size": batch_size,
        "samples": len(prompts),
        "new_tokens": new_tokens,
        "seconds": round(seconds, 3),
        "samples_per_s": round(len(prompts) / seconds, 3),
        "new_tokens_per_s": round(generated / seconds, 1),
    }
    if device.startswith("cuda"):
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model, 64x64 images, few tokens: a CPU smoke test")
    parser.add_argument("--batch_sizes", default="1,4,8,16", help="comma-separated")
    parser.add_argument(
        "--num_samples",
        type=int,
        help="prompts timed per batch size; None: twice the largest batch size, once with --tiny",
    )
    parser.add_argument("--new_tokens", type=int, help="tokens generated per answer; None: 64, or 4 with --tiny")
    parser.add_argument("--image_size", type=int, help="square image side in pixels; None: 448, or 64 with --tiny")
    parser.add_argument("--device", default="auto", help="'auto': cuda if available, else cpu")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="'auto': bfloat16 on GPU, float32 on CPU",
    )
    parser.add_argument("--seed", type=int, default=0, help="for the weights, images and questions")
    args = parser.parse_args()
    largest = max(int(b) for b in args.batch_sizes.split(","))
    for name, full, tiny in (("num_samples", 2 * largest, largest), ("new_tokens", 64, 4), ("image_size", 448, 64)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def main() -> None:
    args = parse_args()
    device, dtype = ri.resolve_device_dtype(args.device, args.dtype)
    torch.manual_seed(args.seed)
    model = build_model(args.tiny, device, dtype)
    # Images keep their full size: the 448x448 default is 28x28 patches, 196 visual tokens after the 2x2 merge.
    processor = build_tiny_processor(min_pixels=784, max_pixels=args.image_size**2)
    processor.tokenizer.padding_side = "left"
    prompts = make_prompts(args.num_samples, args.image_size, args.seed)
    common = {
        "model": "tiny" if args.tiny else "qwen3-vl-2b-architecture",
        "params": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "image_size": args.image_size,
    }
    baseline = None
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        result = time_batch_size(model, processor, prompts, batch_size, args.new_tokens, device)
        baseline = baseline or (result["samples_per_s"] if batch_size == 1 else None)
        if baseline:
            result["speedup_vs_batch_1"] = round(result["samples_per_s"] / baseline, 2)
        print(json.dumps({**result, **common}), flush=True)


if __name__ == "__main__":
    main()
