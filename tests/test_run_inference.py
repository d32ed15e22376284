"""run_inference.py: the three kinds of model path, compare mode, batching, the metrics, and clear errors."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import run_inference as ri
from model import Qwen3VLModel, load_hf_model

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max_new_tokens", "4", "--batch_size", "2"]


@pytest.fixture(scope="module")
def lively_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with larger random weights: its greedy answers vary with the input (the plain tiny model
    repeats its last prompt token, a newline, so all its answers decode to the empty string)."""
    model = load_hf_model(str(tiny_model_dir))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() >= 2 and "embed" not in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 4 / weight.shape[-1] ** 0.5)
    out = tmp_path_factory.mktemp("models") / "lively"
    model.save_pretrained(out)  # weights only: the processor must come from --base_model
    return out


@pytest.fixture(scope="module")
def global_checkpoint(lively_model_dir, tmp_path_factory) -> Path:
    """A server checkpoint of the lively weights, saved the way NVFlare's persistor does."""
    path = tmp_path_factory.mktemp("server") / "FL_global_model.pt"
    torch.save({"model": Qwen3VLModel(str(lively_model_dir)).state_dict(), "meta_props": {"round": 1}}, path)
    return path


def data_args(root: Path, n: int = 3) -> list[str]:
    return ["--data_file", str(root / "PubMedVision_InstructionTuning_VQA.json"), "--image_root", str(root)] + [
        "--num_samples",
        str(n),
    ]


# ----------------------------------------------------------------------------------------------------- metrics


def test_normalization_and_exact_match_are_squad_style():
    assert ri.normalize_answer("The  Lesion, in the LEFT lung!") == "lesion in left lung"
    assert ri.exact_match("A mass in the left lung.", "mass in left lung") == 1.0
    assert ri.exact_match("A mass in the right lung.", "mass in left lung") == 0.0


def test_token_f1_and_rouge_l_on_hand_computed_examples():
    # "cat sat down" vs "cat sat" (after dropping "the"): 2 shared, P = 2/3, R = 1 -> F = 0.8
    assert ri.token_f1("cat sat down", "the cat sat") == pytest.approx(0.8)
    # bags, not sets: one "no" of three is shared -> P = 1/3, R = 1 -> F = 0.5
    assert ri.token_f1("no no no", "no") == pytest.approx(0.5)
    # ROUGE-L is order-aware where token F1 is not: LCS("left lung mass seen", "mass seen in left lung") = 2
    prediction, reference = "left lung mass seen", "mass seen in left lung"
    assert ri.token_f1(prediction, reference) == pytest.approx(2 * 1 * 0.8 / 1.8)
    assert ri.rouge_l(prediction, reference) == pytest.approx(2 * 0.5 * 0.4 / 0.9)
    assert ri.lcs_length("a b c d e".split(), "b x d e".split()) == 3
    assert ri.rouge_l("mass seen", "mass seen") == 1.0
    assert ri.rouge_l("", "mass") == ri.token_f1("", "mass") == 0.0
    assert ri.rouge_l("", "") == ri.token_f1("the", "") == 1.0  # both empty after normalisation


def test_closed_questions_yes_no_and_lettered_options():
    yes = ri.closed_label("Is there a fracture?", "Yes, there is a fracture of the radius.")
    assert yes == {"kind": "yes_no", "label": "yes"}
    assert ri.closed_correct("yes.", yes) is True
    assert ri.closed_correct("There is no fracture.", yes) is False
    assert ri.closed_correct("A fracture of the radius.", yes) is False  # gives no yes/no at all

    question = "Which modality is this? A) CT, B) MRI or C) X-ray"
    options = ri.closed_label(question, "B) MRI")
    assert options["kind"] == "option" and options["label"] == "B"
    assert options["options"] == {"A": "CT", "B": "MRI", "C": "X-ray"}
    for answer, correct in [("B", True), ("The answer is B.", True), ("It is an MRI scan.", True), ("A) CT", False)]:
        assert ri.closed_correct(answer, options) is correct, answer
    assert ri.closed_correct("I cannot tell.", options) is False
    assert ri.closed_label("Which view? (A) axial (B) coronal", "(A)")["label"] == "A"

    assert ri.closed_label("Is there a lesion?", "No lesion is seen, yes, the lung is clear.")["label"] == "no"
    open_question = ri.closed_label("What does the image show?", "A mass in the left lung.")
    assert open_question is None and ri.closed_correct("Yes.", open_question) is None
    samples = [ri.Sample(0, "x", [], "Is it?", "yes"), ri.Sample(1, "y", [], "What is it?", "a mass")]
    summary = ri.summarize([ri.score("Yes", samples[0], yes), ri.score("A mass.", samples[1], None)])
    assert summary["closed_acc"] == 1.0 and summary["num_closed"] == 1 and summary["exact_match"] == 1.0


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        ("Yes, there is a fracture.", "yes"),
        ("No.", "no"),
        ("  **YES**  ", "yes"),
        ("No lesion is seen, yes", "no"),  # the leading verdict, not the first yes/no anywhere
        ("There is no fracture.", None),
        ("The answer is yes.", None),  # does not start with a verdict
        ("Nope", None),
        ("Yesterday's scan", None),
        ("", None),
    ],
)
def test_closed_answers_are_judged_by_their_leading_verdict(answer, verdict):
    assert ri.yes_no(answer) == verdict
    for label in ("yes", "no"):
        assert ri.closed_correct(answer, {"kind": "yes_no", "label": label}) is (verdict == label)


# -------------------------------------------------------------------------------------------------------- data


def test_samples_strip_image_tags_resolve_images_and_are_picked_first_n_or_by_seed(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "images" / name).write_bytes(b"")
    shard = {
        "id": "shard",
        "image": ["images/a.jpg", "images/b.jpg"],
        "conversations": [{"from": "human", "value": "<image>\n<image>\nCompare them."}, {"from": "gpt", "value": "X"}],
    }
    raw = {"id": "raw", "image": ["images/a.jpg"], "conversations": [{"from": "human", "value": "What is it?"}]}
    (tmp_path / "d.json").write_text(json.dumps([shard, raw] * 5))

    samples = ri.load_samples(str(tmp_path / "d.json"), str(tmp_path), num_samples=2, seed=None)
    assert [s.question for s in samples] == ["Compare them.", "What is it?"]
    assert samples[0].image_paths == [(tmp_path / "images" / n).resolve() for n in ("a.jpg", "b.jpg")]
    assert (samples[0].ground_truth, samples[1].ground_truth) == ("X", "")

    assert ri.select_indices(10, 3, None) == [0, 1, 2]
    assert ri.select_indices(10, 0, None) == list(range(10))
    picked = ri.select_indices(1000, 5, seed=7)
    assert picked == ri.select_indices(1000, 5, seed=7) and picked != [0, 1, 2, 3, 4] and len(set(picked)) == 5
    assert ri.select_indices(1000, 5, seed=8) != picked


def test_missing_image_names_the_record_and_path(synthetic_pubmedvision, tmp_path, tiny_model_dir, capsys):
    records = json.loads((synthetic_pubmedvision / "PubMedVision_InstructionTuning_VQA.json").read_text())[:3]
    records[1]["image"] = ["images/not_there.jpg"]
    (tmp_path / "d.json").write_text(json.dumps(records))
    argv = ["--model_path", str(tiny_model_dir), "--data_file", str(tmp_path / "d.json")]
    assert ri.main(argv + ["--image_root", str(synthetic_pubmedvision)]) == ri.USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert records[1]["id"] in err and str(synthetic_pubmedvision / "images" / "not_there.jpg") in err


# ------------------------------------------------------------------------------------------------ model paths


def test_batched_left_padded_generation_matches_one_by_one(lively_model_dir, tiny_model_dir, synthetic_pubmedvision):
    model, processor = ri.load_model(str(lively_model_dir), str(tiny_model_dir), "cpu", torch.float32, 784, 50176)
    assert processor.tokenizer.padding_side == "left"
    records = ri.load_records(synthetic_pubmedvision / "PubMedVision_InstructionTuning_VQA.json")
    samples = [ri.record_to_sample(r, i, synthetic_pubmedvision) for i, r in enumerate(records[:8])]
    samples = [s for s in samples if len(s.image_paths) == 2][:1] + [s for s in samples if len(s.image_paths) == 1][:1]
    samples[1].question = "Short?"  # prompts of different lengths, so the batch needs padding
    prompts = [(ri.load_images(s), s.question) for s in samples]

    batched = ri.generate_answers(model, processor, prompts, max_new_tokens=4, do_sample=False)
    single = [ri.generate_answers(model, processor, [p], max_new_tokens=4, do_sample=False)[0] for p in prompts]
    assert batched == single
    assert all(batched) and batched[0] != batched[1]  # answers depend on the prompt


def test_directory_processor_comes_from_the_directory_else_from_base_model(tiny_model_dir, lively_model_dir):
    model, processor = ri.load_model(str(tiny_model_dir), "no-such-org/no-such-model", "cpu", torch.float32, 784, 4096)
    text = processor.apply_chat_template(ri.build_messages(1, "Q?"), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (448, 448))], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # resized to 64x64 = 4096 pixels, 16-pixel patches
    with pytest.raises(ri.UserError, match="could not load the processor 'no-such-org/no-such-model'"):
        ri.load_model(str(lively_model_dir), "no-such-org/no-such-model", "cpu", torch.float32, 784, 4096)


def test_checkpoint_keys_bare_or_prefixed_load_into_the_base(lively_model_dir, tiny_model_dir):
    lively = Qwen3VLModel(str(lively_model_dir)).state_dict()
    for state in (lively, {f"model.{k}": v for k, v in lively.items()}):
        base = load_hf_model(str(tiny_model_dir))
        ri.apply_checkpoint(base, state, "ckpt", "base")
        assert all(torch.equal(base.state_dict()[k], v) for k, v in lively.items())
        assert base.lm_head.weight is base.get_input_embeddings().weight


def test_checkpoint_that_does_not_fit_the_base_says_how(
    lively_model_dir, tiny_model_dir, synthetic_pubmedvision, tmp_path
):
    state = Qwen3VLModel(str(lively_model_dir)).state_dict()
    dropped, reshaped = sorted(state)[:2]
    del state[dropped]
    state[reshaped] = torch.zeros(3)
    state["extra.weight"] = torch.zeros(2)
    torch.save({"model": state}, tmp_path / "bad.pt")
    argv = ["--model_path", str(tmp_path / "bad.pt"), "--base_model", str(tiny_model_dir)]
    expected = rf"1 missing keys \(e.g. \['{re.escape(dropped)}'\]\), 1 unexpected keys .*1 keys of another shape"
    with pytest.raises(ri.UserError, match=expected):
        ri.run(ri.parse_args(argv + data_args(synthetic_pubmedvision, 1)))

    torch.save({"meta_props": {}}, tmp_path / "empty.pt")
    with pytest.raises(ri.UserError, match="holds no state dict of tensors"):
        ri.read_checkpoint(tmp_path / "empty.pt")


@pytest.mark.parametrize(
    ("model_path", "message"),
    [
        ("./no/such/model", "model not found: ./no/such/model"),
        ("missing_FL_global_model.pt", "model not found"),
        ("no-such-org/no-such-model", "could not load the model 'no-such-org/no-such-model' (HF_HUB_OFFLINE is set"),
    ],
)
def test_bad_model_paths_give_one_clear_message(model_path, message, synthetic_pubmedvision, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: the Hub ID goes to from_pretrained, which fails
    assert ri.main(["--model_path", model_path, *data_args(synthetic_pubmedvision, 1)]) == ri.USER_ERROR_EXIT
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        ri.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "unset: ./data/test.json (held out by prepare_data.py --test_size) if it exists" in text
    assert "else the training shard ./data/site-1/train.json" in text and "(default: Qwen/Qwen3-VL-2B-Instruct)" in text


def test_default_data_file_is_the_held_out_test_file_and_the_scored_file_is_printed(
    tiny_model_dir, synthetic_pubmedvision, tmp_path, monkeypatch, capsys
):
    records = json.loads((synthetic_pubmedvision / "PubMedVision_InstructionTuning_VQA.json").read_text())
    (tmp_path / "data" / "site-1").mkdir(parents=True)
    (tmp_path / "data" / "site-1" / "train.json").write_text(json.dumps(records[:2]))
    monkeypatch.chdir(tmp_path)
    argv = ["--model_path", str(tiny_model_dir), "--image_root", str(synthetic_pubmedvision), "--num_samples", "1"]
    argv += FAST
    rows = ri.run(ri.parse_args(argv))
    captured = capsys.readouterr()
    assert rows[0]["id"] == records[0]["id"] and "Scoring ./data/site-1/train.json" in captured.out
    assert "no ./data/test.json" in captured.err and "training shard" in captured.err

    (tmp_path / "data" / "test.json").write_text(json.dumps(records[5:7]))
    rows = ri.run(ri.parse_args(argv))
    assert rows[0]["id"] == records[5]["id"] and "Scored ./data/test.json" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- score_records (per round)


def test_score_records_batched_equals_one_by_one_and_scores_sanely(
    lively_model_dir, tiny_model_dir, synthetic_pubmedvision
):
    model, processor = ri.load_model(str(lively_model_dir), str(tiny_model_dir), "cpu", torch.float32, 784, 50176)
    model.train()
    processor.tokenizer.padding_side = "right"  # as a trainer may leave it: restored after each call
    records = ri.load_records(synthetic_pubmedvision / "PubMedVision_InstructionTuning_VQA.json")[:8]
    common = {"image_root": synthetic_pubmedvision, "max_samples": 5, "max_new_tokens": 4}

    samples, batched = ri.answer_records(model, processor, records, batch_size=3, **common)
    _, single = ri.answer_records(model, processor, records, batch_size=1, **common)
    assert [s.id for s in samples] == [r["id"] for r in records[:5]] and batched == single
    assert len(set(batched)) > 1 and model.training and processor.tokenizer.padding_side == "right"

    scores = ri.score_records(model, processor, records, batch_size=3, **common)
    assert scores["num_samples"] == 5 and scores["num_closed"] == 0 and math.isnan(scores["closed_acc"])
    assert 0 <= scores["exact_match"] <= scores["token_f1"] < 1  # random answers: no reference matched

    # three references set to the model's own answers (matched exactly), two to "No" (closed, not matched)
    own = json.loads(json.dumps(records[:5]))
    for record, answer in zip(own, batched, strict=True):
        record["conversations"][1]["value"] = answer
    own[1]["conversations"][1]["value"] = own[3]["conversations"][1]["value"] = "No"
    _, own_answers = ri.answer_records(model, processor, own, batch_size=3, **common)
    assert own_answers == batched
    perfect = ri.score_records(model, processor, own, batch_size=2, **common)
    assert perfect["exact_match"] == 3 / 5 and perfect["num_closed"] == 2 and perfect["closed_acc"] == 0.0
    assert set(perfect) >= {"exact_match", "token_f1", "rouge_l", "closed_acc", "num_samples", "num_closed"}


def test_score_records_names_a_record_whose_image_is_missing(tiny_model_dir, synthetic_pubmedvision):
    model, processor = ri.load_model(str(tiny_model_dir), str(tiny_model_dir), "cpu", torch.float32, 784, 50176)
    record = {"id": "gone", "image": ["images/none.jpg"], "conversations": [{"from": "human", "value": "Q?"}]}
    with pytest.raises(ri.UserError, match="record gone: image not found"):
        ri.score_records(model, processor, [record], synthetic_pubmedvision)
    with pytest.raises(ri.UserError, match="no records to score"):
        ri.score_records(model, processor, [], synthetic_pubmedvision)


# ------------------------------------------------------------------------------------------------- end to end


def hub_cache_with(model_dir: Path, repo_id: str, cache: Path) -> Path:
    """A Hugging Face Hub cache that holds `model_dir` as `repo_id`, as a download would have left it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def test_cli_compares_hub_base_model_with_global_checkpoint(
    tiny_model_dir, global_checkpoint, synthetic_pubmedvision, tmp_path
):
    cache = hub_cache_with(tiny_model_dir, "tiny-org/tiny-qwen3-vl", tmp_path / "hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, str(ROOT / "run_inference.py"), "--model_path", "tiny-org/tiny-qwen3-vl"]
    cmd += ["--compare", str(global_checkpoint), "--base_model", "tiny-org/tiny-qwen3-vl", "--seed", "3"]
    cmd += ["--output", str(out), *FAST, *data_args(synthetic_pubmedvision, 3)]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr

    records = ri.load_records(synthetic_pubmedvision / "PubMedVision_InstructionTuning_VQA.json")
    picked = ri.select_indices(len(records), 3, seed=3)
    blocks = result.stdout.split("--- Sample ")[1:]
    assert len(blocks) == 3
    for block, index in zip(blocks, picked, strict=True):
        lines = block.splitlines()
        record = records[index]
        assert lines[0] == f"{blocks.index(block) + 1}/3 (id {record['id']}) ---"
        paths = [str(synthetic_pubmedvision / p) for p in record["image"]]
        assert lines[1] == f"Images ({len(paths)}): {', '.join(paths)}"
        assert lines[2] == f"Q: {record['conversations'][0]['value']}"
        assert lines[3] == f"Ground truth: {record['conversations'][1]['value']}"
        assert lines[4] == "Model (A: tiny-org/tiny-qwen3-vl): (empty answer)"  # the untrained base repeats "\n"
        assert lines[5].startswith(f"Model (B: {global_checkpoint}): ") and not lines[5].endswith("(empty answer)")
    assert "=== Metrics over 3 samples" in result.stdout

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == picked
    for row in rows:
        a, b = row["models"]["A"], row["models"]["B"]
        assert a["answer"] == "" and b["answer"] and b["model_path"] == str(global_checkpoint)
        assert b["token_f1"] == ri.token_f1(b["answer"], row["ground_truth"])
        assert b["rouge_l"] == ri.rouge_l(b["answer"], row["ground_truth"])
    assert not list(tmp_path.glob("*.tmp"))


def test_image_paths_outside_the_image_root_are_refused(tmp_path):
    """An absolute image path, or one that climbs out of --image_root, is refused naming the record (the trainer's
    rule), even when the file exists."""
    (tmp_path / "root").mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"")
    for image in (str(tmp_path / "secret.jpg"), "../secret.jpg"):
        record = {"id": "escape", "image": [image], "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}
        with pytest.raises(ri.UserError, match=r"record 'escape'.*(must be relative|escapes --image_root)"):
            ri.record_to_sample(record, 0, str(tmp_path / "root"))
