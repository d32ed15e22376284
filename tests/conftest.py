"""Shared fixtures: the tiny Qwen3-VL (real tokenizer and chat template) built once per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face directory of a tiny random Qwen3-VL with its processor."""
    from model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-vl")


@pytest.fixture(scope="session")
def synthetic_pubmedvision(tmp_path_factory) -> Path:
    """A PubMedVision-style dataset folder: `PubMedVision_InstructionTuning_VQA.json` and `images/*.jpg`."""
    from synthetic_data import write_dataset

    root = tmp_path_factory.mktemp("PubMedVision")
    write_dataset(root, num_records=120, seed=0)
    return root


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk, to fill up; skipped where it cannot be mounted (mounting needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode:
        pytest.skip(f"a full disk is a small tmpfs here; mount -t tmpfs failed (root needed): {mount.stderr!r}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)
