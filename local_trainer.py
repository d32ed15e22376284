"""Local trainer: one FL client's rounds of supervised fine-tuning of Qwen3-VL on its PubMedVision-style shard.

Built on Hugging Face's `Trainer`, so torchrun DDP, gradient accumulation, LR schedules, logging and `report_to` work
as usual. The model is held in fp32 (master weights and optimizer state) and computes in bf16 autocast. A round
returns its *update*: the fp32 weights it ends with minus the bf16 weights it started from, cast to bf16, for the
trained parameters only (Hugging Face keys, no tied `lm_head.weight`). A fine-tuning step moves a weight by far less
than half a bf16 step, so rounding the trained weights to bf16 would undo most of a round; rounding the update keeps
8 significant bits of the change itself.

`--fsdp` shards the model over the site's torchrun ranks with FSDP2 instead of replicating it on each (DDP): it is
loaded sharded once for the whole job (transformers' `from_pretrained(distributed_config=...)`, each decoder layer and
vision block one unit), and every round's `Trainer` takes it as it is (no DDP wrap, no second sharding). Shards stay
fp32 under the same bf16 autocast, so a sharded round computes what an unsharded one does. Loading the global
weights broadcasts rank 0's tensors into the shards; the update and `state_dict()` are gathered to rank 0 one tensor at
a time.

Data rules (see `SFTDataset`):
- The loss covers assistant tokens only: each answer and its `<|im_end|>`, never the `<|im_start|>assistant\\n`
  header (nor an answer's leading newlines, which BPE merges into the header's "\\n") nor the "\\n" after
  `<|im_end|>`. A sample with no labelled token is skipped (`skipped_samples`, and `skipped_no_labels`).
- `<image>` placeholders in human turns mark where images go (one per image; a "\\n" right after one is dropped so
  both formats give the same tokens); records without placeholders get all images at the start of the first turn.
- Image paths must be relative and stay inside `--image_root`; a record with any other path, or whose `<image>`
  placeholders do not match its images, is left out (never opened), named in a warning and counted as skipped.
- Records whose image files are missing are dropped at load; samples whose images cannot be decoded are skipped in
  training (a warning names the record id; the next record takes its place). Both count as `skipped_samples`.
- A sample longer than `--model_max_length` is cut at the tail when every image token and at least one label token
  survive the cut (`truncated_samples`); otherwise it is skipped (`skipped_samples`).

CLI: `python local_trainer.py --model_name_or_path DIR --dataset_use data/site-1 --image_root PubMedVision
--output_dir out --max_steps 100` trains once and saves a Hugging Face checkpoint (also under torchrun).
"""

from __future__ import annotations

import datetime
import functools
import gc
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

import lora
import varlen_attention
from model import (
    DEFAULT_MODEL,
    TIED_LM_HEAD,
    copy_into,
    is_tied,
    load_hf_model,
    materialize,
    tensor_shape,
    untied_state_dict,
)

logger = logging.getLogger("local_trainer")
COLLECTIVE_TIMEOUT_ENV = "FL_COLLECTIVE_TIMEOUT"  # seconds a rank waits in a collective (init_distributed)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class TrainResult:
    """What one round returns: rank 0 gets the update of every trained parameter (bf16, HF keys, no tied lm_head:
    fp32 result minus the bf16 start); other ranks get None. Frozen parameters do not move and are left out."""

    update: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)


RUN_SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")  # what --lr_schedule run implements


@dataclass
class TrainConfig:
    """Trainer flags; names follow Qwen's `train_qwen.py` (and HF `TrainingArguments`) where they exist."""

    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub ID or local HF directory"})
    dataset_use: str = field(
        default="./data/site-1",
        metadata={"help": "folder holding train.json, or a .json file; several comma-separated"},
    )
    image_root: str = field(default="PubMedVision", metadata={"help": "folder that contains images/"})
    output_dir: str = field(default="./output", metadata={"help": "logs and (CLI) the saved checkpoint"})
    tune_mm_llm: bool = field(default=True, metadata={"help": "train the language model and lm_head"})
    tune_mm_mlp: bool = field(default=True, metadata={"help": "train the vision merger and deepstack mergers"})
    tune_mm_vision: bool = field(default=False, metadata={"help": "train the vision tower (except mergers)"})
    max_pixels: int = field(default=50176, metadata={"help": "largest image area after resizing"})
    min_pixels: int = field(default=784, metadata={"help": "smallest image area after resizing"})
    model_max_length: int = field(default=8192, metadata={"help": "longest sample in tokens (see module doc)"})
    learning_rate: float = 5e-7
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps per round; -1: use num_train_epochs"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs per round when max_steps is -1"})
    # Off by default: it recomputes activations, trading speed for memory (BENCHMARKS.md); turn it on when short.
    gradient_checkpointing: bool = False
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast over fp32 master weights"})
    # On by default with a GPU: faster and leaner there (BENCHMARKS.md); on CPUs compiling takes minutes.
    torch_compile: bool = field(
        default=torch.cuda.is_available(),
        metadata={"help": "torch.compile each decoder layer and vision block (default: on with a CUDA GPU)"},
    )
    seed: int = field(default=42, metadata={"help": "global round r shuffles its data with seed + r"})
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    optim: str = field(
        default="adamw_torch",
        metadata={"help": "Hugging Face's optimizer name: adamw_torch, adamw_torch_fused, adafactor, sgd, ... (sgd and "
                          "adafactor keep far less state on the GPU than AdamW's two fp32 moments)"},
    )  # fmt: skip
    max_grad_norm: float = 1.0
    logging_steps: float = 10
    report_to: str = field(default="none", metadata={"help": "none, tensorboard, wandb, mlflow, ..."})
    dataloader_num_workers: int = 0
    padding_free: bool = field(
        default=True,
        metadata={"help": "pack each batch's samples into one row with per-sample (varlen) attention: no padding"},
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "for --padding_free False: sdpa, eager or flash_attention_2"}
    )
    fsdp: bool = field(
        default=False,
        metadata={"help": "shard the model over this site's torchrun ranks with FSDP2 (fully_shard) instead of DDP"},
    )
    lr_schedule: str = field(
        default="run",
        metadata={
            "help": "run: one warmup and decay over all rounds (needs total_rounds); round: a fresh one every round"
        },
    )
    fedprox_mu: float = field(
        default=0.0, metadata={"help": "FedProx: add mu/2 * ||w - w_global||^2 over the trained parameters; 0: off"}
    )
    keep_optimizer_state: bool = field(
        default=False,
        metadata={"help": "carry the optimizer state (AdamW moments, step) across rounds: <output_dir>/optimizer*.pt"},
    )
    peft: str = field(
        default="none",
        metadata={
            "help": "none: full fine-tuning; lora: adapters (lora.py), --tune_mm_llm ignored, mergers per --tune_mm_mlp"
        },
    )
    lora_r: int = field(default=16, metadata={"help": "the global adapter's rank (the largest of the sites')"})
    lora_trained_r: int = field(default=0, metadata={"help": "the rank this site trains, <= --lora_r; 0: --lora_r"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale alpha / r"})
    lora_dropout: float = 0.05
    lora_target_modules: str = field(
        default=lora.DEFAULT_TARGETS,
        metadata={"help": "layer names of the language model (comma list), or a regex over module names"},
    )
    lora_aggregation: str = field(
        default="exact", metadata={"help": "exact: A frozen, B trained (FFA-LoRA); naive: A and B trained"}
    )

    def __post_init__(self) -> None:
        checks = {
            "--learning_rate must be >= 0": self.learning_rate >= 0,
            "--per_device_train_batch_size must be >= 1": self.per_device_train_batch_size >= 1,
            "--gradient_accumulation_steps must be >= 1": self.gradient_accumulation_steps >= 1,
            "--max_steps must be -1 or >= 1": self.max_steps == -1 or self.max_steps >= 1,
            "--num_train_epochs must be > 0": self.num_train_epochs > 0,
            "--model_max_length must be >= 2": self.model_max_length >= 2,
            "--min_pixels must be >= 1 and <= --max_pixels": 1 <= self.min_pixels <= self.max_pixels,
            "--warmup_ratio must be in [0, 1)": 0 <= self.warmup_ratio < 1,
            "--lr_schedule must be run or round": self.lr_schedule in ("run", "round"),
            f"--lr_schedule run supports --lr_scheduler_type {', '.join(RUN_SCHEDULES)} (else --lr_schedule round)": (
                self.lr_schedule != "run" or self.lr_scheduler_type in RUN_SCHEDULES
            ),
            "--fedprox_mu must be >= 0": self.fedprox_mu >= 0,
            "--tune_mm_llm, --tune_mm_mlp and --tune_mm_vision are all False: nothing to train": (
                self.tune_mm_llm or self.tune_mm_mlp or self.tune_mm_vision or self.peft == "lora"
            ),
            "--peft must be none or lora": self.peft in ("none", "lora"),
            "--peft lora does not shard (--fsdp) yet: use DDP": self.peft != "lora" or not self.fsdp,
            "--peft lora with --tune_mm_vision: put adapters on the vision tower with --lora_target_modules instead": (
                self.peft != "lora" or not self.tune_mm_vision
            ),
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ValueError("; ".join(failed))
        if self.peft == "lora":
            self.lora_settings()  # checks the LoRA flags

    def lora_settings(self) -> lora.LoraSettings | None:
        """The LoRA of `--peft lora` (mergers fully trained with --tune_mm_mlp), or None for full fine-tuning."""
        if self.peft != "lora":
            return None
        return lora.LoraSettings(
            r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, target_modules=self.lora_target_modules,
            aggregation=self.lora_aggregation, trained_r=self.lora_trained_r, train_mergers=self.tune_mm_mlp,
        )  # fmt: skip


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse trainer flags (`--help` lists them); bad flags or values exit with status 2."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainConfig, allow_abbrev=False, description=__doc__.splitlines()[0])
    try:
        (config,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        parser.error(str(err))
    return config


# ----------------------------------------------------------------------------------------------------------- data


class SkipSample(Exception):
    """A sample that cannot be trained on (unreadable image, too long); the message names the record."""


class NoLabels(SkipSample):
    """A sample in which no token is labelled: it would train on nothing."""


def read_records(dataset_use: str) -> list[dict]:
    """All records of the comma-separated folders (with train.json) or .json files in `dataset_use`."""
    records = []
    for item in filter(None, (part.strip() for part in dataset_use.split(","))):
        path = Path(item)
        if path.is_dir():
            path = path / "train.json"
        if not path.is_file():
            raise FileNotFoundError(f"--dataset_use: {path} not found (expected a folder with train.json or a .json)")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for index, record in enumerate(data):
            _check_record(record, f"{path} record {index}")
        records.extend(data)
    if not records:
        raise ValueError(f"--dataset_use {dataset_use!r}: no records")
    return records


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise ValueError(f"{where}: not a record with a 'conversations' list")
    name = f"{where} (id {record.get('id')!r})"
    turns = record["conversations"]
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"{name}: each turn needs 'from' in {sorted(ROLES)} and a string 'value'")
    if not any(ROLES[turn["from"]] == "assistant" for turn in turns):
        raise ValueError(f"{name}: no assistant ('gpt') turn to learn from")
    images = record.get("image", [])
    if not isinstance(images, str | list):
        raise ValueError(f"{name}: 'image' must be a path or a list of paths")


def record_images(record: dict) -> list[str]:
    images = record.get("image") or []
    return [images] if isinstance(images, str) else list(images)


def resolve_image(image_root: Path, rel_path: str, record_id: Any) -> Path:
    """`image_root / rel_path`, refusing absolute paths and paths that leave the root (`..`, symlinks)."""
    if not isinstance(rel_path, str) or not rel_path or os.path.isabs(rel_path) or Path(rel_path).drive:
        raise ValueError(f"record {record_id!r}: image path {rel_path!r} must be relative to --image_root")
    root = image_root.resolve()
    path = (root / rel_path).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"record {record_id!r}: image path {rel_path!r} escapes --image_root {image_root}")
    return path


def build_messages(record: dict, num_images: int) -> list[dict]:
    """Chat messages for the processor's template, images placed as `<image>` says (or first in the first turn)."""
    turns = record["conversations"]
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns if ROLES[turn["from"]] == "user")
    if placeholders and placeholders != num_images:
        raise ValueError(f"record {record.get('id')!r}: {placeholders} <image> placeholders for {num_images} images")
    messages = []
    for turn in turns:
        role, text = ROLES[turn["from"]], turn["value"]
        if role != "user":
            messages.append({"role": role, "content": [{"type": "text", "text": text}]})
            continue
        content = []
        if not placeholders and num_images and not any(m["role"] == "user" for m in messages):
            content = [{"type": "image"} for _ in range(num_images)]
        for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i > 0:
                content.append({"type": "image"})
                piece = piece.removeprefix("\n")
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages


def assistant_labels(
    input_ids: torch.Tensor, header_ids: list[int], end_id: int, newline_ids: set[int]
) -> torch.Tensor:
    """Labels equal to `input_ids` from after each assistant header through its `<|im_end|>`, else IGNORE_INDEX.

    The header is `header_ids` (`<|im_start|>assistant`) and the token after it, which must be one of `newline_ids`:
    the header's "\\n", or, when the answer starts with newlines, the one token BPE merges them into ("\\n\\n"...).
    A merged token is left unlabelled with the header: it cannot be split, and it holds only whitespace.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    ids = input_ids.tolist()
    n, h = len(ids), len(header_ids)
    i = 0
    while i < n - h:
        if ids[i : i + h] != header_ids or ids[i + h] not in newline_ids:
            i += 1
            continue
        start = end = i + h + 1
        while end < n and ids[end] != end_id:
            end += 1
        labels[start : end + 1] = input_ids[start : end + 1]
        i = end + 1
    return labels


def newline_token_ids(tokenizer) -> set[int]:
    """Ids of the tokens that are a newline, maybe merged with more whitespace ("\\n", "\\n\\n", "\\n \\n")."""
    candidates = [i for token, i in tokenizer.get_vocab().items() if "\u010a" in token or "\n" in token]  # Ċ: "\\n"
    texts = tokenizer.batch_decode([[i] for i in candidates])
    return {i for i, text in zip(candidates, texts, strict=True) if text.startswith("\n") and not text.strip()}


class SFTDataset(Dataset):
    """Records → model inputs; `__getitem__` decodes images and runs the processor, so DataLoader workers can help."""

    def __init__(self, records: list[dict], image_root: str | os.PathLike, processor, model_max_length: int) -> None:
        self.image_root = Path(image_root)
        self.processor = processor
        self.model_max_length = model_max_length
        tokenizer = processor.tokenizer
        self.header_ids = [tokenizer.convert_tokens_to_ids("<|im_start|>")] + tokenizer.encode(
            "assistant", add_special_tokens=False
        )
        self.newline_ids = newline_token_ids(tokenizer)
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.vision_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>")}
        self.records, self.image_paths, missing, unusable = [], [], [], []
        for record in records:
            try:  # a path outside the image root, or <image> placeholders that do not match: this record is left out
                paths = [resolve_image(self.image_root, p, record.get("id")) for p in record_images(record)]
                build_messages(record, len(paths))
            except ValueError as err:
                unusable.append(str(err))
                continue
            if all(p.is_file() for p in paths):
                self.records.append(record)
                self.image_paths.append(paths)
            else:
                missing.append(record.get("id"))
        self.num_missing = len(missing) + len(unusable)  # counted with the round's skipped samples
        if missing:
            logger.warning("dropped %d records with missing image files (ids %s)", len(missing), _preview(missing))
        if unusable:
            logger.warning("dropped %d records that cannot be used: %s", len(unusable), _preview(unusable, 5))
        if not self.records:
            why = unusable[0] if unusable else f"all lack image files under {self.image_root}"
            raise RuntimeError(f"no usable records among {len(records)}: {why}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample at `index`, or the next usable one; `skipped` counts the unusable ones passed over,
        `skipped_no_labels` those of them with no labelled token."""
        no_labels = 0
        for offset in range(len(self.records)):
            try:
                sample = self.encode((index + offset) % len(self.records))
            except SkipSample as err:
                logger.warning("skipping sample: %s", err)
                no_labels += isinstance(err, NoLabels)
                continue
            sample["skipped"], sample["skipped_no_labels"] = offset, no_labels
            return sample
        raise RuntimeError(f"no usable sample among {len(self.records)} records (see the warnings above)")

    def encode(self, index: int) -> dict[str, Any]:
        record, paths = self.records[index], self.image_paths[index]
        record_id = record.get("id", f"#{index}")
        images = [_load_image(path, record_id) for path in paths]
        text = self.processor.apply_chat_template(build_messages(record, len(images)), tokenize=False)
        encoded = self.processor(text=[text], images=images or None, return_tensors="pt")
        sample = {key: value[0] for key, value in encoded.items() if key in ("input_ids", "mm_token_type_ids")}
        if images:
            sample["pixel_values"], sample["image_grid_thw"] = encoded["pixel_values"], encoded["image_grid_thw"]
        sample["labels"] = assistant_labels(sample["input_ids"], self.header_ids, self.end_id, self.newline_ids)
        if (sample["labels"] == IGNORE_INDEX).all():
            raise NoLabels(f"record {record_id!r}: no answer token to learn from (no assistant header found)")
        sample["truncated"] = len(sample["input_ids"]) > self.model_max_length
        if sample["truncated"]:
            self._truncate(sample, record_id)
        return sample

    def _truncate(self, sample: dict[str, Any], record_id: Any) -> None:
        """Cut the text tail to `model_max_length`; skip if an image token or every label token would be cut."""
        keep, ids = self.model_max_length, sample["input_ids"]
        is_vision = torch.isin(ids, torch.tensor(sorted(self.vision_ids)))
        if "mm_token_type_ids" in sample:
            is_vision |= sample["mm_token_type_ids"] != 0
        if is_vision[keep:].any():
            raise SkipSample(f"record {record_id!r}: {len(ids)} tokens > --model_max_length {keep} within its images")
        if not (sample["labels"][:keep] != IGNORE_INDEX).any():
            raise SkipSample(f"record {record_id!r}: {len(ids)} tokens > --model_max_length {keep} before any answer")
        for key in ("input_ids", "mm_token_type_ids", "labels"):
            if key in sample:
                sample[key] = sample[key][:keep]


def _load_image(path: Path, record_id: Any):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise SkipSample(f"record {record_id!r}: cannot read image {path}: {err}") from err


def _preview(items: list, n: int = 10) -> str:
    return ", ".join(map(repr, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")


SAMPLE_COUNTS = ("skipped", "truncated", "skipped_no_labels")  # per sample; summed by the collator after the size


class SFTCollator:
    """Right-pads a list of samples to the batch's longest and stacks the images; carries sample counts along."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.text(samples)
        with_images = [s for s in samples if "pixel_values" in s]
        if with_images:
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
            batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_images])
        batch["sample_counts"] = torch.tensor(
            [len(samples), *(sum(s.get(key, 0) for s in samples) for key in SAMPLE_COUNTS)]
        )
        return batch

    def text(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        pad = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
        batch = {
            key: torch.nn.utils.rnn.pad_sequence([s[key] for s in samples], batch_first=True, padding_value=value)
            for key, value in pad.items()
            if key in samples[0]
        }
        lengths = torch.tensor([len(s["input_ids"]) for s in samples])
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]).long()
        return batch


class PackedCollator(SFTCollator):
    """Puts the samples end to end in one row, without padding, for `varlen_attention` (see varlen_attention.py).

    Each sample keeps its own positions: Qwen3-VL's M-RoPE, computed here per sample by transformers' own
    `get_rope_index` (in DataLoader workers, not on the GPU's critical path), under a row of plain text positions
    that restart at 0. `packed_cu_seqlens` marks where samples start. No logit crosses a boundary: a sample's first
    token is `<|im_start|>`, which is never a label.
    """

    def __init__(self, model_config) -> None:
        self.rope = _RopeIndex(model_config)

    def text(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(s["input_ids"]) for s in samples]
        batch = {key: torch.cat([s[key] for s in samples])[None] for key in ("input_ids", "labels", "mm_token_type_ids")
                 if key in samples[0]}  # fmt: skip
        text = torch.cat([torch.arange(n) for n in lengths])
        mrope = torch.cat([self._mrope(s) for s in samples], dim=1)
        batch["position_ids"] = torch.cat([text[None], mrope])[:, None]  # (4, 1, tokens): text, then M-RoPE t, h, w
        batch["packed_cu_seqlens"] = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        batch["packed_max_seqlen"] = max(lengths)
        return batch

    def _mrope(self, sample: dict[str, Any]) -> torch.Tensor:
        ids, grid = sample["input_ids"], sample.get("image_grid_thw")
        if "mm_token_type_ids" not in sample:
            return torch.arange(len(ids)).expand(3, -1)
        return self.rope(ids[None], sample["mm_token_type_ids"][None], grid)[:, 0]


class _RopeIndex:
    """transformers' Qwen3-VL M-RoPE positions (`Qwen3VLModel.get_rope_index`) without a model: it needs the config."""

    def __init__(self, config) -> None:
        self.config = config

    def __call__(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, grid: torch.Tensor | None):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        return Qwen3VLModel.get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=grid)[0]

    def get_vision_position_ids(self, *args, **kwargs) -> torch.Tensor:  # get_rope_index calls it on self
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        return Qwen3VLModel.get_vision_position_ids(self, *args, **kwargs)


# -------------------------------------------------------------------------------------------------------- trainer


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool (batch, seq) mask of the positions whose next token is labelled: the only logits the loss needs."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def answer_only_loss(outputs, labels: torch.Tensor, num_items_in_batch=None, cross_entropy=None) -> torch.Tensor:
    """Next-token cross-entropy over logits computed at `answer_positions` only (see RoundTrainer.compute_loss).

    Projecting only the labelled positions onto the 151,936-token vocabulary skips the lm_head matmul and the fp32
    logits for image and question tokens: about half the logits memory on PubMedVision-shaped samples.
    `cross_entropy`: a compiled `summed_cross_entropy` (see `compiled_cross_entropy`), or None for the eager one.
    """
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    loss = (cross_entropy or summed_cross_entropy)(outputs.logits, targets)
    return loss / (num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1))


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of bf16 (or fp32) logits, computed in fp32."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


@functools.cache
def compiled_cross_entropy():
    """`summed_cross_entropy` compiled: fused kernels without fp32 copies of the logits.

    On an H100, 6,000 answer tokens' bf16 logits: 1.7 GiB beyond the logits instead of 10.2, 4.0 ms instead of 15.6.
    """
    return torch.compile(summed_cross_entropy, dynamic=True)


def run_lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """The learning rate of optimizer step `step` (from 0) of a run of `total` steps, as a fraction of the peak.

    Linear warmup over the first `warmup` steps, from 1/(warmup + 1) of the peak (no step at lr 0), then `kind`'s decay
    (cosine, linear; constant and constant_with_warmup stay at the peak) towards 0 just after the last step.
    """
    if kind == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP shard (DTensor), or `tensor` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def save_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, path: Path) -> None:
    """This rank's optimizer state (under FSDP: of its shards), by parameter name, written atomically to `path`."""
    names = {id(param): name for name, param in model.named_parameters()}
    state = {names[id(p)]: {k: _local(v) for k, v in st.items()} for p, st in optimizer.state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)  # a crash mid-write leaves the previous round's state whole


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, path: Path) -> bool:
    """Put the state `save_optimizer_state` wrote into a fresh `optimizer`; False (and a warning) if it does not fit
    its parameters (other trained parameters, shapes or number of ranks), which then start fresh."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = {name: p for name, p in model.named_parameters() if id(p) in in_optimizer}
    misfit = sorted(params.keys() ^ saved.keys()) or [
        name
        for name, st in saved.items()
        if any(v.dim() and v.shape != _local(params[name]).shape for v in st.values())
    ]
    if misfit:
        logger.warning("%s does not fit the trained parameters (%s): a fresh optimizer", path, _preview(misfit, 3))
        return False
    for name, state in saved.items():
        param = params[name]
        optimizer.state[param] = {key: _like(value, param) for key, value in state.items()}
    return True


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved optimizer tensor where a fresh one would be: moments with `param` (as a shard of it under FSDP), the
    step count (a scalar) on the host, as AdamW keeps it."""
    from torch.distributed.tensor import DTensor

    if not value.dim():
        return value
    value = value.to(param.device)
    if isinstance(param, DTensor):
        return DTensor.from_local(value, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
    return value


def _make_round_trainer_class():
    """A `Trainer` that takes the collator's sample counts out of each batch and computes logits only where needed;
    set up by `LocalTrainer.train_round` with its run's schedule, FedProx term and kept optimizer state."""
    from transformers import Trainer

    class RoundTrainer(Trainer):
        sample_counts: torch.Tensor | None = None
        autocast_bf16: bool = True
        run_schedule: tuple[int, int] | None = None  # (round, rounds in the run): one schedule over the run
        lr_scheduler_kind: str = "cosine"
        proximal_mu: float = 0.0
        global_weights: tuple = ()  # (parameter, its value as the round started) for each trained parameter
        optimizer_file: Path | None = None  # the optimizer state to start from, if the file exists
        step_lrs: list[float]  # the learning rate of each optimizer step
        flops_per_token: int | None = None  # Hugging Face's count (6 x non-embedding parameters), once per round

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            if self.optimizer_file is not None and self.optimizer_file.is_file():
                if load_optimizer_state(optimizer, self.model, self.optimizer_file):
                    logger.info("optimizer state loaded from %s", self.optimizer_file)
            return optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None and self.run_schedule is not None:
                round_num, rounds = self.run_schedule  # every round takes num_training_steps steps
                total, offset = rounds * num_training_steps, round_num * num_training_steps
                factor = functools.partial(
                    run_lr_factor, kind=self.lr_scheduler_kind, warmup=self.args.get_warmup_steps(total), total=total
                )
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda step: factor(offset + step)
                )
                self._created_lr_scheduler = True
            return super().create_scheduler(num_training_steps, optimizer)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.accelerator.sync_gradients:  # the optimizer step's last micro-batch: its gradients are whole
                self.step_lrs.append(self.optimizer.param_groups[0]["lr"])
                if self.proximal_mu:
                    self._add_proximal_gradient()
            return loss

        @torch.no_grad()
        def _add_proximal_gradient(self) -> None:
            """FedProx: the gradient of mu/2 * ||w - w_global||^2, mu * (w - w_global), added once per optimizer step
            to the step's (reduced, accumulated) gradient, before clipping. Under FSDP each rank adds its shard's."""
            for param, start in self.global_weights:
                pull = torch.sub(param.detach(), start).mul_(self.proximal_mu)
                if param.grad is None:
                    param.grad = pull
                else:
                    param.grad.add_(pull)

        def floating_point_ops(self, inputs: dict[str, Any]) -> int:
            # Hugging Face's own count walks every module and parameter each step (2,655 modules with LoRA's
            # adapters on 2B: 6-12 ms a step on the development machine): the number cannot change within a round.
            if "input_ids" not in inputs:
                return 0
            if self.flops_per_token is None:
                self.flops_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
            return self.flops_per_token * inputs["input_ids"].numel()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counts = inputs.pop("sample_counts")
            self.sample_counts = counts if self.sample_counts is None else self.sample_counts + counts
            inputs["logits_to_keep"] = answer_positions(inputs["labels"])
            # Our own autocast around the forward: accelerate's (bf16=True) patches model.forward once per prepare,
            # which repeated rounds on one model cannot rely on (a later round silently ran its matmuls in fp32).
            device_type = inputs["input_ids"].device.type
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return RoundTrainer


def set_trainable(model: torch.nn.Module, config: TrainConfig) -> None:
    """Freeze/unfreeze as train_qwen's set_model: vision tower, its mergers (the "mlp"), the LLM with lm_head."""
    visual = model.model.visual
    mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", [])]
    visual.requires_grad_(config.tune_mm_vision)
    for merger in mergers:
        merger.requires_grad_(config.tune_mm_mlp)
    model.model.language_model.requires_grad_(config.tune_mm_llm)
    model.lm_head.requires_grad_(config.tune_mm_llm)


# FSDP units: each decoder layer and vision block (one all-gather each). The rest (the embedding with its tied lm_head,
# patch embedding, mergers) is the root unit's; transformers' default plan adds the text model's final norm as one.
FSDP_PLAN = {"model.language_model.layers.*": "free_full_weight", "model.visual.blocks.*": "free_full_weight"}


def _reshard(model: torch.nn.Module) -> None:
    """Put every FSDP unit back to its shards (a forward without backward leaves the root unit gathered)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (an all-gather: every rank must call it), or `value` itself."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_distributed() -> torch.device:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) and pick this rank's device.

    A collective that waits longer than $FL_COLLECTIVE_TIMEOUT seconds (job.py --collective_timeout, default 1800)
    raises on the ranks that wait, so a rank that hangs or died fails its site's round instead of hanging the others.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(COLLECTIVE_TIMEOUT_ENV, 1800)))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


class LocalTrainer:
    """Holds the fp32 model, processor and dataset for a whole FL job; `train_round` runs one round on each rank."""

    def __init__(self, config: TrainConfig, callbacks: list | None = None) -> None:
        from transformers import AutoProcessor

        self.config = config
        self.callbacks = callbacks or []  # extra transformers TrainerCallbacks for every round
        self.device = init_distributed()
        self.rank = _rank()
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.round = 0
        self._warned_schedule = False
        records = read_records(config.dataset_use)  # first, so a bad --dataset_use fails before the model loads
        size = {"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels}
        self.processor = AutoProcessor.from_pretrained(config.model_name_or_path, size=size)
        self.processor.tokenizer.padding_side = "right"
        self.dataset = SFTDataset(records, config.image_root, self.processor, config.model_max_length)
        self.fsdp = config.fsdp and self.world_size > 1
        if config.fsdp and not self.fsdp:
            logger.info("--fsdp with a single process: nothing to shard, training unsharded")
        sharding = {}
        if self.fsdp:
            # Sharded at load, once for the whole job. The Trainer sees a model sharded by transformers and neither
            # wraps it in DDP nor shards it again, on GPUs and CPUs alike. (TrainingArguments(fsdp=True) goes through
            # accelerate, which drops its FSDP plugin on CPU and wraps the shards in DDP: "mixed torch.Tensor and
            # DTensor" at the first round.)
            from transformers.distributed import DistributedConfig

            sharding["distributed_config"] = DistributedConfig(fsdp_size=self.world_size, fsdp_plan=FSDP_PLAN)
        else:
            sharding["device_map"] = self.device  # straight onto the GPU: no 8.5 GB fp32 copy in host memory
        attention = varlen_attention.register() if config.padding_free else config.attn_implementation
        self.model = load_hf_model(
            config.model_name_or_path, dtype=torch.float32, attn_implementation=attention, **sharding
        )
        self.model.config.use_cache = self.model.config.text_config.use_cache = False
        self.lora = config.lora_settings()
        if self.lora:  # before compiling: the adapters are part of each compiled layer
            lora.add_adapters(self.model, self.lora)
            sizes = {key: p.numel() for key, p in self._exchanged().items() if lora.trained(key, self.lora)}
            logger.info("LoRA rank %d (this site trains %d), %s: %d tensors, %d parameters trained and sent (%.1f MB "
                        "fp32)", self.lora.r, self.lora.rank, self.lora.aggregation, len(sizes), sum(sizes.values()),
                        4e-6 * sum(sizes.values()))  # fmt: skip
        if config.padding_free:
            varlen_attention.use_in_vision_tower(self.model)
        if config.torch_compile:  # per block: small graphs, compiled once for the whole job, dynamic sequence length
            for block in [*self.model.model.language_model.layers, *self.model.model.visual.blocks]:
                block.compile(dynamic=True)
        self._cross_entropy = compiled_cross_entropy() if config.torch_compile else None
        if config.padding_free:
            self.collator = PackedCollator(self.model.config)
        else:
            self.collator = SFTCollator(self.processor.tokenizer.pad_token_id)

    @property
    def keeps_unchanged(self) -> bool:
        """Whether a global state may leave out tensors this trainer keeps as they are (`load_global_state`'s
        `unchanged`): the model lives from round to round, except under FSDP, which loads whole states only."""
        return not self.fsdp

    def load_global_state(self, global_state: dict[str, torch.Tensor] | None, unchanged: Collection[str] = ()) -> None:
        """Copy rank 0's `global_state` into the fp32 model in place, then broadcast every tensor to the other ranks.

        Values may be NVFlare's lazy references to tensors offloaded to disk: each is read when copied, so the host
        never holds the whole state. Under FSDP rank 0's tensors are broadcast and each rank keeps its shard; `None`
        keeps the loaded weights. `unchanged`: tensors the state leaves out, which keep the values they have (what
        the caller knows this trainer last received for them; not under FSDP).
        """
        params = self._exchanged()  # under FSDP: shards (DTensors) with the full shapes
        problem = self._misfit(global_state, params, unchanged) if self.rank == 0 and global_state is not None else ""
        if unchanged and not self.keeps_unchanged:
            problem = "a sharded (--fsdp) trainer loads whole global states only"
        given = global_state is not None
        if self.world_size > 1:  # every rank learns of a bad state, so none is left waiting in a broadcast
            box = [(problem, given)]
            dist.broadcast_object_list(box, src=0)
            problem, given = box[0]
        if problem:
            raise ValueError(f"global state does not fit {self.config.model_name_or_path}: {problem}")
        if self.fsdp:
            if given:
                self._load_sharded(global_state)
            return  # None: every rank loaded the same weights when the model was built
        with torch.no_grad():
            if self.rank == 0 and global_state is not None:
                for key, tensor in params.items():
                    if key in global_state:  # _misfit has checked that any other is `unchanged`
                        copy_into(tensor, global_state[key])  # on the GPU before the cast; parts one by one
            if self.world_size > 1:
                for tensor in params.values():
                    dist.broadcast(tensor, src=0)

    def _load_sharded(self, global_state: dict[str, torch.Tensor] | None) -> None:
        """Broadcast rank 0's full bf16 `global_state` tensor by tensor; each rank copies its shard into fp32."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        _reshard(self.model)
        state = {}
        if self.rank == 0:
            tied = is_tied(self.model)
            state = {k: materialize(v) for k, v in global_state.items() if k != TIED_LM_HEAD or not tied}
        # strict=False: _misfit has checked the keys, and a tied lm_head loads through the embedding it shares
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(self.model, state, options=options)

    def _exchanged(self) -> dict[str, torch.Tensor]:
        """What the server and this site exchange, by key: the whole model (HF keys, no tied lm_head copy), or with
        LoRA the global adapter's tensors (PEFT keys: A, B, and the mergers when trained), fp32."""
        return lora.exchanged_parameters(self.model, self.lora) if self.lora else untied_state_dict(self.model)

    @staticmethod
    def _misfit(
        state: dict[str, torch.Tensor], params: dict[str, torch.Tensor], unchanged: Collection[str] = ()
    ) -> str:
        """What keeps `state`, with the `unchanged` tensors left out, from loading into `params` (the tied lm_head may
        be present or not); "" if nothing."""
        keys = state.keys() - ({TIED_LM_HEAD} - params.keys())
        missing, unexpected = sorted(params.keys() - keys - set(unchanged)), sorted(keys - params.keys())
        common = sorted(keys & params.keys())
        shapes = [
            f"{k} {tensor_shape(state[k])} != {tuple(params[k].shape)}"
            for k in common
            if tensor_shape(state[k]) != tuple(params[k].shape)
        ]
        problems = [
            f"missing {_preview(missing, 3)}" if missing else "",
            f"unexpected {_preview(unexpected, 3)}" if unexpected else "",
            f"wrong shapes {_preview(shapes, 3)}" if shapes else "",
        ]
        return "; ".join(filter(None, problems))

    def train_round(
        self,
        global_state: dict[str, torch.Tensor] | None = None,
        release_global_state: bool = False,
        round_num: int | None = None,
        total_rounds: int | None = None,
        evaluate_on: str | None = None,
        generate_samples: int = 0,
        max_new_tokens: int = 256,
        unchanged: Collection[str] = (),
    ) -> TrainResult:
        """Load the global weights, train one round, return the round's update.

        `round_num`: the federation's round (the server sends it), which seeds the data order, so a rebuilt trainer or
        a resumed job does not replay an earlier round's order, and places the round in the run's learning-rate
        schedule; default: the rounds this trainer has run. `total_rounds`: the run's rounds, for `--lr_schedule run`
        (without it each round has its own schedule). `release_global_state`: empty the `global_state` dict once it
        is loaded, so its host copy (4.26 GB for 2B) is freed before training instead of after (client.py does; the
        caller must not need it afterwards). `evaluate_on`: a records file to `evaluate` the received weights on
        before training (`val_*` metrics), with the generation metrics on `generate_samples` of its records.
        `unchanged`: tensors `global_state` leaves out, which keep their values (`load_global_state`).
        """
        start = time.perf_counter()
        round_num = self.round if round_num is None else round_num
        self._receive(global_state, release_global_state, unchanged)
        validation = self.evaluate(evaluate_on, None, generate_samples, max_new_tokens) if evaluate_on else {}
        if self.lora:
            lora.set_trainable(self.model, self.lora)
        else:
            set_trainable(self.model, self.config)  # under FSDP the 1st round's choice stays: FSDP2 fixes it at 1st use
        started_from = self._lora_start() if self.lora else self._trained_weights_bf16()
        trainer = self._round_trainer(round_num, total_rounds)
        try:
            output = trainer.train()
            counts = trainer.sample_counts
            local = (counts if counts is not None else torch.zeros(1 + len(SAMPLE_COUNTS), dtype=torch.long)).tolist()
            if self.config.keep_optimizer_state and (self.fsdp or self.rank == 0):
                optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
                save_optimizer_state(optimizer, self.model, self._optimizer_file())
            step_lrs = trainer.step_lrs
        finally:
            self._release(trainer)
        logger.info("rank %d trained on %d samples (round %d)", self.rank, local[0], round_num)
        if self.rank == 0:
            logger.info("round %d learning rate per step: %s", round_num, json.dumps(step_lrs))
        totals = torch.tensor([output.training_loss, *local], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(totals)
            totals[0] /= self.world_size
        self.round = round_num + 1
        metrics = {
            "loss": float(totals[0]),
            "steps": float(output.global_step),
            "samples": float(totals[1]),
            "skipped_samples": float(totals[2]) + self.dataset.num_missing,
            "truncated_samples": float(totals[3]),
            "skipped_no_labels": float(totals[4]),
            "lr_first": step_lrs[0] if step_lrs else 0.0,
            "lr_last": step_lrs[-1] if step_lrs else 0.0,
            **validation,
            "seconds": time.perf_counter() - start,
        }
        update = self._lora_update(started_from) if self.lora else self._update_since(started_from)
        return TrainResult(update=update, metrics=metrics)

    def _receive(self, global_state: dict[str, torch.Tensor] | None, release: bool, unchanged: Collection[str]) -> None:
        """Load the global weights; with `release`, empty the dict once they are in (its host copy is freed)."""
        self.load_global_state(global_state, unchanged)
        if release and global_state is not None:
            global_state.clear()

    def evaluate_received(
        self,
        global_state: dict[str, torch.Tensor] | None,
        evaluate_on: str,
        generate_samples: int = 0,
        max_new_tokens: int = 256,
        release_global_state: bool = False,
        unchanged: Collection[str] = (),
    ) -> TrainResult:
        """Load the global weights and `evaluate` them on `evaluate_on`, training nothing (job.py --eval_only): a
        result without an update, whose metrics are the `val_*` scores."""
        start = time.perf_counter()
        self._receive(global_state, release_global_state, unchanged)
        metrics = self.evaluate(evaluate_on, None, generate_samples, max_new_tokens)
        return TrainResult(update=None, metrics={**metrics, "samples": 0.0, "seconds": time.perf_counter() - start})

    def _round_trainer(self, round_num: int, total_rounds: int | None):
        """The round's Hugging Face Trainer, with the run's schedule, FedProx term and kept optimizer state."""
        c = self.config
        trainer = _make_round_trainer_class()(
            model=self.model,
            args=self._training_arguments(round_num),
            train_dataset=self.dataset,
            data_collator=self.collator,
            callbacks=self.callbacks,
            compute_loss_func=functools.partial(answer_only_loss, cross_entropy=self._cross_entropy),
        )
        trainer.autocast_bf16 = c.bf16
        trainer.step_lrs = []
        if c.lr_schedule == "run" and total_rounds is not None and 0 <= round_num < total_rounds:
            trainer.run_schedule, trainer.lr_scheduler_kind = (round_num, total_rounds), c.lr_scheduler_type
        elif c.lr_schedule == "run" and not self._warned_schedule:
            self._warned_schedule = True
            logger.warning(
                "--lr_schedule run needs the run's number of rounds (round %d of %s): each round has its own schedule",
                round_num,
                total_rounds,
            )
        if c.keep_optimizer_state:
            trainer.optimizer_file = self._optimizer_file()
        if c.fedprox_mu:  # w_global: the round's start, where and as the parameters are (fp32; under FSDP, shards)
            trainer.proximal_mu = c.fedprox_mu
            trainer.global_weights = tuple((p, p.detach().clone()) for p in self.model.parameters() if p.requires_grad)
        return trainer

    def _optimizer_file(self) -> Path:
        """Where `--keep_optimizer_state` keeps the optimizer state: one file, or one per rank's shards under FSDP."""
        return Path(self.config.output_dir) / (f"optimizer.rank{self.rank}.pt" if self.fsdp else "optimizer.pt")

    def validation_file(self) -> str | None:
        """`val.json` beside the training data (`--dataset_use` a single site folder, prepare_data.py's), if any."""
        folder = Path(self.config.dataset_use.strip())
        single = "," not in self.config.dataset_use
        return str(folder / "val.json") if single and (folder / "val.json").is_file() else None

    def evaluate(
        self, records_path: str, max_samples: int | None = None, generate_samples: int = 0, max_new_tokens: int = 256
    ) -> dict[str, float]:
        """Mean answer-token loss of the current weights on the records of `records_path` (a .json list, or a folder
        with train.json; images under --image_root): the training loss, summed over the answer tokens of all records
        and divided by their number. No gradients; under torchrun each rank scores every world_size-th record and the
        sums are all-reduced (collective: call it on every rank). Records that cannot be used are left out.

        Returns `val_loss`, `val_samples` (records scored) and `val_tokens` (answer tokens scored). With
        `generate_samples`, also run_inference.py's generation metrics of greedy answers (at most `max_new_tokens`) to
        the first `generate_samples` records: `val_exact_match`, `val_token_f1`, `val_closed_acc` (NaN without closed
        questions) and `val_generated` (answers scored). Rank 0 generates; under FSDP every rank does, in step.
        `val_seconds`: the time it took.
        """
        c, start = self.config, time.perf_counter()
        records = read_records(records_path)[:max_samples]
        dataset = SFTDataset(records, c.image_root, self.processor, c.model_max_length)
        mine = range(self.rank, len(dataset), self.world_size)
        batch_size = c.per_device_train_batch_size
        batches = math.ceil(math.ceil(len(dataset) / self.world_size) / batch_size)  # the same on every rank
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, tokens, samples
        training = self.model.training
        self.model.eval()
        try:
            for b in range(batches):
                samples = []
                for index in mine[b * batch_size : (b + 1) * batch_size]:
                    try:
                        samples.append(dataset.encode(index))
                    except SkipSample as err:
                        logger.warning("not evaluated: %s", err)
                if samples:
                    loss, tokens = self._summed_answer_loss(samples)
                    totals += torch.tensor([loss, tokens, len(samples)], dtype=torch.float64, device=self.device)
                elif self.fsdp:  # every rank takes part in each sharded forward: one on a training sample, not counted
                    self._summed_answer_loss([self.dataset[0]])
        finally:
            self.model.train(training)
            if self.fsdp:
                _reshard(self.model)
        if self.world_size > 1:
            dist.all_reduce(totals)
        loss, tokens, samples = totals.tolist()
        metrics = {"val_loss": loss / tokens if tokens else float("nan"), "val_samples": samples, "val_tokens": tokens}
        if generate_samples > 0:
            metrics |= self._generation_metrics(records[:generate_samples], max_new_tokens)
        return metrics | {"val_seconds": time.perf_counter() - start}

    @torch.no_grad()
    def _generation_metrics(self, records: list[dict], max_new_tokens: int) -> dict[str, float]:
        """run_inference.py's metrics of the current weights' greedy answers to `records`, as `val_*`. Every rank
        calls it; rank 0 alone generates, except under FSDP, where every rank does, in step."""
        from run_inference import score_records

        c = self.config
        if self.rank != 0 and not self.fsdp:
            return {}
        synced = {}
        if self.fsdp:  # generation runs parts of the root unit (the vision patch embedding) outside its forward
            self.model.unshard()
            synced = {"synced_gpus": True}  # every rank steps (the other units gather per forward) until all are done
        try:
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16)
            # eager: each decoding step's KV cache would recompile the compiled blocks (H100: 61 s for 16 answers)
            eager = torch.compiler.set_stance("force_eager")
            with autocast, eager, varlen_attention.standard_attention(self.model):
                scores = score_records(
                    self.model, self.processor, records, c.image_root, batch_size=min(len(records), 16),
                    max_new_tokens=max_new_tokens, **synced,
                )  # fmt: skip  # generation needs far less memory per sample than training: batches of 16
        finally:
            if self.fsdp:
                _reshard(self.model)
        return {
            "val_exact_match": scores["exact_match"], "val_token_f1": scores["token_f1"],
            "val_closed_acc": scores["closed_acc"], "val_generated": float(scores["num_samples"]),
        }  # fmt: skip

    @torch.no_grad()
    def _summed_answer_loss(self, samples: list[dict[str, Any]]) -> tuple[float, int]:
        """The summed cross-entropy of the samples' answer tokens (as in training) and their number."""
        batch = self.collator(samples)
        batch.pop("sample_counts")
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            outputs = self.model(**batch, logits_to_keep=answer_positions(labels))
        targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        return float((self._cross_entropy or summed_cross_entropy)(outputs.logits, targets)), targets.numel()

    def _trained_weights_bf16(self) -> dict[str, torch.Tensor]:
        """A bf16 copy of every trainable parameter as the round starts, where it lives (under FSDP: this rank's
        shard). The model was loaded from bf16 weights, so the copy is exact: it is what the round started from."""
        with torch.no_grad():
            return {
                key: param.detach().to(torch.bfloat16, copy=True)
                for key, param in self.model.named_parameters()
                if param.requires_grad
            }

    def _update_since(self, started_from: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """fp32 weights now minus `started_from`, rounded to bf16 in `started_from`'s own tensors (no new memory), on
        rank 0 (`_gathered`: under FSDP collective, one tensor at a time)."""
        params = dict(self.model.named_parameters())
        rounded = ((key, start.copy_(params[key].detach() - start)) for key, start in started_from.items())
        with torch.no_grad():  # copy_ rounds the fp32 difference once, to nearest; made one by one as gathered
            return self._gathered(rounded)

    def _lora_start(self) -> dict[str, torch.Tensor]:
        """An fp32 copy of the adapter's trained tensors as the round starts (the received global adapter)."""
        return {k: p.detach().clone() for k, p in self._exchanged().items() if p.requires_grad}

    @torch.no_grad()
    def _lora_update(self, started_from: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter's trained tensors now minus `started_from`, fp32 (small: no rounding), zero beyond this site's
        rank (`lora.rank_mask`)."""
        params, update = self._exchanged(), {}
        for key, start in started_from.items():
            delta = start.neg_().add_(params[key])
            mask = lora.rank_mask(key, delta.shape, self.lora)
            update[key] = delta if mask is None else delta.mul_(mask.to(delta.device))
        return update

    def _release(self, trainer) -> None:
        """Free the round's optimizer state and undo the round's activation checkpointing, so rounds do not pile up."""
        trainer.accelerator.free_memory()
        trainer.optimizer = trainer.lr_scheduler = None
        trainer.global_weights = ()
        if self.model.is_activation_checkpointing:
            self.model.activation_checkpointing_disable()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The current weights as bf16 tensors with HF keys, without the tied lm_head copy.

        Unsharded, the tensors stay on the model's device: NVFlare and safetensors copy each to the host as they
        send or write it, so the host never holds the whole 4.26 GB (2B) result. Under FSDP this is collective (call
        it on every rank): rank 0 gets the weights (CPU), the other ranks None (`_gathered`). With LoRA: the global
        adapter's tensors (PEFT keys), fp32.
        """
        if self.lora:
            return {key: p.detach().clone() for key, p in self._exchanged().items()}
        with torch.no_grad():
            params = untied_state_dict(self.model).items()
            return self._gathered((key, value.detach().to(torch.bfloat16, copy=True)) for key, value in params)

    def _gathered(self, tensors) -> dict[str, torch.Tensor] | None:
        """(key, tensor) pairs, each made and gathered whole in turn (under FSDP an all-gather: every rank calls it),
        as a dict on rank 0 (on the host under FSDP; unsharded on the model's device); None on the other ranks."""
        if self.fsdp:
            _reshard(self.model)
        keep = self.rank == 0 or not self.fsdp
        out = {}
        for key, value in tensors:
            value = _full_tensor(value)
            if keep:
                out[key] = value.to("cpu") if self.fsdp else value
        return out if keep else None

    def save_checkpoint(self, output_dir: str) -> None:
        """Write the current weights as a Hugging Face directory (bf16 safetensors, config, processor) on rank 0.

        Call it on every rank: under FSDP gathering the weights takes them all; the other ranks write nothing. With
        LoRA: the adapter as a PEFT folder (`PeftModel.from_pretrained(base, output_dir)` loads it).
        """
        state = self.state_dict()
        if self.lora:
            if self.rank == 0:
                lora.save_adapter(state, self.lora, self.config.model_name_or_path, Path(output_dir))
            return
        if self.rank != 0:
            return
        config = self.model.config
        # With its distributed_config, save_pretrained would gather the weights again (every rank): hide it meanwhile.
        sharding, config.distributed_config = getattr(config, "distributed_config", None), None
        configs = [config, *(getattr(config, key) for key in config.sub_configs)]
        try:
            # 1 GB shards: safetensors copies a shard's tensors to the host at once
            self.model.save_pretrained(output_dir, state_dict=state, max_shard_size="1GB")
            # save_pretrained wrote the fp32 model's dtype; the weights are bf16 (dtype="auto" loads them so)
            for sub in configs:
                sub.dtype = torch.bfloat16
            config.save_pretrained(output_dir)
        finally:
            for sub in configs:
                sub.dtype = torch.float32
            config.distributed_config = sharding
        self.processor.save_pretrained(output_dir)

    def _training_arguments(self, round_num: int):
        from transformers import TrainingArguments

        c = self.config
        return TrainingArguments(
            output_dir=c.output_dir,
            per_device_train_batch_size=c.per_device_train_batch_size,
            gradient_accumulation_steps=c.gradient_accumulation_steps,
            learning_rate=c.learning_rate,
            max_steps=c.max_steps,
            num_train_epochs=c.num_train_epochs,
            lr_scheduler_type=c.lr_scheduler_type,
            warmup_steps=c.warmup_ratio,  # a value below 1 is a ratio of the round's steps
            weight_decay=c.weight_decay,
            optim=c.optim,
            max_grad_norm=c.max_grad_norm,
            bf16=False,  # bf16 autocast is RoundTrainer's own (see compute_loss); weights stay fp32
            use_cpu=self.device.type == "cpu",
            activation_checkpointing=c.gradient_checkpointing,  # the new name of gradient_checkpointing
            activation_checkpointing_kwargs={"use_reentrant": False},
            logging_steps=c.logging_steps,
            report_to=c.report_to,
            run_name=f"round-{round_num}",
            seed=c.seed,
            data_seed=c.seed + round_num,  # each round of the federation sees the data in a new order
            dataloader_num_workers=c.dataloader_num_workers,
            remove_unused_columns=False,  # the collator's sample_counts must reach compute_loss
            save_strategy="no",
            disable_tqdm=True,
        )


# ----------------------------------------------------------------------------------------------------- checkpoint


def load_state_dict_from_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The weights of a HF directory's safetensors as a plain state dict (no model built), without the tied lm_head."""
    from safetensors.torch import load_file

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    config_file = folder / "config.json"
    tied = json.loads(config_file.read_text()).get("tie_word_embeddings", False) if config_file.is_file() else False
    if tied:
        state.pop(TIED_LM_HEAD, None)
    return state


def main(argv: list[str] | None = None) -> None:
    """Train once on the given data and save a Hugging Face checkpoint in --output_dir."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s rank " + os.environ.get("RANK", "0") + ": %(message)s"
    )
    config = parse_train_args(argv)
    try:
        trainer = LocalTrainer(config)
    except (OSError, ValueError, RuntimeError) as err:  # bad data, paths or model: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    metrics = trainer.train_round(round_num=0, total_rounds=1).metrics
    trainer.save_checkpoint(config.output_dir)
    if trainer.rank == 0:
        print(json.dumps({**metrics, "checkpoint": config.output_dir, "config": asdict(config)}, default=str))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
