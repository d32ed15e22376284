"""LoRA for the federated job: which layers get adapters, what travels, and the adapter in PEFT's own format.

Adapters are injected with `peft.inject_adapter_in_model` into the Hugging Face model itself (its class and module
names stay, so the trainer's compile, padding-free attention and evaluation work as before). The global adapter has
PEFT's saved keys (`base_model.model.<module>.lora_A.weight`, `...lora_B.weight`, and a fully trained module's own
weights under `base_model.model.<name>`), so the server's `FL_global_model.pt` holds exactly what
`adapter_model.safetensors` holds and `PeftModel.from_pretrained` loads.

Aggregation (`--lora_aggregation`):
- `exact` (default): FFA-LoRA (Sun et al., ICLR 2024). A is frozen at the server's seeded initialisation, which every
  site receives with the global adapter; sites train and send B only. With A shared, the sample-weighted average of
  the sites' B updates times A *is* the average of their updates Delta W = s * dB * A, so the server's plain FedAvg (or
  server optimizer: linear in B too) of B is exact. It costs nothing on the server (no SVD), and half the upload of
  plain LoRA; what it gives up is training A (a random fixed projection, as in the paper).
- `naive`: sites train A and B and the server averages each separately: avg(B) * avg(A) != avg(B * A).
- Sites with different ranks (`--lora_r 8,16,16`): the global adapter has the largest rank R and scale alpha / R; a
  site of rank r trains only A's first r rows (naive) and B's first r columns (its gradients beyond are zero, and its
  update there is zero), so its Delta W has rank <= r, it starts from the whole global adapter, and the average stays
  exact. (The forward pass computes the full rank R: for r << hidden size this costs little.)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."  # PEFT's saved keys are the module names under PeftModel.base_model.model
ADAPTER_DIR_NAME = "global_adapter"
ADAPTER_FILE = "adapter_model.safetensors"
AGGREGATIONS = ("exact", "naive")
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
MERGERS = ("model.visual.merger", "model.visual.deepstack_merger_list")  # fully trained with --tune_mm_mlp
A_SEED = 0  # the server's initial A: the same for every site, whatever its own seed


@dataclass(frozen=True)
class LoraSettings:
    """One site's LoRA: the global adapter's rank `r` (the largest of the sites'), this site's `trained_r` <= r, and
    whether A is trained (`aggregation` naive) or frozen (exact)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str = DEFAULT_TARGETS
    aggregation: str = "exact"
    trained_r: int = 0  # 0: r
    train_mergers: bool = False

    def __post_init__(self) -> None:
        if self.r < 1 or not 0 <= self.trained_r <= self.r:
            raise ValueError(f"--lora_r must be >= 1 and a site's trained rank in 1..{self.r}, got {self.trained_r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"--lora_aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.dropout}")

    @property
    def rank(self) -> int:
        """The rank this site trains."""
        return self.trained_r or self.r

    def peft_config(self, base_model: str | None = None, modules_to_save: list[str] | None = None):
        """PEFT's `LoraConfig` of the global adapter; `modules_to_save`: fully trained modules (in a saved one)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=target_regex(self.target_modules),
            modules_to_save=modules_to_save,
            base_model_name_or_path=base_model,
        )


def target_regex(targets: str) -> str:
    """PEFT's `target_modules` for `--lora_target_modules`: a comma list of layer names selects those layers of the
    language model only (not the vision tower, whose blocks have other names anyway); anything else (a regex over
    module names) is taken as is."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if names and all(re.fullmatch(r"\w+", n) for n in names):
        return rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})"
    return targets


def add_adapters(model: torch.nn.Module, settings: LoraSettings) -> None:
    """Inject LoRA layers into `model` in place (PEFT's initialisation; the global adapter replaces it)."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(settings.peft_config(), model)
    if not any(".lora_A." in name for name, _ in model.named_parameters()):
        raise ValueError(f"--lora_target_modules {settings.target_modules!r} matches no layer of the model")


def adapter_key(param_name: str) -> str:
    """PEFT's saved key of a parameter of the model with injected adapters."""
    return PEFT_PREFIX + param_name.replace(".default.", ".")


def exchanged_parameters(model: torch.nn.Module, settings: LoraSettings) -> dict[str, torch.nn.Parameter]:
    """What the global adapter holds, by PEFT key: every adapter's A and B, and the mergers when trained."""
    out = {}
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name or (settings.train_mergers and name.startswith(MERGERS)):
            out[adapter_key(name)] = param
    return out


def trained(key: str, settings: LoraSettings) -> bool:
    """Whether a site trains (and sends) the global adapter's tensor `key`: B and mergers always, A only if naive."""
    return ".lora_A." not in key or settings.aggregation == "naive"


def rank_mask(key: str, shape: torch.Size, settings: LoraSettings) -> torch.Tensor | None:
    """1 where a site of rank `settings.rank` < r trains the tensor (A's first rows, B's first columns), else 0;
    None when it trains all of it."""
    if settings.rank == settings.r or not (".lora_A." in key or ".lora_B." in key):
        return None
    mask = torch.zeros(shape)
    if ".lora_A." in key:
        mask[: settings.rank] = 1
    else:
        mask[:, : settings.rank] = 1
    return mask


def set_trainable(model: torch.nn.Module, settings: LoraSettings) -> None:
    """Freeze the model but the adapters' trained tensors (and the mergers with --tune_mm_mlp); a site of a lower
    rank than the global adapter's gets its gradients masked to its rank (`rank_mask`)."""
    model.requires_grad_(False)
    for key, param in exchanged_parameters(model, settings).items():
        param.requires_grad_(trained(key, settings))
        if param.requires_grad and not getattr(param, "_rank_masked", False):
            mask = rank_mask(key, param.shape, settings)
            if mask is not None:
                mask = mask.to(param.device)
                param.register_hook(lambda grad, mask=mask: grad * mask)
                param._rank_masked = True


def initial_adapter(model: torch.nn.Module, settings: LoraSettings, seed: int = A_SEED) -> dict[str, torch.Tensor]:
    """The global adapter a run starts from, fp32: A as PEFT initialises it (Kaiming-uniform) from `seed`, B zero
    (so the adapted model is the base model), the mergers' base weights when trained. `model`: the base model."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(target_regex(settings.target_modules), name):
            a = torch.empty(settings.r, module.in_features)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.zeros(module.out_features, settings.r)
    if not state:
        raise ValueError(f"--lora_target_modules {settings.target_modules!r} matches no linear layer of the model")
    if settings.train_mergers:
        for name, param in model.named_parameters():
            if name.startswith(MERGERS):
                state[PEFT_PREFIX + name] = param.detach().to(torch.float32, copy=True)
    return state


def delta_w(state: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """Each adapted layer's Delta W = alpha / r * B @ A (fp64), by module name: what the adapter adds to the base."""
    scale = settings.alpha / settings.r
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            b = state[key.replace(".lora_A.", ".lora_B.")]
            out[module] = scale * b.double() @ a.double()
    return out


def save_adapter(state: dict[str, torch.Tensor], settings: LoraSettings, base_model: str, output_dir: Path) -> Path:
    """Write `state` (PEFT keys) as a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`, fp32),
    written to a temporary folder first and moved into place."""
    import shutil

    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}, tmp / ADAPTER_FILE)
    # PEFT wraps each listed module: the mergers one by one (a ModuleList cannot stand in for its items)
    merger = re.compile(re.escape(PEFT_PREFIX) + r"model\.(visual\.(?:merger|deepstack_merger_list\.\d+))\.")
    fully = sorted({m.group(1) for key in state if (m := merger.match(key))})
    settings.peft_config(base_model, fully or None).save_pretrained(str(tmp))
    shutil.rmtree(output_dir, ignore_errors=True)
    tmp.rename(output_dir)
    return output_dir


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_model(adapter_dir: str | Path) -> str | None:
    """The base model an adapter folder names (`base_model_name_or_path`)."""
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")


def load_merged(base_model: str, adapter_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The base model with the adapter merged into its weights (merged in fp32, then cast to `dtype`)."""
    from peft import PeftModel

    from model import load_hf_model

    base = load_hf_model(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.to(dtype)


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
