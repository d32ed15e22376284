"""Tests of local_trainer.py on the tiny Qwen3-VL: labels, data rules, precision, freezing, rounds and their
updates, checkpoints."""

import gc
import json
import logging
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from local_trainer import (
    COLLECTIVE_TIMEOUT_ENV,
    IGNORE_INDEX,
    LocalTrainer,
    PackedCollator,
    SFTCollator,
    SFTDataset,
    SkipSample,
    TrainConfig,
    load_state_dict_from_checkpoint,
    parse_train_args,
    set_trainable,
)

ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN = 100  # synthetic records 0..99 form the site shard; the rest are held out for evaluation


def _records(root: Path) -> list[dict]:
    return json.loads((root / "PubMedVision_InstructionTuning_VQA.json").read_text())


def _with_placeholders(record: dict) -> dict:
    """The record as our site shards carry it: one `<image>\\n` per image at the start of the first human turn."""
    turns = [dict(turn) for turn in record["conversations"]]
    turns[0]["value"] = "<image>\n" * len(record["image"]) + turns[0]["value"]
    return {**record, "conversations": turns}


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir, size={"shortest_edge": 784, "longest_edge": 50176})


@pytest.fixture(scope="module")
def site_dir(synthetic_pubmedvision, tmp_path_factory) -> Path:
    """`data/site-1/train.json` in the shard format, referencing the synthetic images."""
    site = tmp_path_factory.mktemp("data") / "site-1"
    site.mkdir()
    shard = [_with_placeholders(r) for r in _records(synthetic_pubmedvision)[:NUM_TRAIN]]
    (site / "train.json").write_text(json.dumps(shard))
    return site


def _dataset(records, root, processor, max_len=8192) -> SFTDataset:
    return SFTDataset(records, root, processor, max_len)


def _label_runs(labels: torch.Tensor) -> list[list[int]]:
    """The contiguous runs of labelled tokens."""
    runs, current = [], []
    for token in labels.tolist():
        if token == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    return runs + ([current] if current else [])


# ---------------------------------------------------------------------------------------------------------- data


def test_labels_are_exactly_each_answer_and_its_im_end(synthetic_pubmedvision, processor):
    images = [r["image"][0] for r in _records(synthetic_pubmedvision)[:3]]
    record = {
        "id": "multi-turn-1",
        "image": images,
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat do the first two images show?"},
            {"from": "gpt", "value": "Two shapes on coloured backgrounds."},
            {"from": "human", "value": "And this one?\n<image>"},
            {"from": "gpt", "value": "A third shape.\nNothing else."},
        ],
    }
    sample = _dataset([record], synthetic_pubmedvision, processor).encode(0)
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = ["Two shapes on coloured backgrounds.", "A third shape.\nNothing else."]
    expected = [tok.encode(a, add_special_tokens=False) + [im_end] for a in answers]
    assert _label_runs(sample["labels"]) == expected
    assert [tok.decode(run) for run in _label_runs(sample["labels"])] == [a + "<|im_end|>" for a in answers]
    # every image expanded per its grid (merge 2x2), none of it labelled
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    is_pad = sample["input_ids"] == image_pad
    assert int(is_pad.sum()) == int(sample["image_grid_thw"].prod(-1).sum()) // 4
    assert len(sample["image_grid_thw"]) == 3
    assert (sample["labels"][is_pad] == IGNORE_INDEX).all()
    # mm_token_type_ids marks exactly the image tokens (the model needs it with image_grid_thw)
    assert torch.equal(sample["mm_token_type_ids"] != 0, is_pad)
    # the third image sits in the second human turn, after its text
    text = tok.decode(sample["input_ids"])
    assert re.search(r"And this one\?\n<\|vision_start\|>(<\|image_pad\|>)+<\|vision_end\|><\|im_end\|>", text)


@pytest.mark.parametrize("lead", ["\n", "\n\n"])
def test_an_answer_starting_with_newlines_is_labelled(synthetic_pubmedvision, processor, lead):
    """BPE merges the header's "\\n" with the answer's leading newlines into one token: the header must still match."""
    record = _records(synthetic_pubmedvision)[0]
    answer = "A round shape."
    turns = [record["conversations"][0], {"from": "gpt", "value": lead + answer}]
    sample = _dataset([{**record, "conversations": turns}], synthetic_pubmedvision, processor).encode(0)
    tok = processor.tokenizer
    text = tok.decode(sample["input_ids"])
    assert "<|im_start|>assistant\n" + lead + answer in text
    assert tok.convert_ids_to_tokens(tok.encode("assistant\n" + lead, add_special_tokens=False))[-1] == (
        "\u010a" * (1 + len(lead))  # one merged newline token: "assistant\\n" alone would not match
    )
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert _label_runs(sample["labels"]) == [tok.encode(answer, add_special_tokens=False) + [im_end]]


def test_raw_and_shard_formats_give_the_same_tokens(synthetic_pubmedvision, processor):
    records = [r for r in _records(synthetic_pubmedvision) if len(r["image"]) == 2][:1]
    raw = _dataset(records, synthetic_pubmedvision, processor).encode(0)
    shard = _dataset([_with_placeholders(records[0])], synthetic_pubmedvision, processor).encode(0)
    assert torch.equal(raw["input_ids"], shard["input_ids"])
    text = processor.tokenizer.decode(raw["input_ids"])
    assert text.startswith("<|im_start|>user\n<|vision_start|>")
    assert text.count("<|vision_start|>") == 2


def test_a_record_whose_placeholders_do_not_match_its_images_is_left_out_and_counted(synthetic_pubmedvision,
                                                                                      processor, caplog):  # fmt: skip
    good = _records(synthetic_pubmedvision)[1]
    record = _with_placeholders(_records(synthetic_pubmedvision)[0])
    record["conversations"][0]["value"] = "<image>\n" + record["conversations"][0]["value"]
    with caplog.at_level(logging.WARNING, logger="local_trainer"):
        dataset = _dataset([record, good], synthetic_pubmedvision, processor)  # the site trains on the rest
    assert (len(dataset), dataset.num_missing) == (1, 1)
    assert "syn-0000000" in caplog.text and "2 <image> placeholders for 1 images" in caplog.text
    with pytest.raises(RuntimeError, match="no usable records.*syn-0000000.*2 <image> placeholders for 1 images"):
        _dataset([record], synthetic_pubmedvision, processor)


@pytest.mark.parametrize("bad_path", ["../outside.jpg", "images/../../outside.jpg", "/etc/hostname"])
def test_image_paths_escaping_the_root_are_rejected(synthetic_pubmedvision, processor, bad_path):
    good = _records(synthetic_pubmedvision)[0]
    evil = {**good, "id": "evil-7", "image": [bad_path]}
    dataset = _dataset([good, evil], synthetic_pubmedvision, processor)
    assert (len(dataset), dataset.num_missing, dataset.records) == (1, 1, [good])  # refused, never opened
    with pytest.raises(RuntimeError, match="no usable records.*evil-7"):
        _dataset([evil], synthetic_pubmedvision, processor)


def test_symlink_out_of_the_root_is_rejected(synthetic_pubmedvision, processor, tmp_path):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "link.jpg").symlink_to(synthetic_pubmedvision / _records(synthetic_pubmedvision)[0]["image"][0])
    record = {**_records(synthetic_pubmedvision)[0], "id": "link-1", "image": ["images/link.jpg"]}
    with pytest.raises(RuntimeError, match="no usable records.*link-1.*escapes"):
        _dataset([record], root, processor)


def test_unreadable_image_is_skipped_with_its_id(synthetic_pubmedvision, processor, tmp_path, caplog):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "broken.jpg").write_bytes(b"this is not a jpeg")
    good = _records(synthetic_pubmedvision)[0]
    (root / good["image"][0]).write_bytes((synthetic_pubmedvision / good["image"][0]).read_bytes())
    bad = {**good, "id": "broken-42", "image": ["images/broken.jpg"]}
    dataset = _dataset([bad, good], root, processor)
    with caplog.at_level(logging.WARNING, logger="local_trainer"):
        sample = dataset[0]
    assert "broken-42" in caplog.text
    assert sample["skipped"] == 1
    assert torch.equal(sample["input_ids"], dataset.encode(1)["input_ids"])
    with pytest.raises(RuntimeError, match="no usable sample"):
        _dataset([bad], root, processor)[0]


def test_missing_images_drop_their_records(synthetic_pubmedvision, processor, caplog):
    good = _records(synthetic_pubmedvision)[0]
    missing = {**good, "id": "gone-1", "image": ["images/does_not_exist.jpg"]}
    with caplog.at_level(logging.WARNING, logger="local_trainer"):
        dataset = _dataset([good, missing], synthetic_pubmedvision, processor)
    assert (len(dataset), dataset.num_missing) == (1, 1)
    assert "gone-1" in caplog.text
    with pytest.raises(RuntimeError, match="no usable records"):
        _dataset([missing], synthetic_pubmedvision, processor)


def test_long_samples_are_cut_at_the_tail_or_skipped(synthetic_pubmedvision, processor):
    record = _records(synthetic_pubmedvision)[0]
    full = _dataset([record], synthetic_pubmedvision, processor).encode(0)
    labelled = (full["labels"] != IGNORE_INDEX).nonzero().flatten()
    last_image_token = int((full["mm_token_type_ids"] != 0).nonzero().max())

    keep = int(labelled[0]) + 2  # images and the first two answer tokens fit
    cut = _dataset([record], synthetic_pubmedvision, processor, max_len=keep).encode(0)
    assert cut["truncated"] and len(cut["input_ids"]) == keep == len(cut["labels"]) == len(cut["mm_token_type_ids"])
    assert torch.equal(cut["input_ids"], full["input_ids"][:keep])
    assert int((cut["labels"] != IGNORE_INDEX).sum()) == 2
    assert torch.equal(cut["pixel_values"], full["pixel_values"])
    assert not full["truncated"]

    for max_len, reason in [(int(labelled[0]), "before any answer"), (last_image_token, "within its images")]:
        dataset = _dataset([record], synthetic_pubmedvision, processor, max_len=max_len)
        with pytest.raises(SkipSample, match=f"syn-0000000.*{reason}"):
            dataset.encode(0)
        with pytest.raises(RuntimeError, match="no usable sample"):
            dataset[0]


def test_collator_pads_right_and_stacks_images(synthetic_pubmedvision, processor):
    records = _records(synthetic_pubmedvision)
    records = [next(r for r in records if len(r["image"]) == 2), next(r for r in records if len(r["image"]) == 1)]
    dataset = _dataset(records, synthetic_pubmedvision, processor)
    samples = [dataset[0], dataset[1]]
    batch = SFTCollator(processor.tokenizer.pad_token_id)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (2, max(lengths))
    for row, n in enumerate(lengths):
        assert torch.equal(batch["input_ids"][row, :n], samples[row]["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert batch["image_grid_thw"].shape == (3, 3)
    assert batch["pixel_values"].shape[0] == sum(s["pixel_values"].shape[0] for s in samples)
    assert batch["sample_counts"].tolist() == [2, 0, 0, 0]


def _mixed_samples(synthetic_pubmedvision, processor) -> list[dict]:
    """Two images, one image, and no image (a text-only turn), in one batch."""
    records = _records(synthetic_pubmedvision)
    two, one = next(r for r in records if len(r["image"]) == 2), next(r for r in records if len(r["image"]) == 1)
    text_only = {**records[5], "image": []}
    dataset = _dataset([two, one, text_only], synthetic_pubmedvision, processor)
    return [dataset[i] for i in range(3)]


def test_packed_collator_puts_samples_end_to_end_with_their_own_positions(synthetic_pubmedvision, processor,
                                                                          tiny_model_dir):  # fmt: skip
    from transformers import AutoConfig

    samples = _mixed_samples(synthetic_pubmedvision, processor)
    batch = PackedCollator(AutoConfig.from_pretrained(tiny_model_dir))(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == batch["labels"].shape == (1, sum(lengths))
    assert torch.equal(batch["input_ids"][0], torch.cat([s["input_ids"] for s in samples]))
    assert batch["packed_cu_seqlens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch["packed_max_seqlen"] == max(lengths) and "attention_mask" not in batch
    positions = batch["position_ids"]
    assert positions.shape == (4, 1, sum(lengths))
    starts = batch["packed_cu_seqlens"].tolist()
    for start, end in zip(starts, starts[1:], strict=False):  # every sample's positions start at 0
        assert positions[0, 0, start:end].tolist() == list(range(end - start))
        assert positions[1:, 0, start].tolist() == [0, 0, 0]
    image = samples[0]["mm_token_type_ids"] == 1  # image tokens: a 2-D grid of (h, w) positions, not a line
    assert len(set(positions[2, 0, : lengths[0]][image].tolist())) < int(image.sum())
    assert torch.equal(positions[1, 0, lengths[0] + lengths[1] :], positions[0, 0, lengths[0] + lengths[1] :])
    assert batch["image_grid_thw"].shape == (3, 3) and batch["sample_counts"].tolist() == [3, 0, 0, 0]


def test_packed_batches_compute_what_padded_batches_do(synthetic_pubmedvision, processor, tiny_model_dir):
    """The same samples padded (sdpa, attention mask) and packed (varlen attention): same loss, same gradients."""
    import varlen_attention
    from model import load_hf_model

    samples = _mixed_samples(synthetic_pubmedvision, processor)
    results = []
    for attention, collator in [
        ("sdpa", SFTCollator(processor.tokenizer.pad_token_id)),
        (varlen_attention.register(), None),
    ]:
        model = load_hf_model(str(tiny_model_dir), dtype=torch.float32, attn_implementation=attention)
        if collator is None:
            varlen_attention.use_in_vision_tower(model)
            assert model.model.visual.blocks[0].attn.config._attn_implementation == varlen_attention.VISION_ATTENTION
        batch = (collator or PackedCollator(model.config))(samples)
        batch.pop("sample_counts")
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 10
    for key, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


# --------------------------------------------------------------------------------------------------------- flags


def test_parse_train_args_uses_train_qwen_names():
    config = parse_train_args(
        ["--dataset_use", "a,b", "--tune_mm_vision", "True", "--max_steps", "3", "--bf16", "False"]
    )
    assert (config.dataset_use, config.tune_mm_vision, config.max_steps, config.bf16) == ("a,b", True, 3, False)
    assert config.learning_rate == 5e-7 and config.max_pixels == 50176 and config.model_max_length == 8192
    assert not config.fsdp and parse_train_args(["--fsdp"]).fsdp  # a bare --fsdp, as in HF TrainingArguments
    assert config.torch_compile == torch.cuda.is_available()  # compiled by default on GPUs only
    assert (
        parse_train_args(["--torch_compile"]).torch_compile
        and not parse_train_args(["--torch_compile", "False"]).torch_compile
    )


@pytest.mark.parametrize(
    "argv", [["--max_steps", "0"], ["--no_such_flag", "1"], ["--tune_mm_llm", "False", "--tune_mm_mlp", "False"]]
)
def test_bad_flags_exit_with_an_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args(argv)
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_cli_bad_dataset_exits_nonzero(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "local_trainer.py"), "--dataset_use", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"--dataset_use: {tmp_path / 'nope'} not found" in result.stderr


# ------------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, site_dir, synthetic_pubmedvision, tmp_path_factory) -> LocalTrainer:
    config = TrainConfig(
        model_name_or_path=str(tiny_model_dir),
        dataset_use=str(site_dir),
        image_root=str(synthetic_pubmedvision),
        output_dir=str(tmp_path_factory.mktemp("out")),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,
        bf16=False,  # bf16 matmuls are slow on this CPU; the mixed-precision test turns it on
        logging_steps=5,
    )
    return LocalTrainer(config)


@pytest.fixture(scope="module")
def initial_state(tiny_model_dir) -> dict[str, torch.Tensor]:
    return load_state_dict_from_checkpoint(str(tiny_model_dir))


def _eval_loss(trainer: LocalTrainer, records: list[dict], root: Path) -> float:
    dataset = _dataset(records, root, trainer.processor)
    batch = trainer.collator([dataset[i] for i in range(len(dataset))])
    batch.pop("sample_counts")
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.model(**batch).loss)


def _fp32_weights(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    """A copy of the trainer's fp32 master weights (every parameter, HF keys)."""
    return {key: param.detach().clone() for key, param in trainer.model.named_parameters()}


def _trainable_keys(trainer: LocalTrainer) -> set[str]:
    return {key for key, param in trainer.model.named_parameters() if param.requires_grad}


def _exact_update(trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor], keys) -> dict[str, torch.Tensor]:
    """The update a round from bf16 `start` to fp32 `trained` should send: the fp32 change, rounded to bf16 once."""
    return {key: (trained[key] - start[key].float()).to(torch.bfloat16) for key in keys}


def _relative_error(approx: dict[str, torch.Tensor], true: dict[str, torch.Tensor]) -> float:
    """||approx - true|| / ||true|| over all tensors of `true` together, in fp32."""
    error = sum(float((approx[k].float() - true[k]).square().sum()) for k in true)
    norm = sum(float(true[k].square().sum()) for k in true)
    return (error / norm) ** 0.5


@pytest.fixture(scope="module")
def round_one(trainer, initial_state, synthetic_pubmedvision, tmp_path_factory) -> dict:
    """One learning round from the initial weights, its checkpoint saved straight after.

    `trained`: the fp32 master weights the round ended with; `state`: `trainer.state_dict()` when checkpointed.
    """
    held_out = _records(synthetic_pubmedvision)[NUM_TRAIN:]
    trainer.config = replace(trainer.config, learning_rate=1e-2, max_steps=15, warmup_ratio=0.1)
    trainer.load_global_state(initial_state)
    loss_before = _eval_loss(trainer, held_out, synthetic_pubmedvision)
    result = trainer.train_round(initial_state)
    trained = _fp32_weights(trainer)
    loss_after = _eval_loss(trainer, held_out, synthetic_pubmedvision)
    checkpoint = tmp_path_factory.mktemp("ckpt") / "round-1"
    trainer.save_checkpoint(str(checkpoint))
    return {
        "result": result,
        "before": loss_before,
        "after": loss_after,
        "checkpoint": checkpoint,
        "trainer": trainer,
        "trained": trained,
        "trainable": _trainable_keys(trainer),
        "state": trainer.state_dict(),
    }


def test_loss_falls_on_learnable_data(round_one):
    assert round_one["after"] < round_one["before"] - 3.0, round_one
    metrics = round_one["result"].metrics
    assert metrics["steps"] == 15 and metrics["samples"] == 15 * 2
    assert metrics["skipped_samples"] == 0 and metrics["truncated_samples"] == 0
    assert round_one["after"] < metrics["loss"] < round_one["before"]
    assert metrics["seconds"] > 0


def test_update_is_bf16_cpu_for_the_trained_parameters_only(round_one, initial_state):
    update = round_one["result"].update
    # exactly the trainable parameters (defaults: LLM and mergers, not the vision tower), no tied lm_head copy
    assert update.keys() == round_one["trainable"] and update.keys() < initial_state.keys()
    assert "lm_head.weight" not in update and "model.language_model.embed_tokens.weight" in update
    vision = [k for k in initial_state if k.startswith("model.visual.") and "merger" not in k]
    assert vision and not update.keys() & set(vision)
    assert all(update[k].shape == initial_state[k].shape for k in update)
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in update.values())


def test_frozen_parts_unchanged_trained_parts_changed(trainer, round_one, initial_state):
    update, trained = round_one["result"].update, round_one["trained"]
    vision = [k for k in initial_state if k.startswith("model.visual.") and "merger" not in k]
    mergers = [
        k for k in initial_state if k.startswith(("model.visual.merger.", "model.visual.deepstack_merger_list."))
    ]
    assert vision and mergers
    params = dict(trainer.model.named_parameters())
    for key in vision:  # frozen: left out of the update, and the weights did not move
        assert key not in update and not params[key].requires_grad
        assert torch.equal(trained[key], initial_state[key].float()), key
    changed = [k for k in update if update[k].any()]
    assert set(mergers) <= set(changed)
    assert "model.language_model.layers.1.mlp.down_proj.weight" in changed
    # the update is the trainer's fp32 weights minus the bf16 start, rounded to bf16 once (so within half a bf16
    # step of the change itself): initial + update is the trained model
    expected = _exact_update(trained, initial_state, update)
    assert all(torch.equal(update[k], expected[k]) for k in update)
    true = {k: trained[k] - initial_state[k].float() for k in update}
    assert _relative_error(update, true) <= 2**-8


@pytest.mark.parametrize("llm,mlp,vision", [(True, True, False), (False, True, True), (True, False, False)])
def test_set_trainable_follows_train_qwen_mapping(trainer, llm, mlp, vision):
    config = replace(trainer.config, tune_mm_llm=llm, tune_mm_mlp=mlp, tune_mm_vision=vision)
    try:
        set_trainable(trainer.model, config)
        for name, param in trainer.model.named_parameters():
            if "merger" in name:
                expected = mlp
            elif name.startswith("model.visual."):
                expected = vision
            else:
                assert name.startswith("model.language_model."), name
                expected = llm
            assert param.requires_grad == expected, name
        assert trainer.model.lm_head.weight.requires_grad == llm
    finally:
        set_trainable(trainer.model, trainer.config)


def test_checkpoint_round_trip(round_one, initial_state):
    from transformers import AutoProcessor

    from model import load_hf_model, untied_state_dict

    loaded = load_state_dict_from_checkpoint(str(round_one["checkpoint"]))
    state = round_one["state"]  # trainer.state_dict() when the checkpoint was saved: the trained weights in bf16
    assert state.keys() == initial_state.keys()
    assert all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in round_one["trained"].items())
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    model = load_hf_model(str(round_one["checkpoint"]))
    assert model.dtype == torch.bfloat16
    config = json.loads((round_one["checkpoint"] / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == "bfloat16"  # what dtype="auto" loads
    assert trainer_is_fp32(round_one)
    assert all(torch.equal(v, state[k]) for k, v in untied_state_dict(model).items())
    assert (
        AutoProcessor.from_pretrained(round_one["checkpoint"]).tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    )


def trainer_is_fp32(round_one) -> bool:
    return round_one["trainer"].model.config.dtype == torch.float32 and all(
        p.dtype == torch.float32 for p in round_one["trainer"].model.parameters()
    )


def _assert_round_started_from(trainer: LocalTrainer, update: dict[str, torch.Tensor], start: dict) -> None:
    """The update is the trainer's fp32 weights minus `start`: only so if the round started from `start`."""
    trained = _fp32_weights(trainer)
    true = {k: trained[k] - start[k].float() for k in update}
    assert update.keys() == _trainable_keys(trainer)
    assert sum(int(t.count_nonzero()) for t in true.values()) > 0  # the round learned something
    assert _relative_error(update, true) <= 2**-8  # bf16 rounding of the change, nothing more
    expected = _exact_update(trained, start, update)
    assert all(torch.equal(update[k], expected[k]) for k in update)


def _small_round(trainer: LocalTrainer, **overrides) -> None:
    """Set up a cheap learning round: one step at a small constant learning rate (other tests leave theirs behind)."""
    settings = dict(learning_rate=1e-5, max_steps=1, warmup_ratio=0.0, lr_scheduler_type="constant", bf16=False,
                    per_device_train_batch_size=2)  # fmt: skip
    trainer.config = replace(trainer.config, **{**settings, **overrides})


def test_a_released_global_state_is_emptied_after_loading(trainer, initial_state):
    _small_round(trainer)
    trainer.load_global_state({k: (v.float() * 1.5).to(torch.bfloat16) for k, v in initial_state.items()})
    given = dict(initial_state)
    result = trainer.train_round(given, release_global_state=True)
    assert given == {}  # the caller's host copy is gone before training, not after
    _assert_round_started_from(trainer, result.update, initial_state)  # and it was loaded first


def test_second_round_starts_from_the_passed_global_weights(trainer, round_one, initial_state):
    # The model holds round one's weights; a round from initial_state must start there, not where the model was.
    trainer.load_global_state(round_one["state"])
    assert not all(torch.equal(round_one["state"][k], initial_state[k]) for k in initial_state)
    _small_round(trainer)
    result = trainer.train_round(initial_state)
    _assert_round_started_from(trainer, result.update, initial_state)
    # measured from round one's weights instead, the change is nothing like the update
    trained = _fp32_weights(trainer)
    from_round_one = {k: trained[k] - round_one["state"][k].float() for k in result.update}
    assert _relative_error(result.update, from_round_one) > 0.9
    assert result.metrics["steps"] == 1


def test_round_metrics_count_skipped_and_truncated_samples(trainer, synthetic_pubmedvision, tmp_path):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "broken.jpg").write_bytes(b"not an image")
    good = [r for r in _records(synthetic_pubmedvision) if len(r["image"]) == 1][:2]
    for record in good:
        (root / record["image"][0]).write_bytes((synthetic_pubmedvision / record["image"][0]).read_bytes())
    broken = {**good[0], "id": "broken-1", "image": ["images/broken.jpg"]}
    missing = {**good[0], "id": "missing-1", "image": ["images/missing.jpg"]}
    first_label = int((_dataset(good, root, trainer.processor).encode(0)["labels"] != IGNORE_INDEX).nonzero()[0])
    dataset, trainer.dataset = (
        trainer.dataset,
        _dataset([broken, *good, missing], root, trainer.processor, first_label + 1),
    )
    _small_round(trainer, per_device_train_batch_size=3)
    try:
        metrics = trainer.train_round().metrics
    finally:
        trainer.dataset = dataset
    assert (metrics["samples"], metrics["skipped_samples"], metrics["truncated_samples"]) == (3, 2, 3)


def test_a_sample_without_labels_is_skipped_and_counted(synthetic_pubmedvision, processor, trainer, caplog):
    """If no header matches (here: only a lone "\\n" after the header counts, as before), the sample is not trained
    on in silence: it is skipped, and the round counts it."""
    records = [r for r in _records(synthetic_pubmedvision) if len(r["image"]) == 1][:3]
    leading = {**records[0], "id": "leading-newline", "conversations": [records[0]["conversations"][0],
               {"from": "gpt", "value": "\n\nAnswer."}]}  # fmt: skip
    dataset = _dataset([leading, *records[1:]], synthetic_pubmedvision, processor)
    dataset.newline_ids = {processor.tokenizer.convert_tokens_to_ids("\u010a")}
    with pytest.raises(SkipSample, match="leading-newline.*no answer token"):
        dataset.encode(0)
    with caplog.at_level(logging.WARNING, logger="local_trainer"):
        assert dataset[0]["skipped_no_labels"] == 1 and "leading-newline" in caplog.text
    original, trainer.dataset = trainer.dataset, dataset
    _small_round(trainer, per_device_train_batch_size=3)
    try:
        metrics = trainer.train_round().metrics
    finally:
        trainer.dataset = original
    assert (metrics["samples"], metrics["skipped_no_labels"], metrics["skipped_samples"]) == (3, 1, 1)


def test_global_state_that_does_not_fit_is_refused_untouched(trainer, initial_state):
    before = trainer.state_dict()
    key = "model.language_model.norm.weight"
    with_lm_head = {**initial_state, "lm_head.weight": initial_state["model.language_model.embed_tokens.weight"]}
    trainer.load_global_state(with_lm_head)  # the tied copy may travel along
    bad_shape = {**initial_state, key: torch.zeros(3)}
    missing = {k: v for k, v in initial_state.items() if k != key}
    for bad, reason in [(bad_shape, "wrong shapes .*norm.weight"), (missing, "missing .*norm.weight")]:
        trainer.load_global_state(before)
        with pytest.raises(ValueError, match=reason):
            trainer.load_global_state(bad)
        assert all(torch.equal(v, before[k]) for k, v in trainer.state_dict().items())


def test_tensors_left_out_as_unchanged_keep_their_values(trainer, initial_state):
    """A global state without the tensors named `unchanged` loads the others and leaves those as they are; without
    naming them, their absence is refused."""
    visual = {k for k in initial_state if k.startswith("model.visual.")}
    assert visual and trainer.keeps_unchanged
    shifted = {k: (v.float() + 0.5).to(torch.bfloat16) for k, v in initial_state.items()}
    trainer.load_global_state(shifted)
    slim = {k: v for k, v in initial_state.items() if k not in visual}
    with pytest.raises(ValueError, match="missing .*model.visual"):
        trainer.load_global_state(slim)
    trainer.load_global_state(slim, unchanged=visual)
    now = trainer.state_dict()
    assert all(torch.equal(now[k], shifted[k]) for k in visual)
    assert all(torch.equal(now[k], initial_state[k]) for k in slim)


def test_fp32_master_weights_keep_a_small_update_and_send_it(trainer, initial_state):
    _small_round(trainer, bf16=True)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    update = trainer.train_round(initial_state).update[key]
    before = initial_state[key].float()
    delta = dict(trainer.model.named_parameters())[key].detach() - before
    moved = delta != 0
    assert moved.float().mean() > 0.9  # the step reached the fp32 master weights
    assert delta.abs().max() < 2e-5  # and it was a small (Adam: ~lr) step
    # what leaves the site keeps it: every moved weight has a nonzero update, within bf16 rounding of the step
    assert torch.equal(update != 0, moved)
    torch.testing.assert_close(update.float(), delta, rtol=2**-8, atol=0)
    # the same step applied in bf16 to the bf16 weights would vanish for most of them
    bf16_after = initial_state[key] + delta.to(torch.bfloat16)
    lost = (bf16_after == initial_state[key]) & moved
    assert lost.float().mean() > 0.5


@pytest.mark.parametrize("learning_rate,lost_before", [(5e-7, 0.9), (1e-5, 0.5)])
def test_the_update_retains_a_small_round(trainer, initial_state, learning_rate, lost_before):
    """A few Adam steps at fine-tuning learning rates move each weight by far less than half a bf16 step of the
    weight: the update (fp32 change rounded once) must keep the change; the trained weights rounded to bf16 lose it."""
    _small_round(trainer, learning_rate=learning_rate, max_steps=4)
    update = trainer.train_round(initial_state).update
    trained = _fp32_weights(trainer)
    true = {k: trained[k] - initial_state[k].float() for k in update}
    assert sum(int(t.count_nonzero()) for t in true.values()) > 0.5 * sum(t.numel() for t in true.values())
    assert _relative_error(update, true) <= 0.01
    # For contrast, what was sent before (the trained weights rounded to bf16) keeps little of the change: measured
    # on the tiny model, relative error 0.99 at 5e-7 and 0.76 at 1e-5 (the update's: 0.002 at both).
    sent_before = {k: trained[k].to(torch.bfloat16).float() - initial_state[k].float() for k in update}
    assert _relative_error(sent_before, true) > lost_before


def test_the_round_number_seeds_the_data_order(trainer, initial_state):
    seed = trainer.config.seed
    assert trainer._training_arguments(3).data_seed == trainer._training_arguments(3).data_seed == seed + 3
    assert trainer._training_arguments(4).data_seed == seed + 4
    # End to end: the first step's loss (computed before any update) and the update depend on the order the round
    # draws its batches in: the same round number gives the same round, the next one another.
    _small_round(trainer)
    first, again, other = (trainer.train_round(initial_state, round_num=n) for n in (5, 5, 6))
    assert trainer.round == 7
    assert first.metrics["loss"] == again.metrics["loss"] != other.metrics["loss"]
    assert all(torch.equal(first.update[k], again.update[k]) for k in first.update)
    assert not all(torch.equal(first.update[k], other.update[k]) for k in first.update)
    trainer.train_round(initial_state, round_num=5)
    assert trainer.round == 6  # rounds go on from the federation's round, not from how many this trainer ran


def _logged_lrs(caplog, round_num: int) -> list[float]:
    """The learning rate of each optimizer step of round `round_num`, as the trainer logged it."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"round {round_num} learning rate")]
    return json.loads(lines[-1].split(": ", 1)[1])


@pytest.mark.parametrize("schedule", ["run", "round"])
def test_one_learning_rate_schedule_over_the_run(trainer, initial_state, caplog, schedule):
    """2 rounds of 2 steps, cosine with warmup: `run` warms up once and decays over the 4 steps (the second round
    continues where the first left off, whichever order they run in); `round` restarts it every round (a sawtooth,
    each round's first step at lr 0)."""
    _small_round(trainer, learning_rate=1e-3, max_steps=2, warmup_ratio=0.25, lr_scheduler_type="cosine")
    trainer.config = replace(trainer.config, lr_schedule=schedule)
    lrs, metrics = {}, {}
    with caplog.at_level(logging.INFO, logger="local_trainer"):
        for round_num in (1, 0):  # a rebuilt or resumed trainer starts at round 1: its place comes from round_num
            metrics[round_num] = trainer.train_round(initial_state, round_num=round_num, total_rounds=2).metrics
            lrs[round_num] = _logged_lrs(caplog, round_num)
    steps = lrs[0] + lrs[1]
    assert [metrics[r]["lr_first"] for r in (0, 1)] == [lrs[0][0], lrs[1][0]]
    assert [metrics[r]["lr_last"] for r in (0, 1)] == [lrs[0][-1], lrs[1][-1]]
    if schedule == "run":  # warmup of ceil(0.25 * 4) = 1 step at half the peak, then cosine over the other 3
        expected = [0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]
        assert steps == pytest.approx([1e-3 * f for f in expected], rel=1e-6)
        assert all(lr > 0 for lr in steps) and steps.index(max(steps)) == 1
    else:  # HF's schedule, fresh each round: warmup of ceil(0.25 * 2) = 1 step from 0, then the peak
        assert steps == pytest.approx([0.0, 1e-3, 0.0, 1e-3])


def test_run_schedule_falls_back_to_one_per_round_without_total_rounds(trainer, initial_state, caplog):
    _small_round(trainer, learning_rate=1e-3, max_steps=2, warmup_ratio=0.25, lr_scheduler_type="cosine")
    trainer.config = replace(trainer.config, lr_schedule="run")
    trainer._warned_schedule = False
    with caplog.at_level(logging.INFO, logger="local_trainer"):
        trainer.train_round(initial_state, round_num=0)
        trainer.train_round(initial_state, round_num=1)
    assert _logged_lrs(caplog, 0) == _logged_lrs(caplog, 1) == pytest.approx([0.0, 1e-3])
    assert caplog.text.count("--lr_schedule run needs the run's number of rounds") == 1  # said once


def test_run_lr_factor_shapes():
    from local_trainer import run_lr_factor

    assert [run_lr_factor(s, "linear", 1, 5) for s in range(5)] == pytest.approx([0.5, 1, 0.75, 0.5, 0.25])
    assert [run_lr_factor(s, "constant", 2, 5) for s in range(5)] == [1.0] * 5  # as HF's constant: no warmup
    assert [run_lr_factor(s, "constant_with_warmup", 2, 5) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    assert run_lr_factor(0, "cosine", 0, 4) == 1.0 and run_lr_factor(3, "cosine", 0, 4) > 0


def test_lr_schedule_flag():
    assert parse_train_args([]).lr_schedule == "run"
    assert parse_train_args(["--lr_schedule", "round", "--lr_scheduler_type", "polynomial"]).lr_schedule == "round"
    with pytest.raises(ValueError, match="--lr_schedule run supports"):
        TrainConfig(lr_scheduler_type="polynomial")
    with pytest.raises(ValueError, match="--lr_schedule must be run or round"):
        TrainConfig(lr_schedule="epoch")


def _flat(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([update[k].float().flatten() for k in sorted(update)])


def test_fedprox_pulls_the_trained_weights_toward_the_global_model(trainer, initial_state):
    """mu = 0 is no FedProx (no copy of the global weights, the same update); mu > 0 keeps the round's weights
    near the global ones; the term is added once per optimizer step, so accumulating 2 x 1 sample is 1 x 2."""
    _small_round(trainer, learning_rate=1e-3, max_steps=4)
    updates = {}
    for name, mu, batch, accumulation in [("off", 0.0, 2, 1), ("again", 0.0, 2, 1), ("prox", 1.0, 2, 1),
                                          ("prox_accumulated", 1.0, 1, 2)]:  # fmt: skip
        trainer.config = replace(trainer.config, fedprox_mu=mu, per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation)  # fmt: skip
        if mu == 0:
            assert not trainer._round_trainer(3, None).global_weights  # off: no copy, no gradient hook
        updates[name] = _flat(trainer.train_round(initial_state, round_num=3).update)
    trainer.config = replace(trainer.config, fedprox_mu=0.0, gradient_accumulation_steps=1)
    assert torch.equal(updates["off"], updates["again"])
    assert updates["prox"].norm() < 0.7 * updates["off"].norm()
    same_step = (updates["prox_accumulated"] - updates["prox"]).norm() / updates["prox"].norm()
    assert same_step < 1e-3, same_step  # added per micro-batch instead: 0.12


def test_round_trainer_counts_flops_as_hugging_face_does(trainer):
    from transformers import Trainer

    round_trainer = trainer._round_trainer(0, None)
    inputs = {"input_ids": torch.ones(1, 37, dtype=torch.long)}
    assert round_trainer.floating_point_ops(inputs) == Trainer.floating_point_ops(round_trainer, inputs) > 0
    assert round_trainer.floating_point_ops({"pixel_values": torch.ones(3)}) == 0


def test_keep_optimizer_state_carries_adam_across_rounds_and_restarts(trainer, initial_state, tmp_path):
    saved = tmp_path / "optimizer.pt"
    _small_round(trainer, learning_rate=1e-3, max_steps=2, output_dir=str(tmp_path))
    off = trainer.train_round(initial_state, round_num=0)
    assert not list(tmp_path.iterdir())  # off: nothing saved

    def steps_and_moments() -> tuple[set[float], dict[str, torch.Tensor]]:
        state = torch.load(saved, weights_only=True)
        assert state.keys() == _trainable_keys(trainer)
        return {float(s["step"]) for s in state.values()}, {k: s["exp_avg"] for k, s in state.items()}

    trainer.config = replace(trainer.config, keep_optimizer_state=True)
    try:
        first = trainer.train_round(initial_state, round_num=0)
        steps, first_moments = steps_and_moments()
        assert steps == {2.0} and not list(tmp_path.glob("*.tmp"))
        # no earlier state: the same round as without the flag
        assert all(torch.equal(first.update[k], off.update[k]) for k in off.update)
        second = trainer.train_round(initial_state, round_num=0)
        steps, second_moments = steps_and_moments()
        assert steps == {4.0}  # the second round went on from the first's 2 steps
        assert not all(torch.equal(first.update[k], second.update[k]) for k in first.update)  # with its moments
        restarted = LocalTrainer(trainer.config)  # a restarted site, same work folder
        restarted.train_round(initial_state, round_num=0)
        assert steps_and_moments()[0] == {6.0}
    finally:
        trainer.config = replace(trainer.config, keep_optimizer_state=False)
    assert any(not torch.equal(first_moments[k], second_moments[k]) for k in first_moments)


def test_optim_trains_with_the_hugging_face_optimizer_it_names(trainer, initial_state):
    """--optim goes to Hugging Face's TrainingArguments: sgd keeps no moments (3 sites of the 2B fit one GPU)."""
    lr = 1e-2
    moved = {}
    try:
        for optim in ("sgd", "adamw_torch"):
            _small_round(trainer, optim=optim, learning_rate=lr)
            optimizer = trainer._round_trainer(0, None).create_optimizer()
            assert isinstance(optimizer, torch.optim.SGD if optim == "sgd" else torch.optim.AdamW), optim
            update = trainer.train_round(initial_state, round_num=0).update
            moved[optim] = torch.cat([u.float().abs().flatten() for u in update.values()]).max().item()
    finally:
        trainer.config = replace(trainer.config, optim="adamw_torch")
    # AdamW's first step moves a weight with a gradient by about lr; SGD by lr times its (clipped, small) gradient
    assert moved["adamw_torch"] == pytest.approx(lr, rel=0.05) and 0 < moved["sgd"] < lr / 2, moved


def test_evaluate_is_the_answer_only_loss_and_leaves_the_round_alone(trainer, initial_state, synthetic_pubmedvision,
                                                                    tmp_path):  # fmt: skip
    records = _records(synthetic_pubmedvision)[NUM_TRAIN : NUM_TRAIN + 5]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(records))
    _small_round(trainer, learning_rate=1e-3, max_steps=2)
    trainer.load_global_state(initial_state)
    # by hand: HF's own loss (mean over the labelled tokens) of each record alone, weighted by its answer tokens
    dataset = _dataset(records, synthetic_pubmedvision, trainer.processor)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = trainer.collator([dataset.encode(i)])
            batch.pop("sample_counts")
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss_sum, tokens = loss_sum + float(trainer.model(**batch).loss) * n, tokens + n
    weights = _fp32_weights(trainer)
    result = trainer.evaluate(str(path))
    assert result.pop("val_seconds") > 0
    assert result == {"val_loss": pytest.approx(loss_sum / tokens, rel=1e-4), "val_samples": 5, "val_tokens": tokens}
    assert all(torch.equal(p, weights[k]) for k, p in trainer.model.named_parameters())
    assert trainer.evaluate(str(path), max_samples=2)["val_samples"] == 2
    # before training, on the received weights; the round is the same as without it
    plain = trainer.train_round(initial_state, round_num=3)
    evaluated = trainer.train_round(initial_state, round_num=3, evaluate_on=str(path))
    assert evaluated.metrics["val_loss"] == result["val_loss"] and evaluated.metrics["val_tokens"] == tokens
    assert "val_loss" not in plain.metrics and plain.metrics["loss"] == evaluated.metrics["loss"]
    assert all(torch.equal(plain.update[k], evaluated.update[k]) for k in plain.update)


def test_evaluate_scores_greedy_answers_of_the_received_model(trainer, initial_state, synthetic_pubmedvision,
                                                              tmp_path):  # fmt: skip
    """With generate_samples, the round's val_* metrics include run_inference.py's generation metrics of the received
    weights' answers to the first records of the file, as score_records computes them on the same weights."""
    import varlen_attention
    from run_inference import score_records

    records = _records(synthetic_pubmedvision)[NUM_TRAIN : NUM_TRAIN + 5]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(records))
    trainer.config = replace(trainer.config, learning_rate=1e-3, max_steps=1)
    result = trainer.train_round(initial_state, round_num=0, evaluate_on=str(path), generate_samples=3,
                                 max_new_tokens=6)  # fmt: skip
    trainer.load_global_state(initial_state)
    with varlen_attention.standard_attention(trainer.model):  # generation takes padded batches, not packed rows
        expected = score_records(trainer.model, trainer.processor, records[:3], trainer.config.image_root,
                                 batch_size=3, max_new_tokens=6)  # fmt: skip
    got = {k: result.metrics[f"val_{k}"] for k in ("exact_match", "token_f1")}
    assert got == {k: expected[k] for k in got} and result.metrics["val_generated"] == 3
    assert result.metrics["val_samples"] == 5  # the loss is over the whole file
    no_generation = trainer.train_round(initial_state, round_num=0, evaluate_on=str(path))
    assert "val_generated" not in no_generation.metrics


def test_every_round_computes_in_bf16_only_when_asked_and_frees_its_optimizer(trainer, initial_state):
    layer = trainer.model.model.language_model.layers[0].mlp.down_proj
    seen: list[torch.dtype] = []
    hook = layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        for bf16 in (True, True, False, True):  # repeated rounds on one model, as in an FL job
            seen.clear()
            trainer.config = replace(trainer.config, learning_rate=1e-5, max_steps=1, bf16=bf16)
            trainer.train_round(initial_state)
            assert seen and set(seen) == {torch.bfloat16 if bf16 else torch.float32}
    finally:
        hook.remove()
    gc.collect()
    assert not [o for o in gc.get_objects() if issubclass(type(o), torch.optim.Optimizer)]
    assert "forward" not in vars(trainer.model)  # no autocast wrapper left on the model
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


# -------------------------------------------------------------------------------------------------------- torchrun


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_two_ranks_on_cpu(tiny_model_dir, site_dir, synthetic_pubmedvision, initial_state, tmp_path, sharding):
    out = tmp_path / "ckpt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "local_trainer.py"),
        "--model_name_or_path", str(tiny_model_dir), "--dataset_use", str(site_dir),
        "--image_root", str(synthetic_pubmedvision), "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
        "--warmup_ratio", "0", "--bf16", "False", "--gradient_checkpointing", "True", "--logging_steps", "1",
        "--dataloader_num_workers", "1", *sharding,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    per_rank = {int(r): int(n) for r, n in re.findall(r"rank (\d) trained on (\d+) samples", log)}
    assert per_rank == {0: 4, 1: 4}, log[-4000:]
    metrics = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"loss"')))
    assert metrics["samples"] == 8 and metrics["steps"] == 2
    state = load_state_dict_from_checkpoint(str(out))
    assert state.keys() == initial_state.keys()
    assert not torch.equal(
        state["model.visual.merger.linear_fc2.weight"], initial_state["model.visual.merger.linear_fc2.weight"]
    )


@pytest.fixture(scope="module")
def fsdp_run(tiny_model_dir, site_dir, synthetic_pubmedvision, tmp_path_factory) -> dict:
    """tests/fsdp_worker.py under torchrun, 2 ranks with --fsdp on CPU (gloo): its results, per rank."""
    out = tmp_path_factory.mktemp("fsdp")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "tests" / "fsdp_worker.py"),
        str(out), str(tiny_model_dir), str(site_dir), str(synthetic_pubmedvision),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=out)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return {"ranks": json.loads((out / "results.json").read_text()), "out": out}


@pytest.mark.slow
def test_fsdp_shards_the_model_once_and_reuses_it_every_round(fsdp_run):
    for rank, results in enumerate(fsdp_run["ranks"]):
        assert results["rank"] == rank and results["world_size"] == 2
        assert results["model_class"] == "FSDPQwen3VLForConditionalGeneration"  # not wrapped in DDP
        assert results["embedding_rows_here"] * 2 == results["embedding_rows"] == 151936  # each rank holds half
        units, units_after = results["fsdp_units"]
        assert units == units_after >= 1 + 2 + 2  # root, 2 decoder layers, 2 vision blocks; no unit added later
        assert results["param_dtypes"] == ["torch.float32"]  # fp32 master weights (and so fp32 Adam state)
        assert results["first_metrics"]["steps"] == 3 and results["first_metrics"]["samples"] == 3 * 2 * 2 * 2
        assert results["second_metrics"]["steps"] == 1
        assert results["optimizers_left"] == 0  # each round's optimizer state is freed
        assert "missing 'model.language_model.norm.weight'" in results["refused"]  # refused on every rank, no hang
    assert [r["update_on_rank"] for r in fsdp_run["ranks"]] == [[True, True], [False, False]]


@pytest.mark.slow
def test_fsdp_evaluates_the_received_model_with_fedprox_and_kept_state(fsdp_run, tiny_model_dir, site_dir,
                                                                        synthetic_pubmedvision, tmp_path):  # fmt: skip
    """Round 3 under FSDP scores the received model (every rank in step, generation too) as one process does, and
    trains with FedProx and a kept optimizer state (one file per rank)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fsdp_worker import config

    ranks = [r["third_metrics"] for r in fsdp_run["ranks"]]
    assert all(r["optimizer_file"] for r in fsdp_run["ranks"]) and ranks[0]["steps"] == 1
    single = LocalTrainer(config(str(tiny_model_dir), str(site_dir), str(synthetic_pubmedvision), str(tmp_path)))
    single.load_global_state(load_state_dict_from_checkpoint(str(tiny_model_dir)))
    expected = single.evaluate(str(site_dir), generate_samples=2, max_new_tokens=4)
    for metrics in ranks:
        assert metrics["val_samples"] == expected["val_samples"] and metrics["val_generated"] == 2
        assert metrics["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
        assert metrics["val_token_f1"] == expected["val_token_f1"]


@pytest.mark.slow
def test_fsdp_loads_the_global_state_into_the_shards_and_gathers_it_back(fsdp_run, initial_state):
    from safetensors.torch import load_file

    rank0 = fsdp_run["ranks"][0]
    # Each round's gathered update is the gathered fp32 weights minus the bf16 weights it was given, rounded once
    # to bf16: round 2 (lr 1e-5) started from the initial weights, not from round 1's that the model held.
    for check in (rank0["first_started_from_initial"], rank0["second_started_from_initial"]):
        assert check["same_keys"] and check["on_cpu"] and check["exact"], check
        assert check["true_change_norm"] > 0 and check["relative_error"] <= 2**-8, check
    assert rank0["read_back_is_first"]  # load round 1's weights, state_dict() gives the same
    state = load_file(str(fsdp_run["out"] / "round1.safetensors"))
    assert state.keys() == initial_state.keys() and "lm_head.weight" not in state
    assert all(state[k].shape == initial_state[k].shape and state[k].dtype == torch.bfloat16 for k in state)
    vision = [k for k in state if k.startswith("model.visual.") and "merger" not in k]
    assert all(torch.equal(state[k], initial_state[k]) for k in vision)  # frozen, as without FSDP
    update = load_file(str(fsdp_run["out"] / "update1.safetensors"))
    assert update.keys() == initial_state.keys() - set(vision) and "lm_head.weight" not in update  # trained only
    assert all(update[k].shape == initial_state[k].shape and update[k].dtype == torch.bfloat16 for k in update)
    saved = load_state_dict_from_checkpoint(str(fsdp_run["out"] / "ckpt"))  # saved by both ranks together
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


@pytest.mark.slow
def test_fsdp_rounds_match_one_unsharded_process(fsdp_run, tiny_model_dir, site_dir, synthetic_pubmedvision, tmp_path):
    """Same data order, seed and lr: 2 ranks x batch 2 under FSDP against 1 process x batch 4 (--fsdp is a no-op)."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "tests"))
    from fsdp_worker import config

    paths = (str(tiny_model_dir), str(site_dir), str(synthetic_pubmedvision), str(tmp_path))
    single = LocalTrainer(config(*paths, per_device_train_batch_size=4, fsdp=True))
    assert not single.fsdp
    initial = load_state_dict_from_checkpoint(str(tiny_model_dir))
    reference = single.train_round(initial)
    sharded = fsdp_run["ranks"][0]["first_metrics"]
    assert sharded["loss"] == pytest.approx(reference.metrics["loss"], rel=1e-5)
    assert sharded["samples"] == reference.metrics["samples"]
    from_fsdp = load_file(str(fsdp_run["out"] / "update1.safetensors"))  # rank 0's update of the sharded round
    assert from_fsdp.keys() == reference.update.keys()
    sharded_update, single_update = (
        torch.cat([u[k].float().flatten() for k in sorted(u)]) for u in (from_fsdp, reference.update)
    )
    assert sharded_update.norm() > 0
    assert torch.nn.functional.cosine_similarity(sharded_update, single_update, dim=0) > 0.99
    # the fp32 changes differ by summation order only (2 x 2 samples against 4): within the update's bf16 rounding
    assert (sharded_update - single_update).norm() / single_update.norm() < 2**-8
    assert (sharded_update != single_update).float().mean() < 1e-3  # bf16 values: a few round the other way


def test_answer_only_loss_equals_the_full_causal_lm_loss(trainer):
    from local_trainer import answer_only_loss, answer_positions

    batch = trainer.collator([trainer.dataset[i] for i in range(3)])
    batch.pop("sample_counts")
    with torch.no_grad():
        full = trainer.model(**batch).loss
        labels = batch.pop("labels")
        sliced = trainer.model(**batch, logits_to_keep=answer_positions(labels))
        assert sliced.logits.shape[0] == int((labels[:, 1:] != -100).sum()) < labels.numel()
        assert torch.allclose(answer_only_loss(sliced, labels), full, rtol=1e-5)


def test_compiled_cross_entropy_equals_eager_with_its_gradient():
    from local_trainer import compiled_cross_entropy, summed_cross_entropy

    logits = torch.randn(37, 1000, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 1000, (37,), generator=torch.Generator().manual_seed(1))
    results = []
    for cross_entropy in (summed_cross_entropy, compiled_cross_entropy()):
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, targets)
        loss.backward()
        results.append((loss.detach(), x.grad))
    assert results[0][0].dtype == results[1][0].dtype == torch.float32
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


@pytest.mark.slow
def test_torch_compile_trains_like_eager(trainer, initial_state):
    """--torch_compile (each decoder layer and vision block compiled) gives the eager trainer's loss and weights."""
    # fp32 compute: in bf16 the compiled kernels round differently; other tests leave their settings behind
    config = replace(
        trainer.config, learning_rate=1e-3, max_steps=2, warmup_ratio=0.0, bf16=False, per_device_train_batch_size=2
    )
    trainer.config = config
    compiled_trainer = LocalTrainer(replace(config, torch_compile=True))
    compiled_trainer.round = trainer.round  # the round number seeds the data order
    eager = trainer.train_round(initial_state)
    compiled = compiled_trainer.train_round(initial_state)
    assert compiled_trainer.model.model.language_model.layers[0]._compiled_call_impl is not None
    assert compiled.metrics["loss"] == pytest.approx(eager.metrics["loss"], rel=1e-4)
    assert compiled.update.keys() == eager.update.keys()
    compiled_update, eager_update = (
        torch.cat([u[k].float().flatten() for k in sorted(u)]) for u in (compiled.update, eager.update)
    )
    assert eager_update.norm() > 0
    # the same update, up to kernel-order rounding: well within its own bf16 rounding, a few values round otherwise
    assert (compiled_update - eager_update).norm() / eager_update.norm() < 2**-8
    assert (compiled_update != eager_update).float().mean() < 1e-2


def test_a_compiled_trainer_generates_its_evaluation_answers_eagerly(trainer, initial_state, synthetic_pubmedvision):
    """Generation grows the KV cache every step, which would recompile each compiled block until dynamo's limit:
    the evaluation's answers are generated with compilation off, and the same as the eager trainer's."""
    from torch._dynamo.utils import counters

    records = _records(synthetic_pubmedvision)[NUM_TRAIN : NUM_TRAIN + 2]
    compiled_trainer = LocalTrainer(replace(trainer.config, torch_compile=True, bf16=False))
    trainer.config = replace(trainer.config, bf16=False)
    for t in (trainer, compiled_trainer):
        t.load_global_state(initial_state)
    frames = counters["frames"]["total"]
    compiled = compiled_trainer._generation_metrics(records, max_new_tokens=4)
    assert counters["frames"]["total"] == frames  # dynamo saw no frame: nothing was compiled
    assert compiled == pytest.approx(trainer._generation_metrics(records, max_new_tokens=4), nan_ok=True)


COLLECTIVE_WORKER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from local_trainer import init_distributed

init_distributed()
if dist.get_rank() == 1:
    time.sleep(120)  # hung: never joins the all-reduce
start = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except Exception as e:
    print(f"rank 0 gave up after {time.monotonic() - start:.0f} s: {type(e).__name__}", flush=True)
    os._exit(3)
"""


def test_a_rank_that_hangs_fails_the_others_collective_after_the_collective_timeout(tmp_path):
    """init_distributed's process group times collectives out after $FL_COLLECTIVE_TIMEOUT seconds (job.py
    --collective_timeout): rank 0 gives up on an all-reduce that rank 1 never joins, and torchrun ends the site."""
    from job import free_port_base

    (tmp_path / "worker.py").write_text(COLLECTIVE_WORKER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port_base(0)}", str(tmp_path / "worker.py"), str(ROOT)]  # fmt: skip
    proc = subprocess.run(torchrun, capture_output=True, text=True, timeout=100, cwd=tmp_path,
                          env={**os.environ, COLLECTIVE_TIMEOUT_ENV: "3"})  # fmt: skip
    assert proc.returncode != 0
    assert re.search(r"rank 0 gave up after [3-9] s: RuntimeError", proc.stdout), proc.stdout + proc.stderr
