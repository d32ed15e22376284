"""Variable-length attention for padding-free batches: each packed sample (or image) attends only within itself.

The trainer's `PackedCollator` puts a batch's samples end to end in one row and passes their boundaries as
`packed_cu_seqlens` / `packed_max_seqlen`; Qwen3-VL's vision tower passes its images' boundaries itself (once
`use_in_vision_tower` is called). On CUDA with
bf16/fp16 inputs the whole row goes to torch's flash variable-length kernel in one call; elsewhere (CPU, fp32) each
span goes through `scaled_dot_product_attention` in turn, which computes the same thing more slowly.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F

ATTENTION = "packed_varlen"  # the name to load the model with (attn_implementation=...)
# Qwen3-VL's vision attention passes its images' boundaries (one call per block, not one per image) only to an
# implementation whose name says "flash"; at load, transformers would look for a flash-attn package for such a name.
VISION_ATTENTION = "packed_varlen_flash"


def _flash_varlen():
    """torch's `varlen_attn` (torch >= 2.9) and whether it takes grouped K/V heads itself, or (None, False)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    packed_cu_seqlens: torch.Tensor | None = None,
    packed_max_seqlen: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over (1, heads, tokens, dim) inputs split at `cu_seq_lens_q` (vision) or `packed_cu_seqlens` (text).

    Returns (1, tokens, heads, dim) and no weights, as transformers' attention functions do.
    """
    if cu_seq_lens_q is not None:  # the vision tower's images
        cu_seqlens, max_seqlen = cu_seq_lens_q, max_length_q
    elif packed_cu_seqlens is not None:  # the collator's samples
        cu_seqlens, max_seqlen = packed_cu_seqlens, packed_max_seqlen
    else:
        raise ValueError(f"attention {ATTENTION!r} needs packed batches: give the model PackedCollator's batches")
    if query.shape[0] != 1:
        raise ValueError(f"attention {ATTENTION!r} takes one packed row, got a batch of {query.shape[0]}")
    causal = module.is_causal if is_causal is None else is_causal
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    varlen_attn, takes_gqa = _flash_varlen()
    if query.is_cuda and varlen_attn is not None and dtype in (torch.bfloat16, torch.float16):
        q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (tokens, heads, dim)
        extra = {}
        if k.shape[1] != q.shape[1]:
            if takes_gqa:
                extra["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        window = (-1, 0) if causal else (-1, -1)
        out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scaling, window_size=window,
                          **extra)  # fmt: skip
        return out[None], None
    bounds = cu_seqlens.tolist()
    spans = [
        F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            is_causal=causal,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )  # fmt: skip
        for start, end in zip(bounds, bounds[1:], strict=False)
    ]
    return torch.cat(spans, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `ATTENTION` a transformers attention implementation (with no mask); returns the name to load with."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    for name in (ATTENTION, VISION_ATTENTION):
        AttentionInterface.register(name, varlen_attention)
        AttentionMaskInterface.register(name, flash_attention_mask)
    return ATTENTION


def use_in_vision_tower(model: torch.nn.Module) -> None:
    """After loading with `ATTENTION`: let the vision tower attend over all images of a batch in one call per block."""
    model.config.vision_config._attn_implementation = VISION_ATTENTION


@contextlib.contextmanager
def standard_attention(model: torch.nn.Module):
    """For generation (padded batches and a KV cache, not packed rows): torch's SDPA for the duration, then the model's
    own attention again, the vision tower's included. A model loaded with another attention is left as it is."""
    text, vision = model.config._attn_implementation, model.config.vision_config._attn_implementation
    if text not in (ATTENTION, VISION_ATTENTION):
        yield
        return
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(text)
        model.config.vision_config._attn_implementation = vision
