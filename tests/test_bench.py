"""The bench scripts' own parts: `--env` flags, bench_transfer's log parsing, bench_lora's compile stats, and more."""

import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_fl_round import env_overrides  # noqa: E402
from bench_transfer import cpu_per_gb, transfer_phases  # noqa: E402

SIZE = "size=4058.0MB (4,255,114,672 bytes)"
LOG = [  # (second of the minute, message) as NVFlare writes them
    ("10.000", "FedAvg - INFO - Sending task train to ['site-1', 'site-2']"),
    ("30.000", f"_Transaction - INFO - [server] download tx T1 done: status=finished elapsed=19.00s {SIZE}"),
    ("31.000", f"_Transaction - INFO - [server] download tx T2 done: status=finished elapsed=19.50s {SIZE}"),
    ("50.000", f"function - INFO - [client] download ref=a done: elapsed=15.00s {SIZE}"),
    ("52.000", f"function - INFO - [client] download ref=b done: elapsed=16.00s {SIZE}"),
]


def test_env_flags_become_a_dict_and_a_flag_without_a_name_or_equals_sign_is_refused():
    assert env_overrides(["ARENAS=2", "X=a=b", "EMPTY="]) == {"ARENAS": "2", "X": "a=b", "EMPTY": ""}
    for bad in ("MALLOC_ARENA_MAX", "=2"):
        with pytest.raises(SystemExit, match=f"--env '{bad}' must read NAME=VALUE"):
            env_overrides(["OK=1", bad])


@pytest.fixture
def server_log(tmp_path: Path) -> Path:
    path = tmp_path / "log.txt"
    path.write_text("".join(f"2026-12-02 03:05:{s.replace('.', ',')} - {msg}\n" for s, msg in LOG))
    return path


def test_overlapping_transfers_of_one_direction_make_one_phase(server_log):
    phases = transfer_phases(server_log)
    assert [p["kind"] for p in phases] == ["receive", "send"]
    receive, send = phases
    assert receive["end"] - receive["start"] == pytest.approx(20.0)  # 11.0 (31 - 19.5) to 31.0
    assert send["end"] - send["start"] == pytest.approx(17.0)  # 35.0 to 52.0
    assert receive["bytes"] == send["bytes"] == 2 * 4_255_114_672


def test_cpu_per_gb_counts_the_server_alone_and_the_clients_together(server_log):
    phases = transfer_phases(server_log)
    t0 = phases[0]["start"]
    server = "12 -m nvflare.private.fed.app.simulator.simulator /tmp/job"
    relay = "13 -m nvflare.private.fed.app.simulator.simulator /tmp/job"
    clients = ["21 -u custom/client.py 25165824", "22 -u custom/client.py 25165824"]

    def samples(user_per_s: float, system_per_s: float) -> list[tuple[float, float, float]]:
        return [(t0 + t, user_per_s * t, system_per_s * t) for t in range(0, 60)]

    cpu = {server: samples(1.0, 0.5), relay: samples(0.1, 0.0)} | {c: samples(0.5, 0.25) for c in clients}
    by_process = {server: 10 * 2**30, relay: 2**30} | {c: 5 * 2**30 for c in clients}
    receive, send = cpu_per_gb(phases, cpu, by_process)
    gb = 2 * 4.255114672
    assert receive["phase"] == "receive" and receive["seconds"] == 20.0
    assert receive["server_cpu_s_per_gb"] == pytest.approx(20 * 1.5 / gb, abs=0.01)  # the largest, not the relay
    assert receive["clients_cpu_s_per_gb"] == pytest.approx(2 * 20 * 0.75 / gb, abs=0.01)
    assert send["server_user_sys"] == pytest.approx([17 * 1.0 / gb, 17 * 0.5 / gb], abs=0.01)


def test_bench_transfer_sends_the_2b_models_own_tensor_shapes():
    from bench_transfer import qwen3vl_2b_shapes

    shapes = qwen3vl_2b_shapes()
    assert len(shapes) == 625 and (151936, 2048) in shapes
    assert sum(2 * math.prod(s) for s in shapes) == 4_255_064_064  # bf16 bytes, no tied lm_head


def test_request_summary_splits_each_process_into_transfers(tmp_path):
    from bench_fl_round import request_summary

    lines = ["argv 7 0 0 custom/client.py --trainer builtin"]
    lines += [f"rtt 7 {100 + 0.1 * i:.6f} 0.100000" for i in range(10)]  # one download: 10 requests in 1 s
    lines += [f"rtt 7 {200 + 0.1 * i:.6f} 0.070000" for i in range(4)]  # the next round's
    lines += [f"transit 7 {150 + i:.6f} 0.003000" for i in range(3)] + [
        f"handle 7 {150.003 + i:.6f} 0.001000" for i in range(3)
    ]
    (tmp_path / "7.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "8.txt").write_text("argv 8 0 0 idle\n")  # made and served no request
    assert request_summary(tmp_path) == [
        dict(process="custom/client.py --trainer builtin", pid=7,
             asked=[dict(requests=10, seconds=1.0, round_trip_ms=100.0),
                    dict(requests=4, seconds=0.4, round_trip_ms=70.0)],
             served=[dict(requests=3, handler_ms=1.0, transit_ms=3.0)])
    ]  # fmt: skip


def test_the_request_probe_times_nvflares_requests_once_imported(tmp_path):
    """The probe patches NVFlare's cell and download service on import, in any process that has it on its path."""
    import subprocess

    from bench_fl_round import probe_env

    script = (
        "from nvflare.fuel.f3.cellnet.cell import Cell\n"
        "from nvflare.fuel.f3.streaming import download_service as s\n"
        "print(Cell._send_request.__name__, s.DownloadService._handle_download.__func__.__name__)\n"
    )
    env = os.environ | probe_env(tmp_path / "probe", dict(os.environ))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["timed_send", "timed_handle"], out.stderr[-2000:]


def test_bench_fl_round_reads_each_transfers_megabytes_per_round_from_the_server_log(tmp_path):
    from bench_fl_round import transfer_megabytes

    log = tmp_path / "log.txt"
    log.write_text(
        "2026-12-02 17:47:50,110 - FedAvg - INFO - Round 0 started.\n"
        "2026-12-02 17:48:07,385 - _Transaction - INFO - [server] download tx T98 done: status=finished "
        "elapsed=8.35s size=2717.9MB (2,849,911,814 bytes)\n"
        "2026-12-02 17:48:37,965 - function - INFO - [client] download ref=b585 done: elapsed=10.36s "
        "size=617.4MB (647,349,406 bytes)\n"
        "2026-12-02 17:48:43,389 - FedAvg - INFO - Round 1 started.\n"
        "2026-12-02 17:48:52,785 - _Transaction - INFO - [server] download tx Tb6 done: status=finished "
        "elapsed=8.49s size=617.3MB (647,337,091 bytes)\n"
    )
    assert transfer_megabytes(log) == [
        {"global_model_mb": [2850], "results_mb": [647]},
        {"global_model_mb": [647], "results_mb": []},
    ]


def test_bench_update_measures_what_survives_of_a_change_and_its_bytes():
    import torch
    from bench_update import delta_packed_bytes, retention, summary

    g = torch.Generator().manual_seed(0)
    start = (torch.randn(256, 256, generator=g) * 0.02).bfloat16()
    true = torch.randn(256, 256, generator=g) * 1e-7  # far below half a bf16 step of the weights
    true[0] = 0  # a row that did not move
    rounded = (start.float() + true).bfloat16().float() - start.float()
    lost = summary(retention(true, rounded))
    kept = summary(retention(true, true.bfloat16().float()))
    assert lost["moved_lost"] > 0.9 and lost["kept"] < 0.1  # rounding the weights rounds the change away
    assert kept["moved_lost"] == 0 and kept["kept"] > 0.999 and kept["rel_err"] < 0.003 and kept["cosine"] > 0.999
    assert delta_packed_bytes(start, start) < 0.01 * start.numel() * 2  # no change: next to no bytes
    moved = (start.float() + 1e-3).bfloat16()
    assert 0.01 * start.numel() * 2 < delta_packed_bytes(moved, start) < start.numel() * 2


def test_bench_lora_compiles_each_mode_from_an_empty_cache():
    """All decoder layers and vision blocks run one compiled code object. Kept from mode to mode, its cache held every
    earlier mode's graphs, and past dynamo's recompile limit a later mode's blocks ran eagerly: each mode starts
    afresh, and its row counts what it compiled."""
    import torch
    from bench_lora import fresh_compile

    block = torch.compile(lambda x: x * 2, backend="eager")
    rows = []
    with torch._dynamo.config.patch(recompile_limit=3):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):  # three modes, three graphs each
            stats = {}
            with fresh_compile(stats):
                for rank in (1, 2, 3):
                    block(torch.ones([1] * rank, dtype=dtype))
            rows.append(stats)
    assert rows == [{"graphs": 3, "graph_breaks": 0, "recompile_limit_hits": 0}] * 3


def test_bench_module_walks_times_each_walk_of_the_2b_model_with_and_without_adapters():
    from bench_module_walks import main

    full, lora = main(["--repeats", "1"])
    assert lora["modules"] > 3 * full["modules"] and lora["parameters"] > full["parameters"]
    assert all(row[key] > 0 for row in (full, lora) for key in row if key.endswith("_ms"))
