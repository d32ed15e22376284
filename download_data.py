"""Download the PubMedVision dataset and unzip its image archives into `<output_dir>/images/`.

Usage:
  python download_data.py                      # Hugging Face Hub snapshot (resumable, parallel)
  python download_data.py --method git         # git clone with Git LFS, as the dataset card does
  python download_data.py --skip_download      # only (re-)extract archives already in --output_dir
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

DEFAULT_REPO_ID = "FreedomIntelligence/PubMedVision"
DEFAULT_REPO_URL = f"https://huggingface.co/datasets/{DEFAULT_REPO_ID}"
ARCHIVE_PATTERN = re.compile(r"^images_(\d+)\.zip$")
STATE_DIR = ".unzip_state"  # markers of fully extracted archives and in-flight temp files
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
JSON_NAME = "PubMedVision_InstructionTuning_VQA.json"
BLOCK = 4096  # each extracted file occupies whole filesystem blocks


class DownloadError(Exception):
    """A user-facing failure: printed as one clear message, exit code 1."""


# ---------------------------------------------------------------- download


def download_from_hub(repo_id: str, output_dir: Path, revision: str | None, max_workers: int) -> None:
    """Snapshot the dataset repo into `output_dir`; files already there are skipped, partial ones resumed."""
    import huggingface_hub

    print(f"Downloading {repo_id} (dataset) from the Hugging Face Hub into {output_dir} ...")
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        huggingface_hub.snapshot_download(
            repo_id=repo_id,
            repo_type="dataset",
            revision=revision,
            local_dir=output_dir,
            max_workers=max_workers,
        )
    except Exception as e:  # the hub raises many types (HTTP, offline, auth); all mean "download failed"
        raise DownloadError(
            f"downloading {repo_id} from the Hugging Face Hub failed: {type(e).__name__}: {e}\n"
            "Check your network (and HF_TOKEN if the repo is gated), then rerun: finished files are kept."
        ) from e


def _run_git(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def _git_lfs_available() -> bool:
    try:
        return _run_git(["lfs", "version"]).returncode == 0
    except FileNotFoundError:
        return False


def lfs_pointer_files(folder: Path) -> list[Path]:
    """Top-level files that are Git LFS pointers (small text stubs) rather than their real content."""
    pointers = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.stat().st_size < 1024:
            with open(path, "rb") as f:
                if f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
                    pointers.append(path)
    return pointers


def download_with_git(repo_url: str, output_dir: Path) -> None:
    """`git lfs install` + `git clone` (or `git lfs pull` on a rerun); fail clearly if LFS files stay pointers."""
    if shutil.which("git") is None:
        raise DownloadError("git is not installed. Install git and git-lfs, or use the default --method hub.")
    has_lfs = _git_lfs_available()
    if has_lfs:
        _check(_run_git(["lfs", "install"]), "git lfs install")
    else:
        print("Warning: git-lfs not found; large files would arrive as LFS pointers.", file=sys.stderr)

    if (output_dir / ".git").is_dir():
        print(f"{output_dir} is already a git clone; fetching any missing LFS files ...")
        if has_lfs:
            _check(_run_git(["lfs", "pull"], cwd=output_dir), "git lfs pull")
    elif output_dir.exists() and any(output_dir.iterdir()):
        raise DownloadError(
            f"{output_dir} exists, is not empty and is not a git clone. "
            "Remove it, pick another --output_dir, or use --method hub (which resumes into an existing folder)."
        )
    else:
        print(f"Cloning {repo_url} into {output_dir} (the image archives are large; this takes a while) ...")
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        _check(_run_git(["clone", "--progress", repo_url, str(output_dir)]), f"git clone {repo_url}")

    pointers = lfs_pointer_files(output_dir)
    if pointers:
        names = ", ".join(p.name for p in pointers[:5]) + (" ..." if len(pointers) > 5 else "")
        raise DownloadError(
            f"{len(pointers)} file(s) in {output_dir} are Git LFS pointers, not data ({names}). "
            "git-lfs is missing or failed: install it (e.g. `apt-get install git-lfs`, `brew install git-lfs`, "
            "https://git-lfs.com), then rerun this command; or use the default --method hub."
        )


def _check(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        raise DownloadError(f"{what} failed (exit {result.returncode}): {result.stderr.strip() or result.stdout}")


# ---------------------------------------------------------------- unzip


def find_archives(folder: Path) -> list[Path]:
    """`images_<n>.zip` files in `folder`, in numeric order."""
    found = [p for p in folder.iterdir() if ARCHIVE_PATTERN.match(p.name) and p.is_file()]
    return sorted(found, key=lambda p: int(ARCHIVE_PATTERN.match(p.name).group(1)))


def _is_unsafe(name: str) -> bool:
    """Absolute (POSIX or Windows) paths and any `..` component could write outside the images folder."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return True
    return ".." in PurePosixPath(name.replace("\\", "/")).parts


def safe_members(archive: Path) -> list[zipfile.ZipInfo]:
    """The archive's file members (directories left out); raise naming the archive if any path is unsafe."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{archive} is not a readable zip archive ({e}); delete it and download again.") from e
    for info in infos:
        if _is_unsafe(info.filename):
            raise DownloadError(
                f"{archive} has an unsafe member path {info.filename!r} (absolute or with '..'); refusing to extract."
            )
    return [info for info in infos if not info.is_dir()]


def _marker(output_dir: Path, archive: Path) -> Path:
    return output_dir / STATE_DIR / f"{archive.name}.done"


def _archive_signature(archive: Path) -> dict:
    stat = archive.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def is_extracted(output_dir: Path, archive: Path) -> bool:
    """True when a marker says this exact archive (same size and mtime) was fully extracted."""
    marker = _marker(output_dir, archive)
    try:
        return json.loads(marker.read_text()) == _archive_signature(archive)
    except (OSError, ValueError):
        return False


def pending_members(archive: Path, images_dir: Path) -> list[zipfile.ZipInfo]:
    """Members not yet on disk at their full size (files are renamed into place only once complete)."""
    pending = []
    for info in safe_members(archive):
        target = images_dir / PurePosixPath(info.filename.replace("\\", "/")).name
        try:
            if target.stat().st_size == info.file_size:
                continue
        except FileNotFoundError:
            pass
        pending.append(info)
    return pending


def check_disk_space(folder: Path, members: list[zipfile.ZipInfo]) -> None:
    """Stop before extracting anything when the uncompressed members would not fit on the disk."""
    need = sum(-(-info.file_size // BLOCK) * BLOCK for info in members)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DownloadError(
            f"not enough free disk space in {folder}: extracting needs {need / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free. Free some space or use another --output_dir."
        )


def extract_members(archive: Path, members: list[zipfile.ZipInfo], images_dir: Path, tmp_dir: Path) -> None:
    """Extract flat (like `unzip -j`): each member goes to a temp file first, then is renamed into place."""
    total = sum(info.file_size for info in members)
    with (
        zipfile.ZipFile(archive) as zf,
        tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=archive.name) as bar,
    ):
        for info in members:
            name = PurePosixPath(info.filename.replace("\\", "/")).name
            tmp = tmp_dir / name
            try:
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except zipfile.BadZipFile as e:  # includes CRC mismatches, found on reading the member
                tmp.unlink(missing_ok=True)
                raise DownloadError(f"{archive} is corrupt at member {info.filename!r}: {e}") from e
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, images_dir / name)
            bar.update(info.file_size)


def unzip_archives(output_dir: Path) -> int:
    """Extract every `images_*.zip` in `output_dir` into `output_dir/images/`; return how many were extracted now."""
    archives = find_archives(output_dir)
    if not archives:
        print(f"No images_*.zip archives in {output_dir}; nothing to extract.")
        return 0
    images_dir = output_dir / "images"
    state_dir = output_dir / STATE_DIR
    tmp_dir = state_dir / "tmp"
    images_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of an interrupted run
    tmp_dir.mkdir(parents=True)

    todo = [a for a in archives if not is_extracted(output_dir, a)]
    for archive in archives:
        if archive not in todo:
            print(f"{archive.name}: already extracted, skipping.")
    # Check every archive (safety and space) before writing a single image.
    plan = [(archive, pending_members(archive, images_dir)) for archive in todo]
    check_disk_space(images_dir, [info for _, members in plan for info in members])

    for i, (archive, members) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {archive.name}: extracting {len(members)} file(s) into {images_dir}")
        extract_members(archive, members, images_dir, tmp_dir)
        _marker(output_dir, archive).write_text(json.dumps(_archive_signature(archive)))
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return len(plan)


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description=(
            "Download PubMedVision (JSON files + images_0..19.zip, about 57 GB) and unzip the archives flat "
            "into <output_dir>/images/ (about as much again: plan for ~120 GB free). Reruns resume the download "
            "and skip archives already extracted; free space is checked before extracting."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output_dir", default="PubMedVision", help="dataset folder; created if missing")
    parser.add_argument(
        "--method",
        choices=("hub", "git"),
        default="hub",
        help="hub: huggingface_hub.snapshot_download (resumable, parallel); git: git clone with Git LFS",
    )
    parser.add_argument("--repo_id", default=DEFAULT_REPO_ID, help="dataset repo on the Hub (--method hub)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit on the Hub (--method hub)")
    parser.add_argument("--max_workers", type=int, default=8, help="parallel file downloads (--method hub)")
    parser.add_argument("--repo_url", default=DEFAULT_REPO_URL, help="URL or path to clone (--method git)")
    parser.add_argument("--skip_download", action="store_true", help="only extract archives already present")
    parser.add_argument("--skip_unzip", action="store_true", help="only download; leave the archives zipped")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir).expanduser().resolve()
    try:
        if not args.skip_download:
            if args.method == "hub":
                download_from_hub(args.repo_id, output_dir, args.revision, args.max_workers)
            else:
                download_with_git(args.repo_url, output_dir)
        elif not output_dir.is_dir():
            raise DownloadError(f"{output_dir} does not exist; run without --skip_download first.")
        if not args.skip_unzip:
            unzip_archives(output_dir)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted; no half-written images were left. Rerun the same command to resume.", file=sys.stderr)
        return 130
    print(f"Done. Dataset at {output_dir}. Next: python prepare_data.py --data_file {output_dir / JSON_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
