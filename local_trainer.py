"""Local trainer: one FL client's round of supervised fine-tuning of Qwen3-VL on its PubMedVision shard.

Interface only in this commit; the implementation follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TrainResult:
    """What one round returns: rank 0 gets bf16 CPU weights (HF keys, no tied lm_head); other ranks get None."""

    state_dict: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Trainer flags; names follow Qwen's train_qwen.py where they exist."""

    model_name_or_path: str = "Qwen/Qwen3-VL-2B-Instruct"
    dataset_use: str = "./data/site-1"
    image_root: str = "PubMedVision"
    output_dir: str = "./output"
    tune_mm_llm: bool = True
    tune_mm_mlp: bool = True
    tune_mm_vision: bool = False
    max_pixels: int = 50176
    min_pixels: int = 784
    model_max_length: int = 8192
    learning_rate: float = 5e-7
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    max_steps: int = -1
    num_train_epochs: float = 1.0
    gradient_checkpointing: bool = True
    bf16: bool = True
    seed: int = 42
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    logging_steps: int = 1
    report_to: str = "none"
    dataloader_num_workers: int = 0


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    raise NotImplementedError


class LocalTrainer:
    def __init__(self, config: TrainConfig) -> None:
        raise NotImplementedError

    def train_round(self, global_state: dict[str, torch.Tensor] | None = None) -> TrainResult:
        raise NotImplementedError

    def save_checkpoint(self, output_dir: str) -> None:
        raise NotImplementedError


def load_state_dict_from_checkpoint(path: str) -> dict[str, torch.Tensor]:
    raise NotImplementedError


def main() -> None:
    raise NotImplementedError


if __name__ == "__main__":
    main()
