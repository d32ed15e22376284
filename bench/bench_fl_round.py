"""Benchmark: federated round overhead of our job with the real Qwen3-VL-2B architecture (random weights).

Runs `python job.py` (NVFlare simulator, 3 sites on one GPU, a few training steps each) and reports, per round,
the wall time between the server's "Aggregated N/N" lines minus the slowest site's training seconds (the
overhead of exchanging and aggregating the 4.26 GB state dict), and the peak RSS of the whole process tree, also
net of what training needs: N times the peak RSS of one site's trainer training a round alone (no NVFlare, no
exchange), measured first. Once a second the RSS of every process over 1 GiB, and the machine's dirty page cache
(written, not yet on disk), go to WORKDIR/rss_timeline.json.
`--probe` also times every download request of the exchange (bench/request_probe): per process and transfer, the
requests, their mean round trip and the producer's handler time.
Usage: python bench/bench_fl_round.py [--rounds 3] [--clients 3] [--workdir DIR] [--env NVFLARE_X=1 ...]
    [--site_args="--checkpoint every"] [--solo_only] [--probe]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_trainer import build_dataset, build_model_dir  # noqa: E402

import host_memory  # noqa: E402

TRAIN_ARGS = (
    "--tune_mm_llm False --per_device_train_batch_size 1 --gradient_accumulation_steps 1 --max_pixels 200704 "
    "--warmup_ratio 0 --gradient_checkpointing False --logging_steps 1 --torch_compile False"
)  # 2 steps of training: compiling would only lengthen the run, not the exchange being measured


def peak_tree_rss(proc: subprocess.Popen, peak: dict) -> None:
    """Poll the RSS of `proc` and its descendants every 0.2 s: the tree's maximum in peak['rss'], and each
    process's own maximum in peak['by_process'] (keyed by pid and a short command line), to see who holds what;
    once a second, the time and every process over 1 GiB in peak['timeline'] (if present), to see when; every poll,
    (time, user, system) CPU seconds per process in peak['cpu'] (if present), to see who works when."""
    root, last_row = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:
        total, row = 0, {}
        for p in [root, *root.children(recursive=True)]:
            try:
                rss = p.memory_info().rss
                key = f"{p.pid} {' '.join(p.cmdline()[1:4])[:90]}"
                if "cpu" in peak:
                    cpu = p.cpu_times()
                    peak["cpu"].setdefault(key, []).append((time.time(), cpu.user, cpu.system))
            except psutil.Error:
                continue
            total += rss
            peak["by_process"][key] = max(peak["by_process"].get(key, 0), rss)
            if rss > 2**30:
                row[key] = round(rss / 2**30, 2)
        peak["rss"] = max(peak["rss"], total)
        if "timeline" in peak and time.time() - last_row >= 1.0:
            last_row = time.time()
            dirty = dirty_gib()
            peak["dirty"] = max(peak.get("dirty", 0.0), dirty or 0.0)
            peak["timeline"].append(
                {"time": datetime.now().strftime("%H:%M:%S"), "tree": round(total / 2**30, 2), "dirty": dirty} | row
            )
        time.sleep(0.2)


def dirty_gib() -> float | None:
    """The machine's page cache waiting to be written to disk (Dirty + Writeback), or None off Linux."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    except OSError:
        return None
    return round(sum(int(fields[k].split()[0]) for k in ("Dirty", "Writeback")) / 2**20, 2)


def env_overrides(assignments: list[str]) -> dict[str, str]:
    """`--env NAME=VALUE` flags as a dict; a flag without `=` or a name is an error that names it."""
    pairs = [a.partition("=") for a in assignments]
    bad = [a for a, (name, sep, _) in zip(assignments, pairs, strict=True) if not (name and sep)]
    if bad:
        raise SystemExit(f"error: --env {bad[0]!r} must read NAME=VALUE")
    return {name: value for name, _, value in pairs}


PROBE = ROOT / "bench" / "request_probe"  # its sitecustomize.py times NVFlare's download requests (--probe)


def probe_env(probe_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """What to add to the run's environment for the request probe to log into `probe_dir` (emptied first)."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    for old in probe_dir.glob("*.txt"):
        old.unlink()
    path = os.pathsep.join(p for p in (str(PROBE), env.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "PROBE_DIR": str(probe_dir)}


def _runs(events: list[tuple[float, float]], gap: float) -> list[list[tuple[float, float]]]:
    """(start, seconds) events in time order, cut where `gap` seconds pass without one: one run per transfer."""
    runs: list[list[tuple[float, float]]] = []
    for event in sorted(events):
        if not runs or event[0] - runs[-1][-1][0] > gap:
            runs.append([])
        runs[-1].append(event)
    return runs


def request_summary(probe_dir: Path, gap: float = 5.0) -> list[dict]:
    """Per process that made or served download requests, per transfer (a run of requests with no `gap` between):
    as requester, the requests, their span in seconds and their mean round trip; as producer, the requests served,
    the handler's mean and the requests' mean transit, in ms."""
    rows = []
    for path in sorted(probe_dir.glob("*.txt")):
        lines = [line.split(maxsplit=4) for line in path.read_text().splitlines()]
        name = next((fields[4] for fields in lines if fields[0] == "argv" and len(fields) > 4), path.stem)
        events: dict[str, list[tuple[float, float]]] = {}
        for fields in lines:
            if fields[0] != "argv":
                events.setdefault(fields[0], []).append((float(fields[2]), float(fields[3])))

        def mean_ms(run):
            return round(1000 * sum(seconds for _, seconds in run) / len(run), 1)

        asked = [
            dict(requests=len(run), seconds=round(run[-1][0] + run[-1][1] - run[0][0], 1), round_trip_ms=mean_ms(run))
            for run in _runs(events.get("rtt", []), gap)
        ]
        served = []
        for run in _runs(events.get("handle", []), gap):
            # a request's transit is logged from its sending, just before its handling starts
            transit = [e for e in events.get("transit", []) if run[0][0] - gap < e[0] <= run[-1][0]]
            served.append(
                dict(requests=len(run), handler_ms=mean_ms(run), transit_ms=mean_ms(transit) if transit else None)
            )
        if asked or served:
            rows.append(dict(process=name[:60], pid=int(path.stem), asked=asked, served=served))
    return rows


def round_overheads(server_log: Path, metrics_file: Path, clients: int) -> list[dict]:
    """Per round after the first: wall between the last aggregations, slowest site's training, and the difference."""
    pattern = re.compile(rf"^(\S+ \S+) - \w*FedAvg .* Aggregated {clients}/{clients} results")
    ends = [
        datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        for line in server_log.read_text().splitlines()
        if (m := pattern.match(line))
    ]
    metrics = json.loads(metrics_file.read_text())
    rows = []
    for r in range(1, len(ends)):
        wall = (ends[r] - ends[r - 1]).total_seconds()
        sites = [m for m in metrics if m["round"] == r and "seconds" in m]
        train = max(m["seconds"] for m in sites)  # the site's whole round: its evaluation (val_seconds) included
        evaluation = max((m.get("val_seconds", 0.0) for m in sites), default=0.0)
        rows.append(
            dict(round=r, wall_s=round(wall, 1), slowest_training_s=round(train, 1), overhead_s=round(wall - train, 1),
                 slowest_evaluation_s=round(evaluation, 1))
        )  # fmt: skip
    return rows


TRANSFER_DONE = re.compile(
    r"\[(server|client)\] download (?:tx \S+|ref=\S+) done: (?:status=finished )?elapsed=([\d.]+)s .*\(([\d,]+) bytes"
)


def transfer_megabytes(server_log: Path) -> list[dict]:
    """Per round, from the server's log: MB of each site's download of the global model and of each result."""
    rounds: list[dict] = []
    for line in server_log.read_text().splitlines():
        if "Round " in line and " started." in line:
            rounds.append({"global_model_mb": [], "results_mb": []})
        elif rounds and (m := TRANSFER_DONE.search(line)):
            key = "global_model_mb" if m.group(1) == "server" else "results_mb"
            rounds[-1][key].append(round(int(m.group(3).replace(",", "")) / 1e6))
    return rounds


TRAINING_ONLY = """
import resource, sys
from local_trainer import LocalTrainer, parse_train_args
LocalTrainer(parse_train_args(sys.argv[1:])).train_round(None)
print("TRAINING_ONLY_PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def extra_args(args: argparse.Namespace) -> list[str]:
    return (TRAIN_ARGS + (" --bf16 False --max_pixels 4096" if args.tiny else "")).split()


def training_only_rss_gib(train_args: list[str], env: dict[str, str]) -> float:
    """Peak RSS of one site's trainer training a round on its own, with no NVFlare and no exchange: what training
    itself needs in host memory (libraries, CUDA context, data), to subtract from the job's peak. `env`: the
    environment the job's processes get (its malloc settings change the RSS)."""
    out = subprocess.run(
        [sys.executable, "-c", TRAINING_ONLY, *train_args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("TRAINING_ONLY_PEAK_RSS_KIB")), None)
    if line is None:
        raise RuntimeError(f"training-only run failed: {out.stderr[-2000:]}")
    return int(line.split()[1]) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--max_steps", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of this script")
    ap.add_argument("--workdir", default="/tmp/bench_fl_round")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the job's processes")
    ap.add_argument("--site_args", default="", help='more client.py flags, e.g. --site_args="--checkpoint every"')
    ap.add_argument("--val_records", type=int, default=32, help="records of each site's val.json (0: no evaluation)")
    ap.add_argument("--solo_only", action="store_true", help="only measure one trainer training alone")
    ap.add_argument("--probe", action="store_true", help="time NVFlare's download requests (bench/request_probe)")
    ap.add_argument("job_args", nargs="*", help="extra job.py flags after --, e.g. -- --part_mb 64")
    args = ap.parse_args()
    # What job.py gives the simulator's processes (host_memory.ENV where unset), and --env.
    job_env = host_memory.ENV | os.environ | env_overrides(args.env)

    work = Path(args.workdir)
    model_dir = build_model_dir(work / ("tiny-qwen3-vl" if args.tiny else "qwen3-vl-2b-random"), args.tiny, 448 * 448)
    build_dataset(work / "images", n=64, image_size=64 if args.tiny else 448, mixed_sizes=False)
    train = (work / "images" / "train.json").read_text()
    val = json.dumps(json.loads(train)[: args.val_records])  # each site scores the received model (job.py's defaults)
    for i in range(1, args.clients + 1):
        (work / "data" / f"site-{i}").mkdir(parents=True, exist_ok=True)
        (work / "data" / f"site-{i}" / "train.json").write_text(train)
        (work / "data" / f"site-{i}" / "val.json").unlink(missing_ok=True)
        if args.val_records:
            (work / "data" / f"site-{i}" / "val.json").write_text(val)
    training_only = training_only_rss_gib(
        [*extra_args(args), "--model_name_or_path", str(model_dir), "--dataset_use", str(work / "data" / "site-1"),
         "--image_root", str(work / "images"), "--max_steps", str(args.max_steps), "--output_dir", str(work / "solo")],
        job_env,
    )  # fmt: skip
    if args.solo_only:
        print(json.dumps(dict(env=args.env, training_only_peak_rss_gib_per_site=round(training_only, 2))), flush=True)
        return
    gpu = [] if args.tiny else ["--gpu", ",".join("[0]" for _ in range(args.clients))]
    extra = " ".join(extra_args(args) + args.site_args.split())  # --site_args: client.py's, not the solo run's
    cmd = [
        sys.executable, str(ROOT / "job.py"), "--model_name_or_path", str(model_dir), "--data_dir", str(work / "data"),
        "--image_root", str(work / "images"), "--n_clients", str(args.clients), "--num_rounds", str(args.rounds),
        "--max_steps", str(args.max_steps), "--learning_rate", "1e-5", "--workspace", str(work / "ws"),
        f"--train_args={extra}", *gpu, *args.job_args,
    ]  # fmt: skip
    peak = {"rss": 0, "by_process": {}, "timeline": []}
    if args.probe:
        job_env = job_env | probe_env(work / "probe", job_env)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env)
    watcher = threading.Thread(target=peak_tree_rss, args=(proc, peak), daemon=True)
    watcher.start()
    rc = proc.wait()
    wall = time.time() - start
    watcher.join(timeout=1)
    app = work / "ws" / "qwen3-vl" / "server" / "simulate_job" / "app_server"
    rows = round_overheads(work / "ws" / "qwen3-vl" / "server" / "log.txt", app / "site_metrics.json", args.clients)
    summary = dict(rc=rc, job_args=args.job_args, site_args=args.site_args, env=args.env, rounds=args.rounds,
                   clients=args.clients, wall_s=round(wall, 1),
                   peak_tree_rss_gib=round(peak["rss"] / 2**30, 1),
                   training_only_peak_rss_gib_per_site=round(training_only, 1),
                   peak_beyond_training_gib=round(peak["rss"] / 2**30 - args.clients * training_only, 1),
                   peak_dirty_page_cache_gib=peak.get("dirty"), per_round=rows,
                   megabytes_per_round=transfer_megabytes(work / "ws" / "qwen3-vl" / "server" / "log.txt"))  # fmt: skip
    top = sorted(peak["by_process"].items(), key=lambda kv: -kv[1])[:10]
    summary["peak_rss_gib_by_process"] = {k: round(v / 2**30, 1) for k, v in top}
    if args.probe:
        summary["requests"] = request_summary(work / "probe")
    (work / "rss_timeline.json").write_text(json.dumps(peak["timeline"], indent=0))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
