"""bench/bench_learning.py in --quick mode (the trained start): every method's rows, the files, what each server
arithmetic does to a round, and the diagnostics."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_learning  # noqa: E402

METHODS = (*bench_learning.METHODS, "fedavg_before")
SPLITS = ("dirichlet",)  # the skewed split (iid is a plain shuffle): one split keeps the suite's time down
RUNS = {("trained", "centralized", "all")} | {("trained", m, s) for m in METHODS if m != "centralized" for s in SPLITS}


def test_quick_run_reports_every_method_and_round_and_the_server_steps_differ_as_designed(tmp_path, tiny_model_dir):
    argv = ["--quick", "--start", "trained", "--methods", ",".join(METHODS), "--splits", ",".join(SPLITS)]
    argv += ["--out", str(tmp_path)]
    result = bench_learning.main([*argv, "--model_dir", str(tiny_model_dir)])
    rounds = result["settings"]["starts"]["trained"]["rounds"]
    assert rounds >= 2
    rows = result["rows"]
    run = lambda method, split: [r for r in rows if (r["method"], r["split"]) == (method, split)]  # noqa: E731

    # one row per (start, method, split, round), round 0 being the shared trained start
    assert {(r["start"], r["method"], r["split"]) for r in rows} == RUNS
    for _, method, split in RUNS:
        mine = run(method, split)
        assert [r["round"] for r in mine] == list(range(rounds + 1))
        assert mine[0]["loss"] == result["trained_start"]["loss"]
    assert all(0 <= r["exact_match"] <= 1 and math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert {(s["start"], s["method"], s["split"]) for s in result["summary"]} == RUNS
    assert next(s for s in result["summary"] if s["method"] == "centralized")["gap_points"] == 0
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
    assert (tmp_path / "learning.png").read_bytes().startswith(b"\x89PNG")

    federated = [r for r in rows if r["method"] != "centralized" and r["round"] > 0]
    for row in federated:
        assert row["true_change_norm"] > 0 and row["step_vs_central"] > 0, row
        assert -1 <= row["cos_sites"] <= 1 and 0 < row["shrink"] <= 1 + 1e-6, row
    for split in SPLITS:
        fedavg, momentum, slr = run("fedavg", split), run("fedavgm", split), run("fedavg_slr", split)
        # Round 1 from the same start: the sites send the same updates, and momentum's first step is the average
        # itself (m = 0.9 * 0 + avg): the same global model. From round 2 the momentum adds the last round's.
        assert momentum[1]["loss"] == fedavg[1]["loss"] and momentum[1]["step_norm"] == fedavg[1]["step_norm"]
        assert momentum[2]["step_norm"] != fedavg[2]["step_norm"]
        # server lr = sites: the same average, a step `sites` times as long
        assert slr[1]["avg_update_norm"] == fedavg[1]["avg_update_norm"]
        assert math.isclose(slr[1]["step_norm"], 3 * fedavg[1]["step_norm"], rel_tol=1e-4)
        # Today's fp32 global takes the sites' true averaged fp32 change, to bf16 rounding of the updates; the old
        # bf16 global, at this learning rate, loses most of it.
        for row in fedavg[1:]:
            assert abs(row["kept"] - 1) < 0.01 and row["rel_err"] < 0.01, row
        for row in run("fedavg_before", split)[1:]:
            assert row["kept"] < 0.5 and row["rel_err"] > 0.5, row
        # kept optimizer state: round 1 is a fresh AdamW (as fedavg), round 2 continues it (another update)
        keep = run("fedavg_keepopt", split)
        assert keep[1]["step_norm"] == fedavg[1]["step_norm"] and keep[2]["step_norm"] != fedavg[2]["step_norm"]
