"""Tests for qwen_official.py, the `--trainer qwen` path through Qwen's own fine-tuning code.

The tests marked `official` need a checkout of QwenLM/Qwen3-VL at qwen_official.OFFICIAL_COMMIT in $QWEN3VL_ROOT and
are skipped without it; the training round also needs the environment of requirements-qwen-official.txt and a tiny
model built by the main environment (`python model.py --output_dir /tmp/tiny-qwen3-vl`) in $QWEN3VL_TINY_MODEL.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen_official as qo
from local_trainer import TrainConfig, TrainResult

ROOT = os.environ.get("QWEN3VL_ROOT")
official = pytest.mark.skipif(not ROOT, reason="QWEN3VL_ROOT is not set (a QwenLM/Qwen3-VL checkout)")
DATA_INIT = "qwen-vl-finetune/qwenvl/data/__init__.py"


def _official_transformers() -> bool:
    try:
        qo.check_transformers_version()
    except qo.OfficialCodeError:
        return False
    return True


# ------------------------------------------------------------------------------------- no checkout needed


def test_unset_root_says_what_to_set():
    with pytest.raises(qo.OfficialCodeError, match="QWEN3VL_ROOT is not set.*qwen-vl-finetune"):
        qo.finetune_dir(None)


def test_wrong_root_names_the_expected_files(tmp_path):
    (tmp_path / "qwen-vl-finetune").mkdir()
    with pytest.raises(qo.OfficialCodeError) as err:
        qo.finetune_dir(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "qwen-vl-finetune" / "qwenvl/train/train_qwen.py") in message
    assert "missing qwenvl/train/train_qwen.py, qwenvl/train/trainer.py, qwenvl/data/__init__.py" in message
    assert qo.OFFICIAL_COMMIT in message


@pytest.mark.parametrize("version", ["5.24.0", "5.0.0", "4.56.2"])
def test_incompatible_transformers_is_refused_with_the_way_out(version):
    with pytest.raises(qo.OfficialCodeError, match=rf"transformers {version}\..*requirements-qwen-official.txt"):
        qo.check_transformers_version(version)


@pytest.mark.parametrize("version", ["4.57.0", "4.57.6"])
def test_transformers_4_57_is_accepted(version):
    assert qo.check_transformers_version(version) is None  # no OfficialCodeError


@pytest.mark.skipif(_official_transformers(), reason="this environment has the official code's transformers")
def test_trainer_checks_the_version_before_importing_official_code(tmp_path, monkeypatch):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "train.json").write_text("[]")
    monkeypatch.setenv("QWEN3VL_ROOT", str(tmp_path / "not-a-checkout"))
    with pytest.raises(qo.OfficialCodeError, match="requirements-qwen-official.txt"):
        qo.QwenOfficialTrainer(TrainConfig(dataset_use=str(tmp_path / "site"), output_dir=str(tmp_path / "out")))
    assert "qwenvl.train.train_qwen" not in sys.modules


def test_trainer_wants_a_site_folder_with_train_json(tmp_path):
    with pytest.raises(qo.OfficialCodeError, match="train.json"):
        qo.QwenOfficialTrainer(TrainConfig(dataset_use=str(tmp_path), output_dir=str(tmp_path / "out")))


@pytest.mark.parametrize("name", ["global_model", "qwen3-global", "model"])
def test_round_model_folder_names_that_pick_the_wrong_class_are_refused(tmp_path, name):
    with pytest.raises(qo.OfficialCodeError, match="wrong model class"):
        qo.write_round_model(None, "unused", tmp_path / name, TrainConfig())
    assert not (tmp_path / name).exists()


def test_transformers_5_config_gets_4_57_rope_fields():
    config = {
        "text_config": {"rope_parameters": {"rope_theta": 5e6, "rope_type": "default", "mrope_section": [2, 3, 3]}},
        "vision_config": {"model_type": "qwen3_vl_vision", "rope_parameters": {"rope_theta": 1e4}},
    }
    out = qo._config_for_transformers_4(config)
    rope_scaling = {"rope_type": "default", "mrope_section": [2, 3, 3]}
    assert out["text_config"] == {"rope_theta": 5e6, "rope_scaling": rope_scaling}
    assert "rope_parameters" not in out["vision_config"]


def test_trained_update_is_the_bf16_change_of_the_changed_tensors_only():
    generator = torch.Generator().manual_seed(0)
    start = {
        "moved": torch.randn(64, 32, generator=generator).to(torch.bfloat16),
        "frozen": torch.randn(16, generator=generator).to(torch.bfloat16),
        "bias": torch.zeros(8, dtype=torch.bfloat16),
    }
    trained = {
        "moved": (start["moved"].float() + 1e-3 * torch.randn(64, 32, generator=generator)).to(torch.bfloat16),
        "frozen": start["frozen"].clone(),
        "bias": torch.full((8,), 3e-6).to(torch.bfloat16),
        "extra": torch.ones(2, dtype=torch.bfloat16),  # saved but not sent: only the tensors the round started from
    }
    update = qo.trained_update(start, trained)
    assert update.keys() == {"moved", "bias"}  # "frozen" did not change: not sent
    assert all(v.dtype == torch.bfloat16 for v in update.values())
    for key, value in update.items():
        assert torch.equal(value, (trained[key].float() - start[key].float()).to(torch.bfloat16)), key
    assert update["moved"].any() and torch.equal(update["bias"], trained["bias"])
    # start + update gives the trained weights back (to within bf16 rounding of the sum)
    torch.testing.assert_close(
        (start["moved"].float() + update["moved"].float()).to(torch.bfloat16), trained["moved"], rtol=2**-7, atol=0
    )
    with pytest.raises(qo.OfficialCodeError, match="no weights for.*frozen"):
        qo.trained_update(start, {k: v for k, v in trained.items() if k != "frozen"})


# ---------------------------------------------------------------------------------- with the official checkout


def _pristine_data_init(dest: Path) -> Path:
    """A fresh copy of the official qwenvl/data/__init__.py at OFFICIAL_COMMIT, at its path under `dest`."""
    target = dest / DATA_INIT
    target.parent.mkdir(parents=True)
    shown = subprocess.run(
        ["git", "-C", ROOT, "show", f"{qo.OFFICIAL_COMMIT}:{DATA_INIT}"], capture_output=True, text=True
    )
    if shown.returncode == 0:
        target.write_text(shown.stdout)
    else:  # not a git checkout: its working file, if the patch has not been applied to it
        source = Path(ROOT) / DATA_INIT
        if "FL_SITE_DATA_DIR" in source.read_text():
            pytest.skip(f"{source} is patched and {ROOT} has no git history to get the original from")
        shutil.copy(source, target)
    return target


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@official
def test_patch_applies_at_the_official_commit_and_registers_fl_site(tmp_path, monkeypatch):
    target = _pristine_data_init(tmp_path)
    subprocess.run(["git", "apply", "--check", str(qo.PATCH_FILE)], cwd=tmp_path, check=True)
    subprocess.run(["git", "apply", str(qo.PATCH_FILE)], cwd=tmp_path, check=True)
    monkeypatch.setenv("FL_SITE_DATA_DIR", "/data/site-2")
    monkeypatch.setenv("PUBMEDVISION_IMAGE_ROOT", "/data/PubMedVision")
    patched = _load_module(target, "patched_qwenvl_data")
    assert patched.data_list(["fl_site"]) == [
        {"annotation_path": "/data/site-2/train.json", "data_path": "/data/PubMedVision", "sampling_rate": 1.0}
    ]
    assert patched.data_list(["mp_doc"])[0]["annotation_path"] == "PATH_TO_MP_DOC_ANNOTATION"


@official
def test_runtime_registration_without_the_patch(tmp_path, monkeypatch):
    original = _load_module(_pristine_data_init(tmp_path), "original_qwenvl_data")
    with pytest.raises(ValueError, match="fl_site"):
        original.data_list(["fl_site"])
    monkeypatch.delenv("FL_SITE_DATA_DIR", raising=False)
    qo.register_fl_site(original, "/data/site-1", "/data/PubMedVision")
    assert original.data_list(["fl_site%50"]) == [
        {"annotation_path": "/data/site-1/train.json", "data_path": "/data/PubMedVision", "sampling_rate": 0.5}
    ]
    assert os.environ["FL_SITE_DATA_DIR"] == "/data/site-1"


@pytest.fixture(scope="module")
def official_tiny_model() -> Path:
    path = os.environ.get("QWEN3VL_TINY_MODEL")
    if not path or not (Path(path) / "config.json").is_file():
        pytest.fail(
            "set QWEN3VL_TINY_MODEL to a tiny model built by the main environment: "
            "python model.py --output_dir /tmp/tiny-qwen3-vl (model.py's tokenizer builder needs transformers 5)"
        )
    return Path(path)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, Path]:
    """A site folder (train.json, `<image>` placeholders added as prepare_data.py does) and its image root."""
    from prepare_data import add_image_placeholders
    from synthetic_data import JSON_NAME, write_dataset

    image_root = tmp_path_factory.mktemp("PubMedVision")
    write_dataset(image_root, num_records=6, seed=1, multi_image_fraction=0.5)
    records = [add_image_placeholders(r) for r in json.loads((image_root / JSON_NAME).read_text())]
    site_dir = tmp_path_factory.mktemp("site-1")
    (site_dir / "train.json").write_text(json.dumps(records))
    return site_dir, image_root


@official
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not _official_transformers(), reason="needs the environment of requirements-qwen-official.txt")
def test_one_round_through_the_official_code(official_tiny_model, site, tmp_path):
    from safetensors.torch import load_file

    site_dir, image_root = site
    config = TrainConfig(
        model_name_or_path=str(official_tiny_model),
        dataset_use=str(site_dir),
        image_root=str(image_root),
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        warmup_ratio=0.0,  # with warmup, a one-step round would run at learning rate 0
        min_pixels=32 * 32,
        max_pixels=64 * 64,
        model_max_length=1024,
    )
    trainer = qo.QwenOfficialTrainer(config)
    # A checkpoint-* left in the output folder would make train_qwen resume from it: each round must start fresh.
    (trainer.work_dir / qo.ROUND_OUTPUT_DIRNAME / "checkpoint-7").mkdir(parents=True)
    global_state = {k: v for k, v in load_file(official_tiny_model / "model.safetensors").items()}

    result = trainer.train_round(global_state)

    assert isinstance(result, TrainResult)
    update = result.update  # the changed tensors only, HF keys of Qwen3VLForConditionalGeneration, no tied lm_head
    assert update.keys() <= global_state.keys() and qo.TIED_LM_HEAD not in update
    assert all(v.dtype == torch.bfloat16 and v.shape == global_state[k].shape for k, v in update.items())
    changed = {k for k, v in update.items() if v.any()}
    assert changed == update.keys()
    assert any(k.startswith("model.language_model.") for k in changed)
    assert any(k.startswith("model.visual.merger.") for k in changed)
    assert not any(k.startswith("model.visual.blocks.") for k in update)  # tune_mm_vision=False, as set_model does
    metrics = result.metrics
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert (metrics["steps"], metrics["samples"]) == (1, 2)
    assert not torch.distributed.is_initialized()  # the one-process group made for train_qwen is gone again
    if importlib.util.find_spec("flash_attn") is None:
        assert "flash_attn" not in sys.modules  # the import-time stand-in did not outlive the import

    # The round folder loads in 4.57 as train_qwen loads it, slow tokenizer included, and tokenizes as the fast one.
    from transformers import AutoTokenizer

    model_dir = trainer.work_dir / qo.ROUND_MODEL_DIRNAME
    slow = AutoTokenizer.from_pretrained(model_dir, use_fast=False)
    fast = AutoTokenizer.from_pretrained(model_dir)
    text = "<|im_start|>user\nWhich shape is drawn here?<|im_end|>\n<|im_start|>assistant\nA circle.<|im_end|>"
    assert slow(text).input_ids == fast(text).input_ids
    assert slow.model_max_length == config.model_max_length
    assert importlib.metadata.version("transformers").startswith("4.57.")
