"""download_data.py: git clone (with Git LFS) of a local repo, Hub call arguments, and safe, idempotent unzipping."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import download_data
from download_data import DownloadError, unzip_archives
from synthetic_data import JSON_NAME, draw_image

ROOT = Path(__file__).resolve().parents[1]
HAS_GIT_LFS = shutil.which("git-lfs") is not None


def jpeg_bytes(colour: str, shape: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    draw_image(colour, shape, 32, random.Random(seed)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)  # ZipInfo keeps the name verbatim (even '/abs' or '..')
    return path


def image_set(prefix: str, count: int, seed: int) -> dict[str, bytes]:
    colours, shapes = ("red", "green", "blue"), ("circle", "square", "triangle")
    return {
        f"{prefix}/img_{seed}_{i}.jpg": jpeg_bytes(colours[i % 3], shapes[(i + seed) % 3], seed * 100 + i)
        for i in range(count)
    }


@pytest.fixture
def archives(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A dataset folder with images_0.zip and images_1.zip (members in sub-folders); returns it and flat contents."""
    folder = tmp_path / "PubMedVision"
    folder.mkdir()
    first, second = image_set("images_0", 4, 0), image_set("nested/images_1", 3, 1)
    write_zip(folder / "images_0.zip", first)
    write_zip(folder / "images_1.zip", second)
    flat = {Path(name).name: data for name, data in {**first, **second}.items()}
    return folder, flat


def extracted(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (folder / "images").iterdir()}


def git_env(tmp_path: Path, path: str | None = None) -> dict[str, str]:
    """An environment whose git config is a fresh HOME (so `git lfs install` cannot touch the user's)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
    if path is not None:
        env["PATH"] = path
    return env


def git(env: dict[str, str], cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return result.stdout


def make_source_repo(tmp_path: Path, env: dict[str, str], archives_dir: Path, use_lfs: bool) -> Path:
    """A local git repo laid out like the dataset repo: the JSON plus images_*.zip (LFS-tracked when use_lfs)."""
    repo = tmp_path / "source"
    repo.mkdir()
    git(env, repo, "init", "-q")
    if use_lfs:
        git(env, repo, "lfs", "install", "--local")
        git(env, repo, "lfs", "track", "*.zip")
    (repo / JSON_NAME).write_text('[{"id": "a", "image": ["images/img_0_0.jpg"], "conversations": []}]')
    for archive in archives_dir.glob("images_*.zip"):
        shutil.copy(archive, repo / archive.name)
    git(env, repo, "add", ".")
    git(env, repo, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "dataset")
    return repo


def run_download(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "download_data.py"), *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


# ---------------------------------------------------------------- download


def test_git_method_clones_with_lfs_unzips_flat_and_rerun_skips(tmp_path, archives):
    archives_dir, flat = archives
    env = git_env(tmp_path)
    repo = make_source_repo(tmp_path, env, archives_dir, use_lfs=HAS_GIT_LFS)
    if HAS_GIT_LFS:  # the archives really travel through LFS, as in the dataset repo
        assert "images_0.zip" in git(env, repo, "lfs", "ls-files")
    out = tmp_path / "out"

    first = run_download("--method", "git", "--repo_url", str(repo), "--output_dir", str(out), env=env)
    assert first.returncode == 0, first.stderr
    assert (out / JSON_NAME).read_bytes() == (repo / JSON_NAME).read_bytes()
    assert zipfile.is_zipfile(out / "images_0.zip")  # real archive, not an LFS pointer
    assert extracted(out) == flat
    assert not (out / download_data.STATE_DIR / "tmp").exists()

    second = run_download("--method", "git", "--repo_url", str(repo), "--output_dir", str(out), env=env)
    assert second.returncode == 0, second.stderr
    assert "already a git clone" in second.stdout
    assert "images_0.zip: already extracted, skipping" in second.stdout
    assert "images_1.zip: already extracted, skipping" in second.stdout
    assert extracted(out) == flat


def test_git_method_without_git_lfs_names_the_pointer_files(tmp_path):
    """A clone made without git-lfs holds pointer stubs: the script must say git-lfs is missing, not unzip garbage."""
    env = git_env(tmp_path)
    stub_dir = tmp_path / "stub"
    stub_dir.mkdir()
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 2860000000\n"
    (stub_dir / "images_0.zip").write_bytes(pointer)
    repo = make_source_repo(tmp_path, env, stub_dir, use_lfs=False)
    bin_dir = tmp_path / "bin"  # PATH with git but without git-lfs
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))

    result = run_download(
        "--method",
        "git",
        "--repo_url",
        str(repo),
        "--output_dir",
        str(tmp_path / "out"),
        env=git_env(tmp_path, str(bin_dir)),
    )
    assert result.returncode == 1
    assert "git-lfs not found" in result.stderr
    assert "Git LFS pointers" in result.stderr and "images_0.zip" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "images").exists()


def test_git_method_refuses_a_non_clone_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("x")
    result = run_download("--method", "git", "--repo_url", str(tmp_path / "nowhere"), "--output_dir", str(out))
    assert result.returncode == 1
    assert "is not a git clone" in result.stderr


def test_git_clone_failure_is_a_clear_error(tmp_path):
    result = run_download(
        "--method", "git", "--repo_url", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")
    )
    assert result.returncode == 1
    assert "git clone" in result.stderr and "failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_hub_method_calls_snapshot_download_then_unzips(tmp_path, monkeypatch, archives):
    """The Hub is unreachable here: a stand-in for snapshot_download writes what the real one would."""
    import huggingface_hub

    archives_dir, flat = archives
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        for archive in archives_dir.glob("*.zip"):
            shutil.copy(archive, Path(kwargs["local_dir"]) / archive.name)
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = tmp_path / "out"
    assert download_data.main(["--output_dir", str(out), "--repo_id", "me/data", "--max_workers", "3"]) == 0
    assert calls == [
        {"repo_id": "me/data", "repo_type": "dataset", "revision": None, "local_dir": out.resolve(), "max_workers": 3}
    ]
    assert extracted(out) == flat


def test_hub_failure_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert download_data.main(["--output_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "FreedomIntelligence/PubMedVision" in err and "network unreachable" in err


def test_help_shows_defaults():
    result = run_download("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    for expected in ("--method", "(default: hub)", "(default: PubMedVision)", "--repo_url", "--repo_id"):
        assert expected in text


# ---------------------------------------------------------------- unzip safety


@pytest.mark.parametrize("evil", ["../escaped.jpg", "images/../../escaped.jpg", "/tmp/escaped_abs.jpg", "..\\esc.jpg"])
def test_unsafe_member_is_rejected_naming_the_archive_and_nothing_is_extracted(tmp_path, archives, evil):
    folder, _ = archives
    write_zip(folder / "images_7.zip", {"ok.jpg": b"fine", evil: b"evil"})
    with pytest.raises(DownloadError, match=r"images_7\.zip.*unsafe member"):
        unzip_archives(folder)
    assert list((folder / "images").iterdir()) == []  # checked before any archive is extracted
    assert not (tmp_path / "escaped.jpg").exists() and not Path("/tmp/escaped_abs.jpg").exists()


def test_unsafe_archive_exits_non_zero_from_the_command_line(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_zip(folder / "images_3.zip", {"../../escaped.jpg": b"evil"})
    result = run_download("--skip_download", "--output_dir", str(folder))
    assert result.returncode == 1
    assert "images_3.zip" in result.stderr and "unsafe" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "escaped.jpg").exists()


def test_corrupt_archive_is_named(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "images_0.zip").write_bytes(b"this is not a zip file")
    with pytest.raises(DownloadError, match=r"images_0\.zip is not a readable zip"):
        unzip_archives(folder)


# ---------------------------------------------------------------- unzip idempotency


def test_second_run_skips_extracted_archives(archives):
    folder, flat = archives
    assert unzip_archives(folder) == 2
    assert extracted(folder) == flat
    mtimes = {p.name: p.stat().st_mtime_ns for p in (folder / "images").iterdir()}
    assert unzip_archives(folder) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "images").iterdir()} == mtimes


def test_partially_extracted_archive_is_redone(archives):
    folder, flat = archives
    unzip_archives(folder)
    (folder / download_data.STATE_DIR / "images_1.zip.done").unlink()  # as if killed before the marker
    (folder / "images" / "img_1_0.jpg").unlink()
    (folder / "images" / "img_1_1.jpg").write_bytes(b"trunc")
    stale_tmp = folder / download_data.STATE_DIR / "tmp" / "img_1_2.jpg"
    stale_tmp.parent.mkdir(parents=True, exist_ok=True)
    stale_tmp.write_bytes(b"half")
    assert unzip_archives(folder) == 1
    assert extracted(folder) == flat
    assert not stale_tmp.exists()


def test_changed_archive_is_extracted_again(archives):
    folder, flat = archives
    unzip_archives(folder)
    new = image_set("images_0", 2, 5)
    write_zip(folder / "images_0.zip", new)
    assert unzip_archives(folder) == 1
    assert extracted(folder) == {**flat, **{Path(n).name: d for n, d in new.items()}}


def test_interrupted_extraction_leaves_no_half_written_images(archives, monkeypatch):
    folder, flat = archives
    real_copy = shutil.copyfileobj
    calls = []

    def copy_then_crash(src, dst, length=0):
        calls.append(1)
        if len(calls) == 3:
            dst.write(src.read(100))
            raise KeyboardInterrupt
        real_copy(src, dst, length)

    monkeypatch.setattr(download_data.shutil, "copyfileobj", copy_then_crash)
    with pytest.raises(KeyboardInterrupt):
        unzip_archives(folder)
    partial = extracted(folder)
    assert len(partial) == 2 and all(flat[name] == data for name, data in partial.items())
    assert not list((folder / download_data.STATE_DIR / "tmp").iterdir())
    monkeypatch.setattr(download_data.shutil, "copyfileobj", real_copy)
    assert unzip_archives(folder) == 2
    assert extracted(folder) == flat


# ---------------------------------------------------------------- disk space


def _blocks(members: dict[str, bytes]) -> int:
    return sum(-(-len(data) // download_data.BLOCK) * download_data.BLOCK for data in members.values())


def test_disk_space_is_checked_against_what_still_needs_extracting(archives, monkeypatch):
    folder, flat = archives
    with zipfile.ZipFile(folder / "images_1.zip") as zf:
        second = {Path(info.filename).name: zf.read(info) for info in zf.infolist()}
    need_all, need_second = _blocks(flat), _blocks(second)

    def set_free(bytes_free: int) -> None:
        usage = shutil._ntuple_diskusage(10**12, 10**12 - bytes_free, bytes_free)
        monkeypatch.setattr(download_data.shutil, "disk_usage", lambda path: usage)

    set_free(need_all - 1)
    with pytest.raises(DownloadError, match="not enough free disk space"):
        unzip_archives(folder)
    assert list((folder / "images").iterdir()) == []
    set_free(need_all)
    assert unzip_archives(folder) == 2

    # Undo images_1 only: now only its members count.
    (folder / download_data.STATE_DIR / "images_1.zip.done").unlink()
    for name in second:
        (folder / "images" / name).unlink()
    set_free(need_second - 1)
    with pytest.raises(DownloadError, match="not enough free disk space"):
        unzip_archives(folder)
    set_free(need_second)
    assert unzip_archives(folder) == 1
    assert extracted(folder) == flat
