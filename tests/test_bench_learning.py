"""bench/bench_learning.py in --quick mode: every run's rows, the files, and what each arithmetic does to a round."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_learning  # noqa: E402

RUNS = {("centralized", "all")} | {(m, s) for m in ("fedavg_after", "fedavg_before") for s in ("iid", "dirichlet")}


def test_quick_run_reports_every_round_and_only_the_fp32_global_takes_a_low_lr_round(tmp_path, tiny_model_dir):
    result = bench_learning.main(["--quick", "--out", str(tmp_path), "--model_dir", str(tiny_model_dir)])
    rounds = result["settings"]["rounds"]
    rows = result["rows"]

    # one row per (method, split, round), round 0 being the shared trained start
    assert {(r["method"], r["split"]) for r in rows} == RUNS
    for method, split in RUNS:
        mine = [r for r in rows if (r["method"], r["split"]) == (method, split)]
        assert [r["round"] for r in mine] == list(range(rounds + 1))
        assert mine[0]["loss"] == result["trained_start"]["loss"]
    assert all(0 <= r["exact_match"] <= 1 and math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert {(s["method"], s["split"]) for s in result["summary"]} == RUNS
    assert next(s for s in result["summary"] if s["method"] == "centralized")["gap_points"] == 0
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
    assert (tmp_path / "learning.png").read_bytes().startswith(b"\x89PNG")

    # The global model's move against the sites' true averaged fp32 change (taken from the trainer's own fp32
    # weights, not from the updates it returned). Today's fp32 global takes that change, to bf16 rounding of the
    # updates; the old bf16 global, at this learning rate, loses most of it.
    federated = [r for r in rows if r["method"] != "centralized" and r["round"] > 0]
    assert federated and all(r["true_change_norm"] > 0 for r in federated)
    for row in federated:
        if row["method"] == "fedavg_after":
            assert abs(row["kept"] - 1) < 0.01 and row["rel_err"] < 0.01, row
        else:
            assert row["kept"] < 0.5 and row["rel_err"] > 0.5, row
