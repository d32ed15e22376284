"""Benchmark prepare_data.py on a full-scale PubMedVision-shaped input: wall time and peak memory of the split.

Generates 646,759 synthetic records (the size of PubMedVision_InstructionTuning_VQA) whose answers are padded
to realistic lengths (about 700 MB of JSON), runs `python prepare_data.py` on it as a subprocess and prints
its wall time and peak RSS against the targets (60 s, 6 GiB).

  python bench/bench_prepare_data.py                          # temp dir, removed afterwards
  python bench/bench_prepare_data.py --work_dir /tmp/pmv_bench  # keep and reuse the input between runs
  python bench/bench_prepare_data.py -- --split dirichlet --alpha 0.5 --test_size 5000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synthetic_data import JSON_NAME, make_records  # noqa: E402

FULL_SIZE = 646_759
MAX_WALL_S = 60.0
MAX_PEAK_GIB = 6.0
WORDS = (
    "the image shows a well defined hypodense lesion in the right lobe with peripheral enhancement and no "
    "evidence of calcification adjacent structures appear normal findings are consistent with a benign cyst "
    "although an abscess cannot be excluded clinical correlation and follow up imaging are recommended the "
    "patient presented with abdominal pain fever and elevated inflammatory markers contrast enhanced scan "
    "demonstrates thickening of the wall surrounding fat stranding mild free fluid lymph nodes are not enlarged"
).split()


def filler(rng: random.Random, size: int = 20_000) -> str:
    """A long run of medical-sounding words; answers are slices of it (fast to make, realistic to parse)."""
    words: list[str] = []
    length = 0
    while length < size:
        words.append(rng.choice(WORDS))
        length += len(words[-1]) + 1
    return " ".join(words)


def generate_input(path: Path, num_records: int, target_mb: float, seed: int = 0) -> None:
    """Write `num_records` PubMedVision-shaped records, answers padded so the file is about `target_mb` MB."""
    rng = random.Random(seed)
    text = filler(rng)
    base = 307  # bytes of a generated record before padding (measured)
    mean_pad = max(0, int(target_mb * 1e6 / num_records) - base)
    encode = json.JSONEncoder(ensure_ascii=False).encode
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n")
        records = make_records(num_records, seed)
        for i, (record, _) in enumerate(tqdm(records, total=num_records, desc="Generating", unit=" records")):
            pad = rng.randint(mean_pad // 2, mean_pad * 3 // 2)
            start = rng.randrange(len(text) - pad)
            record["conversations"][1]["value"] += " " + text[start : start + pad]
            f.write((",\n" if i else "") + encode(record))
        f.write("\n]\n")
    tmp.replace(path)


def run_prepare(data_file: Path, output_dir: Path, extra: list[str]) -> tuple[float, float, float, int]:
    """Run prepare_data.py; return (wall seconds, CPU seconds, peak RSS in GiB, exit code).

    CPU seconds (user + sys) barely move when other jobs share the cores, unlike wall time: compare both.
    """
    cmd = [
        sys.executable,
        str(ROOT / "prepare_data.py"),
        "--data_file",
        str(data_file),
        "--output_dir",
        str(output_dir),
    ]
    print("Running:", " ".join([*cmd, *extra]), flush=True)
    start = time.perf_counter()
    code = subprocess.run([*cmd, *extra]).returncode
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the only child waited for is prepare_data.py
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20, code  # Linux: ru_maxrss in KiB


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description="Time prepare_data.py on a full-scale generated input (arguments after -- go to it).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--work_dir", default=None, help="keep input/output here (default: a temp dir, removed)")
    parser.add_argument("--num_records", type=int, default=FULL_SIZE, help="records to generate")
    parser.add_argument("--target_mb", type=float, default=700.0, help="approximate size of the generated JSON")
    parser.add_argument("--regenerate", action="store_true", help="rewrite the input even if --work_dir has one")
    parser.add_argument("extra", nargs="*", help="arguments passed on to prepare_data.py (after --)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data_file = work / JSON_NAME
        if args.regenerate or not data_file.exists():
            generate_input(data_file, args.num_records, args.target_mb)
        else:
            print(f"Reusing {data_file}")
        size_mb = data_file.stat().st_size / 1e6
        wall, cpu, peak_gib, code = run_prepare(data_file, work / "data", args.extra)

    ok = code == 0 and wall <= MAX_WALL_S and peak_gib <= MAX_PEAK_GIB
    print(
        f"\nprepare_data.py on {args.num_records:,} records ({size_mb:.0f} MB JSON): "
        f"wall {wall:.1f} s (target <= {MAX_WALL_S:.0f}), CPU {cpu:.1f} s, "
        f"peak RSS {peak_gib:.2f} GiB (target <= {MAX_PEAK_GIB:.0f}), exit {code} -> {'PASS' if ok else 'FAIL'} "
        f"[{os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f}]"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
