"""model.py: the tiny model loads with Hugging Face classes, and the server wrapper's state dict maps onto them."""

import torch
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

from model import TIED_LM_HEAD, Qwen3VLModel


def test_tiny_processor_uses_real_template_and_qwen_token_ids(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(
        ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    )
    assert ids == [151644, 151645, 151652, 151653, 151655]
    assert tok("Hello world").input_ids == [9707, 1879]  # Qwen's real BPE
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A."}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n"
        "<|im_start|>assistant\nA.<|im_end|>\n"
    )


def test_server_state_dict_has_hf_keys_without_tied_copy_and_round_trips(tiny_model_dir, tmp_path):
    server = Qwen3VLModel(str(tiny_model_dir))
    state = server.state_dict()
    hf = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert TIED_LM_HEAD not in state
    assert set(state) | {TIED_LM_HEAD} == set(hf.state_dict())
    assert all(v.dtype == torch.bfloat16 for v in state.values())

    changed = {k: v + 1 for k, v in state.items()}
    server.load_state_dict(changed)
    assert server.model.lm_head.weight is server.model.get_input_embeddings().weight
    torch.save(server.state_dict(), tmp_path / "global.pt")
    loaded = torch.load(tmp_path / "global.pt", weights_only=True)
    missing, unexpected = hf.load_state_dict(loaded, strict=False)
    assert missing == [TIED_LM_HEAD] and unexpected == []
    hf.tie_weights()
    assert torch.equal(hf.lm_head.weight, changed["model.language_model.embed_tokens.weight"])


def test_load_with_assign_onto_a_meta_skeleton_keeps_the_tie(tiny_model_dir):
    """What the server's persistor does at export: no weights of its own, the global's tensors assigned without copy."""
    source = Qwen3VLModel(str(tiny_model_dir))
    state = {k: v + 1 for k, v in source.state_dict().items()}
    skeleton = Qwen3VLModel(str(tiny_model_dir)).to("meta")
    skeleton.model.tie_weights()
    skeleton.load_state_dict(state, assign=True)
    embedding = skeleton.model.get_input_embeddings().weight
    assert skeleton.model.lm_head.weight is embedding
    assert embedding.data_ptr() == state["model.language_model.embed_tokens.weight"].data_ptr()
    assert not any(p.is_meta for p in skeleton.parameters())
