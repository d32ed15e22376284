"""Run a federated round with Qwen's own fine-tuning code (QwenLM/Qwen3-VL `qwen-vl-finetune`), in-process.

`QwenOfficialTrainer` is the drop-in alternative to `local_trainer.LocalTrainer` that client.py picks with
`--trainer qwen` (or when `QWEN3VL_ROOT` is set). Each round it writes the received global weights as a Hugging Face
directory the official `train_qwen.train()` can load, runs that function on the site's `fl_site` dataset, and reads
the saved checkpoint back as a state dict. It needs its own environment: see requirements-qwen-official.txt.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from packaging.version import Version

from local_trainer import TrainConfig, TrainResult
from model import materialize

OFFICIAL_REPO = "QwenLM/Qwen3-VL"
OFFICIAL_COMMIT = "96588727e44c78b25ba03ea03b8e12f7e64fd0da"
# The official code at OFFICIAL_COMMIT uses transformers 4.57 APIs that 5.x removed or renamed.
TRANSFORMERS_MIN, TRANSFORMERS_BELOW = Version("4.57.0"), Version("5.0.0")
DATASET_NAME = "fl_site"
PATCH_FILE = Path(__file__).resolve().parent / "patches" / "fl_site_data_list.patch"
# train_qwen picks the model class from the path: it must contain "qwen3", and a folder name with an "a" in it
# selects the MoE class. So the round's input folder is named for that, and checked below.
ROUND_MODEL_DIRNAME = "input-qwen3"
ROUND_OUTPUT_DIRNAME = "output"
# Files of a model folder that are not weights: config, generation config and the processor's files.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")
TIED_LM_HEAD = "lm_head.weight"
PEFT_UNSUPPORTED = (
    "--peft lora runs in the built-in trainer only (--trainer builtin). Qwen's train_qwen.py --lora_enable (where "
    "its version has it) "
    "hard-codes its target layers (q/k/v/o_proj), initialises a fresh adapter with A trained on each site, and saves "
    "the whole model: the global adapter cannot be passed in, and A cannot be shared and frozen for exact averaging"
)


class OfficialCodeError(RuntimeError):
    """The official code or its environment is not what this module needs; the message says what to do."""


def check_transformers_version(installed: str | None = None) -> None:
    """Raise OfficialCodeError unless transformers is a 4.57.x the official code was written for."""
    installed = installed or importlib.metadata.version("transformers")
    if not TRANSFORMERS_MIN <= Version(installed) < TRANSFORMERS_BELOW:
        raise OfficialCodeError(
            f"--trainer qwen runs {OFFICIAL_REPO}@{OFFICIAL_COMMIT[:7]}, which needs transformers "
            f">={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}; this environment has transformers {installed}. "
            "Its trainer.py imports apply_multimodal_rotary_pos_emb (gone in 5.x) and train_qwen.py uses "
            "model.visual / model.language_model (removed in 5.0). Use a separate virtual environment: "
            "pip install torch==2.14.1 torchvision==0.29.1 -r requirements-qwen-official.txt"
        )


def finetune_dir(root: str | os.PathLike | None) -> Path:
    """The `qwen-vl-finetune` folder of a Qwen3-VL checkout at `root`; a clear error if it is not one."""
    if not root:
        raise OfficialCodeError(
            "QWEN3VL_ROOT is not set: point it at a checkout of https://github.com/QwenLM/Qwen3-VL "
            f"(commit {OFFICIAL_COMMIT}), the folder that contains qwen-vl-finetune/."
        )
    base = Path(root).expanduser().resolve() / "qwen-vl-finetune"
    expected = ["qwenvl/train/train_qwen.py", "qwenvl/train/trainer.py", "qwenvl/data/__init__.py"]
    missing = [rel for rel in expected if not (base / rel).is_file()]
    if missing:
        raise OfficialCodeError(
            f"QWEN3VL_ROOT={root} is not a Qwen3-VL checkout: expected {', '.join(str(base / m) for m in expected)}, "
            f"missing {', '.join(missing)}. Set QWEN3VL_ROOT to the repository root of QwenLM/Qwen3-VL at commit "
            f"{OFFICIAL_COMMIT} (the folder that contains qwen-vl-finetune/), not to qwen-vl-finetune itself."
        )
    return base


def _flash_attn_missing(*_args, **_kwargs):
    raise OfficialCodeError(
        "the official code called flash_attn_varlen_func, but flash-attn is not installed. It is only called "
        "with --data_flatten or --data_packing, which QwenOfficialTrainer leaves off when flash-attn is missing."
    )


@contextmanager
def _flash_attn_stand_in():
    """While importing the official trainer.py: if flash-attn is absent, stand in for the one name it imports.

    trainer.py imports flash_attn at the top but only calls it for flattened/packed batches. The stand-in is removed
    from sys.modules right after, so nothing else sees a fake flash_attn package.
    """
    if importlib.util.find_spec("flash_attn") is not None:
        yield
        return
    # transformers probes for flash_attn while these load; let it do so before the stand-in exists.
    for name in ("transformers.modeling_utils", "transformers.modeling_flash_attention_utils", "transformers.trainer"):
        importlib.import_module(name)
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface.flash_attn_varlen_func = _flash_attn_missing
    package = types.ModuleType("flash_attn")
    package.flash_attn_interface = interface
    sys.modules.update({"flash_attn": package, "flash_attn.flash_attn_interface": interface})
    try:
        yield
    finally:
        for name in ("flash_attn.flash_attn_interface", "flash_attn"):
            sys.modules.pop(name, None)


def import_official(root: str | os.PathLike | None) -> tuple[types.ModuleType, types.ModuleType]:
    """Import the official `qwenvl.train.train_qwen` and `qwenvl.data` from the checkout at `root`."""
    check_transformers_version()
    base = finetune_dir(root)
    loaded = sys.modules.get("qwenvl.data")
    if loaded is not None and Path(loaded.__file__).resolve() != base / "qwenvl/data/__init__.py":
        raise OfficialCodeError(f"another qwenvl package is already imported from {loaded.__file__}, not {base}")
    for path in (base, base / "qwenvl" / "train"):  # train_qwen.py does `from trainer import ...`
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    with _flash_attn_stand_in():
        train_qwen = importlib.import_module("qwenvl.train.train_qwen")
    return train_qwen, importlib.import_module("qwenvl.data")


def register_fl_site(data_module: types.ModuleType, site_data_dir: str, image_root: str) -> None:
    """Point the official `fl_site` dataset at this site: set the env the patch reads and the live `data_dict` entry.

    Without the patch this adds the entry; with it, it refreshes the entry the patch built from the environment
    at import time (which may predate this call).
    """
    os.environ["FL_SITE_DATA_DIR"] = site_data_dir
    os.environ["PUBMEDVISION_IMAGE_ROOT"] = image_root
    data_module.data_dict[DATASET_NAME] = {
        "annotation_path": os.path.join(site_data_dir, "train.json"),
        "data_path": image_root,
    }


def is_patched(data_module: types.ModuleType) -> bool:
    """True when the checkout's qwenvl/data/__init__.py carries patches/fl_site_data_list.patch."""
    return "FL_SITE_DATA_DIR" in Path(data_module.__file__).read_text()


def _local_model_dir(model_name_or_path: str, with_weights: bool) -> Path:
    if Path(model_name_or_path).is_dir():
        return Path(model_name_or_path)
    from huggingface_hub import snapshot_download

    patterns = None if with_weights else ["*.json", "*.txt", "*.jinja"]
    return Path(snapshot_download(model_name_or_path, allow_patterns=patterns))


def _config_for_transformers_4(config: dict) -> dict:
    """A config.json saved by transformers 5.x, in 4.57's spelling (text `rope_scaling` + `rope_theta`)."""
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    vision.pop("rope_parameters", None)  # 4.57's vision tower has fixed rope settings
    rope = text.pop("rope_parameters", None)
    if rope is not None:
        rope = dict(rope)
        text["rope_theta"] = rope.pop("rope_theta", text.get("rope_theta"))
        text["rope_scaling"] = rope
    return config


def _write_slow_tokenizer_files(model_dir: Path) -> None:
    """vocab.json and merges.txt from tokenizer.json: train_qwen loads the tokenizer with use_fast=False.

    Transformers 5.x saves tokenizer.json only; 4.57's slow Qwen2Tokenizer needs these two files (its added tokens
    it reads from tokenizer.json).
    """
    bpe = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (model_dir / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]]
    (model_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def write_round_model(
    global_state: dict[str, torch.Tensor] | None, model_name_or_path: str, model_dir: Path, cfg: TrainConfig
) -> Path:
    """The Hugging Face folder train_qwen loads this round: the base's config and processor files plus the weights.

    With `global_state` the weights are those tensors (one safetensors file, no model built); without, they are
    links to the base model's weight files.
    """
    if "qwen3" not in str(model_dir).lower() or "a" in model_dir.name.lower():
        raise OfficialCodeError(f"{model_dir}: train_qwen would load the wrong model class from this path")
    base = _local_model_dir(model_name_or_path, with_weights=global_state is None)
    model_dir.mkdir(parents=True)
    for src in base.iterdir():
        if src.is_file() and not src.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(src, model_dir / src.name)
        elif src.is_file() and global_state is None:
            (model_dir / src.name).symlink_to(src.resolve())
    config = _config_for_transformers_4(json.loads((model_dir / "config.json").read_text()))
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    if not (model_dir / "vocab.json").is_file() and (model_dir / "tokenizer.json").is_file():
        _write_slow_tokenizer_files(model_dir)
    # The official collator truncates to the processor's tokenizer.model_max_length, not to --model_max_length.
    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["model_max_length"] = cfg.model_max_length
    tok_config_path.write_text(json.dumps(tok_config, indent=2))
    if global_state is not None:
        from safetensors.torch import save_file

        tied = config.get("tie_word_embeddings", False)
        dtype = torch.bfloat16 if cfg.bf16 else None
        tensors = {
            key: value.detach().to(device="cpu", dtype=dtype if value.is_floating_point() else None).contiguous()
            for key, value in ((k, materialize(v)) for k, v in global_state.items())
            if not (tied and key == TIED_LM_HEAD)
        }
        save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return model_dir


def load_trained_state(output_dir: Path) -> dict[str, torch.Tensor]:
    """The weights train_qwen saved in `output_dir`, as bf16 CPU tensors, without the tied lm_head copy."""
    from safetensors.torch import load_file

    index = output_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    if not (output_dir / files[0]).is_file():
        raise OfficialCodeError(f"train_qwen saved no safetensors weights in {output_dir}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(output_dir / name)))
    config = json.loads((output_dir / "config.json").read_text())
    if config.get("tie_word_embeddings", False):
        state.pop(TIED_LM_HEAD, None)
    return {key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in state.items()}


def trained_update(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`trained` minus `start`, computed in fp32 and rounded to bf16, for the tensors that changed."""
    missing = sorted(start.keys() - trained.keys())
    if missing:
        raise OfficialCodeError(f"train_qwen saved no weights for {missing[:3]}")
    return {
        key: (trained[key].float() - start[key].float()).to(torch.bfloat16)
        for key in start
        if not torch.equal(trained[key], start[key])
    }


def round_metrics(output_dir: Path, cfg: TrainConfig, world_size: int, seconds: float) -> dict[str, float]:
    """loss/steps/samples from the trainer_state.json train_qwen saves; NaN where the official code gives nothing."""
    nan = float("nan")
    state_file = output_dir / "trainer_state.json"
    if not state_file.is_file():
        return {"loss": nan, "steps": nan, "samples": nan, "seconds": seconds, "skipped_samples": nan}
    state = json.loads(state_file.read_text())
    history = state.get("log_history", [])
    summary = next((entry for entry in reversed(history) if "train_loss" in entry), None)
    logged = [entry["loss"] for entry in history if "loss" in entry]
    if summary is not None:
        loss = float(summary["train_loss"])  # the Trainer's mean over all the round's steps
    else:
        loss = sum(logged) / len(logged) if logged else nan
    steps = int(state.get("global_step", 0))
    samples = steps * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    if cfg.max_steps <= 0:  # an epoch's last batch may be short
        with open(os.path.join(cfg.dataset_use, "train.json"), encoding="utf-8") as f:
            samples = min(samples, math.ceil(len(json.load(f)) * cfg.num_train_epochs))
    # The official dataset never skips a sample: a failing one is silently replaced by its neighbour, uncounted.
    return {"loss": loss, "steps": steps, "samples": samples, "seconds": seconds, "skipped_samples": nan}


def train_argv(cfg: TrainConfig, model_dir: Path, output_dir: Path, round_num: int) -> list[str]:
    """sys.argv for train_qwen.train(): its HfArgumentParser reads model, data and training arguments from it."""
    args = {
        "model_name_or_path": model_dir,
        "output_dir": output_dir,
        "dataset_use": DATASET_NAME,
        # Flattened batches run through flash-attn's varlen kernel (Qwen's sft.sh default); they need flash-attn.
        "data_flatten": cfg.attn_implementation == "flash_attention_2",
        "tune_mm_llm": cfg.tune_mm_llm,
        "tune_mm_mlp": cfg.tune_mm_mlp,
        "tune_mm_vision": cfg.tune_mm_vision,
        "max_pixels": cfg.max_pixels,
        "min_pixels": cfg.min_pixels,
        "model_max_length": cfg.model_max_length,
        "learning_rate": cfg.learning_rate,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_steps": cfg.max_steps,
        "num_train_epochs": cfg.num_train_epochs,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "bf16": cfg.bf16,
        "seed": cfg.seed,
        "data_seed": cfg.seed + round_num,  # as LocalTrainer: each round sees the data in a new order
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_ratio": cfg.warmup_ratio,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "logging_steps": cfg.logging_steps,
        "report_to": cfg.report_to,
        "dataloader_num_workers": cfg.dataloader_num_workers,
        "use_cpu": not torch.cuda.is_available(),  # 4.57 refuses --bf16 without a GPU unless told it runs on CPU
        "save_strategy": "no",
        "ddp_find_unused_parameters": False,
    }
    return ["train_qwen.py"] + [item for key, value in args.items() for item in (f"--{key}", str(value))]


class QwenOfficialTrainer:
    """One FL round = one call of the official `train_qwen.train()` on this site's shard (every torchrun rank)."""

    def __init__(self, config: TrainConfig) -> None:
        if config.peft != "none":
            raise OfficialCodeError(PEFT_UNSUPPORTED)
        site_json = Path(config.dataset_use) / "train.json"
        if not site_json.is_file():
            raise OfficialCodeError(f"--trainer qwen reads {site_json}: --dataset_use must be a site folder with one")
        if config.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise OfficialCodeError("--attn_implementation flash_attention_2 needs flash-attn, which is not installed")
        self.config = config
        self.round = 0
        self.train_qwen, self.data_module = import_official(os.environ.get("QWEN3VL_ROOT"))
        self.work_dir = Path(config.output_dir).resolve() / "qwen_official"

    def _ensure_process_group(self) -> str | None:
        """train_qwen calls torch.distributed.get_rank(): make a one-process group when none exists; its store file."""
        if dist.is_initialized():
            return None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
            return None
        store = tempfile.NamedTemporaryFile(prefix="qwen_official_pg_", delete=False).name
        dist.init_process_group(backend="gloo", init_method=f"file://{store}", rank=0, world_size=1)
        return store

    def train_round(
        self,
        global_state: dict[str, torch.Tensor] | None = None,
        release_global_state: bool = False,
        round_num: int | None = None,
    ) -> TrainResult:
        """Train one round from `global_state` (rank 0's copy); rank 0 gets the round's update, others None.

        The official code trains and saves in its own precision (bf16 weights with `--bf16`), so its update is the
        difference of two bf16 models: a change below half a bf16 step is lost inside its training, before this
        code sees it (LocalTrainer keeps fp32 weights and sends the fp32 change). `round_num`: the federation's
        round, which seeds the data order. `release_global_state`: empty the dict once written, before training.
        """
        round_num = self.round if round_num is None else round_num
        cfg = self.config
        start = time.perf_counter()
        own_group = self._ensure_process_group()
        rank, world_size = dist.get_rank(), dist.get_world_size()
        model_dir, output_dir = self.work_dir / ROUND_MODEL_DIRNAME, self.work_dir / ROUND_OUTPUT_DIRNAME
        try:
            if rank == 0:
                # A fresh output folder each round: one holding checkpoint-* would make train_qwen resume from it.
                for stale in (model_dir, output_dir):
                    shutil.rmtree(stale, ignore_errors=True)
                write_round_model(global_state, cfg.model_name_or_path, model_dir, cfg)
                if release_global_state and global_state is not None:
                    global_state.clear()
            dist.barrier()
            register_fl_site(self.data_module, os.path.abspath(cfg.dataset_use), os.path.abspath(cfg.image_root))
            argv, sys.argv = sys.argv, train_argv(cfg, model_dir, output_dir, round_num)
            try:
                self.train_qwen.train(attn_implementation=cfg.attn_implementation)
            finally:
                sys.argv = argv
            self.round = round_num + 1
            dist.barrier()
            if rank != 0:
                return TrainResult(update=None, metrics={})
            update = trained_update(load_trained_state(model_dir), load_trained_state(output_dir))
            return TrainResult(update, round_metrics(output_dir, cfg, world_size, time.perf_counter() - start))
        finally:
            if own_group:
                dist.destroy_process_group()
                Path(own_group).unlink(missing_ok=True)
