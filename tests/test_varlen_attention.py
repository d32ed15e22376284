"""Tests of varlen_attention.py: the per-span attention on any device, and torch's flash varlen kernel on CUDA."""

import json

import pytest
import torch
import torch.nn.functional as F

import varlen_attention
from varlen_attention import varlen_attention as attend

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel needs a CUDA GPU")


def _module(causal: bool) -> torch.nn.Module:
    module = torch.nn.Module()
    module.is_causal = causal
    return module


def _inputs(bounds: list[int], device: str, heads: int = 4, kv_heads: int = 2, dim: int = 64):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, bounds[-1], dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    return [t.to(device).requires_grad_() for t in (q, k, v)], torch.tensor(bounds, dtype=torch.int32, device=device)


def _reference(q, k, v, bounds: list[int], causal: bool) -> torch.Tensor:
    """Each span on its own through a full-sequence sdpa with an explicit block-diagonal mask, in fp32."""
    n = bounds[-1]
    span = torch.zeros(n, dtype=torch.long, device=q.device)
    for i, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        span[start:end] = i
    mask = span[:, None] == span[None, :]
    if causal:
        mask &= torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal text", "full vision"])
def test_spans_never_see_each_other(causal):
    bounds = [0, 5, 12, 30]
    (q, k, v), cu = _inputs(bounds, "cpu")
    kwargs = {"packed_cu_seqlens": cu, "packed_max_seqlen": 18} if causal else {"cu_seq_lens_q": cu, "is_causal": False}
    out, weights = attend(_module(causal), q, k, v, None, **kwargs)
    assert weights is None and out.shape == (1, 30, 4, 64)
    torch.testing.assert_close(out, _reference(q, k, v, bounds, causal))


def test_unpacked_input_is_refused():
    q = torch.zeros(2, 4, 8, 16)
    with pytest.raises(ValueError, match="needs packed batches"):
        attend(_module(True), q, q, q, None)
    with pytest.raises(ValueError, match="one packed row"):
        attend(_module(True), q, q, q, None, packed_cu_seqlens=torch.tensor([0, 8]))


@cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal text", "full vision"])
def test_cuda_flash_kernel_matches_the_reference_forward_and_backward(causal):
    bounds = [0, 300, 750, 1000]
    (q, k, v), cu = _inputs(bounds, "cuda", heads=16, kv_heads=8, dim=128)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = attend(_module(causal), q, k, v, None, packed_cu_seqlens=cu, packed_max_seqlen=450, is_causal=causal)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    reference = _reference(q, k, v, bounds, causal)
    ref_grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert F.cosine_similarity(grad.flatten(), ref.flatten(), dim=0) > 0.999


@cuda
def test_cuda_packed_model_matches_padded_in_bf16(tiny_model_dir, synthetic_pubmedvision):
    """The tiny Qwen3-VL on the GPU under bf16 autocast: packed (flash varlen) and padded (sdpa) give one loss."""
    from transformers import AutoProcessor

    from local_trainer import PackedCollator, SFTCollator, SFTDataset
    from model import load_hf_model

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    records = json.loads((synthetic_pubmedvision / "PubMedVision_InstructionTuning_VQA.json").read_text())[:6]
    dataset = SFTDataset(records, synthetic_pubmedvision, processor, 8192)
    samples = [dataset[i] for i in range(len(dataset))]
    losses = []
    for attention in ("sdpa", varlen_attention.register()):
        model = load_hf_model(
            str(tiny_model_dir), dtype=torch.float32, attn_implementation=attention, device_map="cuda"
        )
        if attention == "sdpa":
            batch = SFTCollator(processor.tokenizer.pad_token_id)(samples)
        else:
            varlen_attention.use_in_vision_tower(model)
            batch = PackedCollator(model.config)(samples)
        batch.pop("sample_counts")
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses.append(float(model(**batch).loss))
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
