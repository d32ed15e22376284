"""The federated job end to end, run the way users run it: `python job.py ...` with NVFlare's simulator and torchrun.

Two jobs are shared by the tests below: 3 sites x 2 rounds where site-3's data is broken, then a 2-rank-per-site
job resumed from the first one's global model.
"""

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import transport
from job import free_port_base  # the ports job.py itself picks: runs side by side do not collide

ROOT = Path(__file__).resolve().parents[1]
JOB_NAME = "qwen3-vl"
SITE_SIZES = {"site-1": 16, "site-2": 8}  # unequal, so a plain mean and a sample-weighted mean differ
PART_MB = 4  # the tiny model's 19 MB token embedding travels in 5 row parts


def run_job(*args: str, timeout: float = 400, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "job.py"), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=env,
    )  # fmt: skip
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def start_job(out: Path, *args: str) -> subprocess.Popen:
    """`job.py` started in the background, in a session of its own, its console into `out`.stdout/.stderr."""
    files = [open(out.with_suffix(s), "w") for s in (".stdout", ".stderr")]  # noqa: SIM115 (closed by the child)
    return subprocess.Popen([sys.executable, str(ROOT / "job.py"), *args], stdout=files[0], stderr=files[1],
                            text=True, cwd=ROOT, start_new_session=True)  # fmt: skip


def finish_job(proc: subprocess.Popen, out: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    proc.wait(timeout=timeout)
    stdout, stderr = (out.with_suffix(s).read_text() for s in (".stdout", ".stderr"))
    print(stdout[-3000:], stderr[-3000:])
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until `text` is in the file at `path` (a log being written); fails if the job ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not (path.is_file() and text in path.read_text(errors="replace")):
        assert proc.poll() is None, f"the job ended before {text!r} was in {path}"
        assert time.monotonic() < deadline, f"no {text!r} in {path} after {timeout} s"
        time.sleep(0.2)


def pids_of(*parts: str) -> list[int]:
    """The processes whose command line holds every one of `parts`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(part in command for part in parts):
            found.append(int(proc.name))
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (NVFlare's processes each start a session of their own: a process group does not
    hold them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def trainer_pids(data: Path, site: str) -> list[int]:
    """The site's client.py processes (torchrun's ranks, not torchrun), found by the site's data folder."""
    return pids_of("-u custom/client.py", f"--dataset_use {data / site} ")


def small_job(data: Path, images: Path, model: Path, workspace: Path, sites: int = 2) -> list[str]:
    """job.py's flags for a quick job on the tiny model: `sites` sites of `data`, one step a round, no evaluation."""
    return [
        "--n_clients", str(sites), "--max_steps", "1", "--eval_every", "0", "--data_dir", str(data),
        "--image_root", str(images), "--model_name_or_path", str(model), "--learning_rate", "2e-3",
        "--workspace", str(workspace), "--master_port", str(free_port_base(sites)), f"--train_args={demo_train_args()}",
    ]  # fmt: skip


def downloaded_bytes(log: str) -> list[int]:
    """Each download NVFlare logged, in bytes: the sites' results in the server's log, the global model in a site's."""
    return [int(n.replace(",", "")) for n in re.findall(r"download ref=\S+ done: .*\(([\d,]+) bytes\)", log)]


def demo_train_args() -> str:
    from job import DEMO_TRAIN_ARGS

    return DEMO_TRAIN_ARGS + " --save_sent"


def site_app(workspace: Path, site: str) -> Path:
    return workspace / site / "simulate_job" / f"app_{site}"


def server_app(workspace: Path) -> Path:
    return workspace / "server" / "simulate_job" / "app_server"


def global_weights(workspace: Path) -> dict[str, torch.Tensor]:
    return torch.load(server_app(workspace) / "FL_global_model.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def site_data(tmp_path_factory, synthetic_pubmedvision) -> Path:
    """site-1 and site-2 with 16 and 8 records; site-3's train.json is not JSON."""
    from prepare_data import add_image_placeholders
    from synthetic_data import JSON_NAME

    records = json.loads((synthetic_pubmedvision / JSON_NAME).read_text())
    data = tmp_path_factory.mktemp("data")
    start = 0
    for site, n in SITE_SIZES.items():
        (data / site).mkdir()
        shard = [add_image_placeholders(r) for r in records[start : start + n]]
        (data / site / "train.json").write_text(json.dumps(shard))
        start += n
    (data / "site-3").mkdir()
    (data / "site-3" / "train.json").write_text('[{"id": "truncated"')
    return data


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory, tiny_model_dir, site_data, synthetic_pubmedvision):
    """3 sites x 2 rounds, site-3 broken, the token embedding sent in row parts; returns (process, job workspace)."""
    workspace = tmp_path_factory.mktemp("ws")
    proc = run_job(
        "--n_clients", "3", "--num_rounds", "2",
        "--data_dir", str(site_data), "--image_root", str(synthetic_pubmedvision),
        "--model_name_or_path", str(tiny_model_dir), "--learning_rate", "2e-3",
        "--workspace", str(workspace), "--master_port", str(free_port_base(3)),
        "--part_mb", str(PART_MB), f"--train_args={demo_train_args()}",
    )  # fmt: skip
    return proc, workspace / JOB_NAME


def sent_updates(ws: Path, sites, rounds) -> tuple[dict, dict]:
    """What each site sent each round (`--save_sent`): the update and its weight (samples)."""
    sent, weights = {}, {}
    for site in sites:
        sent_dir = site_app(ws, site) / "qwen3vl_checkpoints" / "sent"
        for rnd in rounds:
            sent[(rnd, site)] = load_file(sent_dir / f"round-{rnd}.safetensors")
            weights[(rnd, site)] = json.loads((sent_dir / f"round-{rnd}.json").read_text())["samples"]
    return sent, weights


def expected_global(start: dict, sent: dict, weights: dict, rounds) -> dict[str, torch.Tensor]:
    """`start` plus each round's sample-weighted average of the sites' updates, in float64 (a key a site did not
    send is no change from it)."""
    expected = {k: v.double() for k, v in start.items()}
    for rnd in rounds:
        total = sum(w for (r, _), w in weights.items() if r == rnd)
        for (r, site), update in sent.items():
            if r == rnd:
                for key, value in update.items():
                    expected[key] += weights[(r, site)] * value.double() / total
    return expected


@pytest.mark.slow
def test_global_model_is_fp32_sample_weighted_average_and_broken_site_weighs_nothing(fedavg_run, tiny_model_dir):
    proc, ws = fedavg_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = global_weights(ws)
    from model import Qwen3VLModel

    initial = Qwen3VLModel(str(tiny_model_dir)).state_dict()
    sent, weights = sent_updates(ws, SITE_SIZES, (0, 1))
    assert weights == {(rnd, site): float(n) for rnd in (0, 1) for site, n in SITE_SIZES.items()}
    update = sent[(1, "site-1")]
    # Only the trained tensors travel back (the vision tower is frozen), each as bf16.
    assert update.keys() < final.keys() and all(v.dtype == torch.bfloat16 for v in update.values())
    assert not any(k.startswith("model.visual.blocks.") for k in update)
    # The global model is fp32: the initial weights plus each round's sample-weighted average of the updates.
    assert final.keys() == initial.keys() and all(v.dtype == torch.float32 for v in final.values())
    expected = expected_global(initial, sent, weights, (0, 1))
    for key, value in final.items():
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-8, msg=key)
    plain = {k: v.double() for k, v in initial.items()}
    for upd in sent.values():
        for key, value in upd.items():
            plain[key] += value.double() / len(SITE_SIZES)
    assert any(not torch.allclose(final[k].double(), plain[k], rtol=1e-6, atol=1e-8) for k in update)
    assert any(not torch.equal(initial[k].float(), final[k]) for k in final), "the global model did not change"
    # The weights travelled compressed both ways (--compress_weights, the default): NVFlare logs every download's
    # bytes, the sites' updates in the server's log and the global model (bf16) in each site's.
    raw = sum(v.numel() * 2 for v in final.values())
    logs = "".join((ws / name / "log.txt").read_text() for name in ("server", "site-1", "site-2"))
    moved = downloaded_bytes(logs)
    assert len(moved) >= 8 and all(n < 0.8 * raw for n in moved), (moved, raw)

    # The server's record: site-1 and site-2 weighed by their samples; site-3 sent no weights, only its error
    # (a placeholder tensor gets its result past NVFlare's FedAvg to the aggregator), in both rounds.
    records = json.loads((server_app(ws) / "site_metrics.json").read_text())
    weights_by_round = {(r["round"], r["site"]): r["weight"] for r in records}
    expected = {(rnd, s): float(n) for rnd in (0, 1) for s, n in SITE_SIZES.items()}
    assert weights_by_round == expected | {(0, "site-3"): 0.0, (1, "site-3"): 0.0}
    assert all("JSONDecodeError" in r["error"] for r in records if r["site"] == "site-3")
    server_log = (ws / "server" / "log.txt").read_text()
    assert server_log.count("site-3: left out of the average (weight 0.0, error: rank 0: JSONDecodeError") == 2
    # The weights went straight between each trainer and the server job (--adhoc_connections, the default).
    for site in SITE_SIZES:
        site_log = (ws / site / "log.txt").read_text()
        assert f"{site}.simulate_job.client_api_trainer_1: created adhoc connector" in site_log, site
        # The server told the sites to ask for their next task after 0.25 s (job.py), not NVFlare's 2 s.
        assert f"Finished one task run for client: {site} interval: 0.25 task_processed: True" in site_log
    # The updates were offloaded to the server's disk and added from there to the fp32 global model in place.
    # Both ways the tensors travel grouped into items (transport.py), each offloaded item one file.
    part = int(PART_MB * 2**20)
    in_model_order = {k: update[k] for k in initial if k in update}  # as the site sends it (safetensors sorts keys)
    global_keys, update_keys = transport.split(final, part), transport.split(in_model_order, part)
    n_global_items = len(transport.group_keys(global_keys, dtype=torch.bfloat16))
    n_update_items = len(transport.group_keys(update_keys))
    assert len(global_keys) > len(final) > 5 * n_global_items
    added = (
        f"added the fp32 average of 2 site(s)' updates over 24 samples to {len(update_keys)} of {len(global_keys)} "
        f"tensors (2 read from disk in {2 * n_update_items} files)"
    )
    assert server_log.count(added) == 2
    # The sites received the global weights to disk, the embedding in row parts, and read them back tensor by
    # tensor (part by part), not into their memory. In round 1 the tensors no site sent an update of (the frozen
    # vision tower) were left out for the sites that trained in round 0: they still hold them as sent. site-3, whose
    # round failed, got the whole model again.
    untouched = final.keys() - update.keys()
    slim_keys = transport.leave_out(global_keys, untouched)
    assert any(k.startswith("model.visual.blocks.") for k in untouched) and len(slim_keys) < len(global_keys)
    for site in SITE_SIZES:
        site_log = (ws / site / "log.txt").read_text()
        assert f"site={site}: global weights are received to disk" in site_log
        slim = f"{len(slim_keys)} tensors ({len(slim_keys)} on disk), {len(untouched)} left out as this site holds them"
        for rnd, received in ((0, f"{len(global_keys)} tensors ({len(global_keys)} on disk)\n"), (1, slim)):
            assert f"site={site} round={rnd}: received {received}" in site_log
            assert f"site={site} round={rnd}: sent {len(update_keys)} tensors" in site_log
        assert not any((site_app(ws, site) / "qwen3vl_checkpoints" / "received").iterdir()), "files left behind"
    left_out = f"site-1, site-2: {len(untouched)} tensors no site has updated this run left out (the sites hold them)"
    assert server_log.count(f"{left_out}; site-3: the whole model") == 1
    # The console showed the rounds and each site's result, not NVFlare's detail (which is in the logs).
    assert "site-1: accepted with weight 16.0" in proc.stdout and "Round 1 started" in proc.stdout
    assert "GetTaskCommand" not in proc.stdout and "GetTaskCommand" in server_log
    assert "site=site-1 round=0: received" not in proc.stdout
    # The server serialized each item it sent once for the three sites' downloads (site-3 downloads, then fails);
    # in round 1 site-3's whole model and the two others' without the untouched tensors.
    shared = f"the sites' downloads were served {3 * n_global_items} tensor items from {n_global_items} serializations"
    n_slim_items = len(transport.group_keys(slim_keys, dtype=torch.bfloat16))
    assert server_log.count(shared) == 1
    assert f"the sites' downloads were served {n_global_items + 2 * n_slim_items} tensor items from" in server_log
    losses = {(r["round"], r["site"]): r["loss"] for r in records if "loss" in r}
    assert losses[(1, "site-1")] < losses[(0, "site-1")], "the tiny model should learn"
    assert "round 1 site-3: weight 0 (failed: rank 0: JSONDecodeError" in proc.stdout

    # site-3 logged the failure each round (it retried) and sent weight 0; the job still finished.
    log3 = (ws / "site-3" / "log.txt").read_text()
    assert log3.count("site training failed (--trainer builtin): rank 0: JSONDecodeError") == 2
    assert log3.count("sent weight 0 (after error) check ") == 2
    assert "site-3/train.json" in log3


@pytest.mark.slow
def test_job_outputs_checkpoints_and_clean_exit(fedavg_run):
    proc, ws = fedavg_run
    assert proc.returncode == 0
    # Only the latest round's checkpoint stays on each site.
    ckpts = site_app(ws, "site-1") / "qwen3vl_checkpoints"
    assert sorted(p.name for p in ckpts.glob("round-*")) == ["round-1"]
    assert (ckpts / "round-1" / "model.safetensors").is_file()
    # Per-site loss reached TensorBoard through NVFlare's tracking, and the plot was written.
    for site in ("site-1", "site-2"):
        assert list((ws / "server" / "simulate_job" / "tb_events" / site).glob("events.out.tfevents.*"))
    assert (ws / "loss_per_site.png").stat().st_size > 10_000
    for what in ("FL_global_model.pt", "hf_global_model", "loss_per_site.png", "tb_events", "site-1/log.txt"):
        assert what in proc.stdout, what
    # Sites left after NVFlare's orderly SHUTDOWN instead of being killed.
    for site in ("site-1", "site-2", "site-3"):
        log = (ws / site / "log.txt").read_text()
        assert "survived SIGTERM" not in log and "SignalException" not in log, site


@pytest.mark.slow
def test_exported_hf_directory_loads_and_generates(fedavg_run):
    from PIL import Image
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    _, ws = fedavg_run
    hf_dir = server_app(ws) / "hf_global_model"
    model = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.bfloat16)
    final = global_weights(ws)
    for key, value in final.items():  # the fp32 global model's bf16 rounding
        assert torch.equal(model.state_dict()[key], value.to(torch.bfloat16)), key
    processor = AutoProcessor.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is drawn?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (64, 64), (220, 30, 30))], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_resume_with_two_ranks_per_site(fedavg_run, tmp_path, tiny_model_dir, site_data, synthetic_pubmedvision):
    _, first = fedavg_run
    resume_from = server_app(first) / "FL_global_model.pt"
    proc = run_job(
        "--n_clients", "2", "--num_rounds", "1", "--nproc_per_client", "2",
        "--data_dir", str(site_data), "--image_root", str(synthetic_pubmedvision),
        "--model_name_or_path", str(tiny_model_dir), "--resume_from", str(resume_from), "--learning_rate", "2e-3",
        "--workspace", str(tmp_path), "--master_port", str(free_port_base(2)),
        f"--train_args={demo_train_args()}", "--no-adhoc_connections",  # relayed by each site's client job
        "--no-compress_weights",  # the weights as they are, both ways (the first run sent them compressed)
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    ws = tmp_path / JOB_NAME
    server_log = (ws / "server" / "log.txt").read_text()
    assert "adhoc" not in server_log
    # The run went on from the saved fp32 global model exactly: its bf16 rounding would be off by far more than this.
    resumed, before = global_weights(ws), global_weights(first)
    # The first run's rounds were 0 and 1: this one's is round 2.
    sent, weights = sent_updates(ws, SITE_SIZES, (2,))
    expected = expected_global(before, sent, weights, (2,))
    assert resumed.keys() == before.keys()
    for key, value in resumed.items():
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-8, msg=key)
    log = (ws / "site-1" / "log.txt").read_text()
    # NVFlare logs the bytes of every download: the sites' updates (server's log) and the global model (site's):
    # no fewer bytes than the bf16 tensors.
    global_raw = sum(v.numel() * 2 for v in before.values())
    update_raw = sum(v.numel() * 2 for v in sent[(2, "site-1")].values())
    assert len(downloaded_bytes(log)) == 1 and downloaded_bytes(log)[0] >= global_raw
    results = downloaded_bytes(server_log)
    assert len(results) == 2 and all(n >= update_raw for n in results), (results, update_raw)
    assert "site=site-1 round=2: rank 1 of 2 trained" in log  # the second torchrun rank (gloo) trained too
    assert "rank 1 local_trainer INFO: rank 1 trained on 8 samples" in log  # the trainer's own logging reaches log.txt
    records = json.loads((server_app(ws) / "site_metrics.json").read_text())
    assert {r["site"]: r["samples"] for r in records if r["round"] == 2} == {s: float(n) for s, n in SITE_SIZES.items()}
    # The history goes on: the first run's rounds come first (site-3's failures among them).
    assert [r["round"] for r in records if r["site"] == "site-3"] == [0, 1]


@pytest.mark.slow
def test_a_small_learning_rate_moves_the_global_model_in_proportion(
    tmp_path, tiny_model_dir, site_data, synthetic_pubmedvision
):
    """The same job at lr 1e-6 and 1e-4: the global model's change is about 1/100 as large, in the same direction.
    Sent as rounded bf16 weights, the small one's change would be rounded away (below half a bf16 step)."""
    from model import Qwen3VLModel

    initial = {k: v.double() for k, v in Qwen3VLModel(str(tiny_model_dir)).state_dict().items()}
    changes = {}
    for lr in ("1e-6", "1e-4"):
        proc = run_job(
            "--n_clients", "2", "--num_rounds", "1", "--max_steps", "2",
            "--data_dir", str(site_data), "--image_root", str(synthetic_pubmedvision),
            "--model_name_or_path", str(tiny_model_dir), "--learning_rate", lr,
            "--workspace", str(tmp_path / lr), "--master_port", str(free_port_base(2)),
            f"--train_args={demo_train_args()}",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        final = global_weights(tmp_path / lr / JOB_NAME)
        changes[lr] = torch.cat([(final[k].double() - initial[k]).flatten() for k in initial])
    small, large = changes["1e-6"], changes["1e-4"]
    ratio = float(small.norm() / large.norm())
    cosine = float(small @ large / (small.norm() * large.norm()))
    assert 0.005 < ratio < 0.02 and cosine >= 0.9, (ratio, cosine)


@pytest.mark.slow
def test_when_every_site_fails_the_global_model_stays_and_the_job_fails(
    tmp_path, tiny_model_dir, synthetic_pubmedvision
):
    (tmp_path / "data" / "site-1").mkdir(parents=True)
    (tmp_path / "data" / "site-1" / "train.json").write_text("[]")
    proc = run_job(
        "--n_clients", "1", "--num_rounds", "1", "--data_dir", str(tmp_path / "data"),
        "--image_root", str(synthetic_pubmedvision), "--model_name_or_path", str(tiny_model_dir),
        "--workspace", str(tmp_path / "ws"), "--master_port", str(free_port_base(1)),
        f"--train_args={demo_train_args()}",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "no site contributed in any round" in proc.stderr
    assert re.search(r"initial model, untrained: no site contributed \(\.pt\)\s+\S+FL_global_model.pt", proc.stdout)
    from model import Qwen3VLModel

    initial, final = Qwen3VLModel(str(tiny_model_dir)).state_dict(), global_weights(tmp_path / "ws" / JOB_NAME)
    assert initial.keys() == final.keys() and all(torch.equal(initial[k].float(), final[k]) for k in initial)
    assert "no site contributed this round" in (tmp_path / "ws" / JOB_NAME / "server" / "log.txt").read_text()
    assert "round 0 site-1: weight 0 (failed: rank 0: ValueError" in proc.stdout


def test_export_writes_per_site_torchrun_commands(tmp_path, tiny_model_dir):
    proc = run_job(
        "--n_clients", "2", "--gpu", "[0,1],[2,3]", "--master_port", "31000", "--data_dir", str(tmp_path / "remote"),
        "--model_name_or_path", str(tiny_model_dir), "--export", str(tmp_path / "jobs"), "--wandb",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = tmp_path / "jobs" / JOB_NAME
    assert (job / "meta.json").is_file()
    assert {p.name for p in (job / "app_server" / "custom").iterdir()} >= {"fl_server.py", "model.py"}
    for i, gpus in ((1, "0,1"), (2, "2,3")):
        app = job / f"app_site-{i}"
        assert {p.name for p in (app / "custom").iterdir()} >= {"client.py", "local_trainer.py", "model.py"}
        config = json.loads((app / "config" / "config_fed_client.json").read_text())
        command = config["executors"][0]["executor"]["args"]["command"]
        assert command[:2] == ["env", f"CUDA_VISIBLE_DEVICES={gpus}"] and "FL_COLLECTIVE_TIMEOUT=1800" in command
        assert "--nproc_per_node=2" in command and f"--master_port={31000 + i}" in command
        assert f"{tmp_path / 'remote'}/site-{i}" in command
        assert config["submit_task_result_timeout"] >= 600 and config["tensor_min_download_timeout"] >= 600
    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    assert server["server"]["task_request_interval"] == 0.25  # NVFlare's 2 s would idle sites after each average
    paths = {c["path"] for c in server["components"]}
    assert {"fl_server.QwenPersistor", "nvflare.app_opt.tracking.wandb.wandb_receiver.WandBReceiver"} <= paths


def test_missing_site_folder_is_a_clear_error(tmp_path, site_data):
    proc = run_job("--n_clients", "4", "--data_dir", str(site_data))
    assert proc.returncode != 0
    assert "site-4" in proc.stderr and "prepare_data.py" in proc.stderr and "site-1" not in proc.stderr
    proc = run_job("--n_clients", "2", "--data_dir", str(site_data), "--image_root", str(tmp_path / "nowhere"))
    assert proc.returncode != 0 and f"--image_root {tmp_path / 'nowhere'} is not a folder" in proc.stderr
    proc = run_job("--n_clients", "3", "--gpu", "[0],[1]", "--data_dir", str(site_data), "--image_root", str(tmp_path))
    assert proc.returncode != 0 and "--gpu" in proc.stderr
    proc = run_job("--n_clients", "2", "--part_mb", "-1", "--data_dir", str(site_data))
    assert proc.returncode != 0 and "--part_mb -1 is negative" in proc.stderr
    proc = run_job("--n_clients", "2", "--task_request_interval", "0", "--data_dir", str(site_data))
    assert proc.returncode != 0 and "--task_request_interval 0 must be a positive number" in proc.stderr
    proc = run_job("--n_clients", "2", "--min_sites", "3", "--data_dir", str(site_data))
    assert proc.returncode != 0 and "--min_sites 3 must be between 1 and --n_clients 2" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_POC") != "1", reason="POC mode starts NVFlare services: set RUN_POC=1")
def test_poc_mode_end_to_end(tiny_model_dir, site_data, synthetic_pubmedvision):
    proc = run_job(
        "--env", "poc", "--n_clients", "2", "--num_rounds", "2", "--max_steps", "1",
        "--data_dir", str(site_data), "--image_root", str(synthetic_pubmedvision),
        "--model_name_or_path", str(tiny_model_dir), "--master_port", str(free_port_base(2)),
        f"--train_args={demo_train_args()}",
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = proc.stdout.split("Results under")[1]
    assert "(none found)" not in results
    for what in ("FL_global_model.pt", "hf_global_model", "loss_per_site.png", "site-1/", "site-2/"):
        assert what in results, what
    # The POC services started by job.py got --adhoc_connections too: each trainer connected to the server job.
    site_logs = [Path(w) for w in results.split() if w.endswith("log.txt") and "/site-" in w]
    assert len(site_logs) == 2, results
    for log in site_logs:
        assert "client_api_trainer_1: created adhoc connector" in log.read_text(), log
    # Each round's global model was serialized once for both sites' downloads.
    server_log = next(Path(w) for w in results.split() if w.endswith("workspace/log.txt")).read_text()
    shared = re.findall(r"served (\d+) tensor items from (\d+) serializations", server_log)
    assert len(shared) == 2 and all(int(served) == 2 * int(made) for served, made in shared), shared


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_POC") != "1", reason="starts NVFlare services: set RUN_POC=1")
def test_prod_mode_submits_with_an_admin_startup_kit(tiny_model_dir, site_data, synthetic_pubmedvision, tmp_path):
    """--env prod against real provisioned services: NVFlare's POC provisioning gives the startup kits."""
    env = {**os.environ, "NVFLARE_POC_WORKSPACE": str(tmp_path / "poc")}
    nvflare = [sys.executable, "-m", "nvflare.cli"]
    subprocess.run([*nvflare, "poc", "prepare", "-c", "site-1", "site-2", "--force"], env=env, check=True, timeout=120)
    subprocess.run([*nvflare, "poc", "start", "-ex", "admin@nvidia.com"], env=env, check=True, timeout=120)
    try:
        kit = next((tmp_path / "poc").glob("*/prod_00/admin@nvidia.com"))
        proc = run_job(
            "--env", "prod", "--startup_kit", str(kit), "--n_clients", "2", "--num_rounds", "1", "--max_steps", "1",
            "--data_dir", str(site_data), "--image_root", str(synthetic_pubmedvision),
            "--model_name_or_path", str(tiny_model_dir), "--master_port", str(free_port_base(2)),
            f"--train_args={demo_train_args()}",
            timeout=600,
        )  # fmt: skip
    finally:
        subprocess.run([*nvflare, "poc", "stop"], env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FINISHED:COMPLETED" in proc.stdout
    results = proc.stdout.split("Results under")[1]
    for what in ("FL_global_model.pt", "hf_global_model", "loss_per_site.png"):
        assert what in results, what


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--server_optimizer", "sgd"], "--server_optimizer: invalid choice: 'sgd'"),
        (["--server_lr", "-0.1"], "--server_lr -0.1 must be a positive number"),
        (["--server_eps", "0"], "--server_eps 0 must be a positive number"),
        (["--server_momentum", "1"], "--server_momentum 1 must be in [0, 1)"),
        (["--server_betas", "0.9", "1.5"], "--server_betas 0.9 1.5 must be in [0, 1)"),
    ],
)
def test_bad_server_optimizer_flags_are_refused_at_parse_time(flags, message, site_data, capsys):
    from job import check_inputs, define_parser

    with pytest.raises(SystemExit) as exited:
        args = define_parser().parse_args(
            [
                "--n_clients",
                "2",
                "--num_rounds",
                "1",
                "--eval_max_new_tokens",
                "16",
                "--data_dir",
                str(site_data),
                *flags,
            ]
        )
        check_inputs(args)
    assert message in f"{exited.value.code} {capsys.readouterr().err}"


@pytest.mark.slow
def test_fedavgm_steps_the_global_model_with_server_momentum_and_saves_its_state(
    tmp_path, tiny_model_dir, site_data, synthetic_pubmedvision
):
    """fedavgm at server_lr 0.5 through the simulator: m = 0.9 m + avg, w += 0.5 m, from what the sites sent."""
    from model import Qwen3VLModel

    proc = run_job(
        "--n_clients", "2", "--num_rounds", "2", "--max_steps", "1",
        "--data_dir", str(site_data), "--image_root", str(synthetic_pubmedvision),
        "--model_name_or_path", str(tiny_model_dir), "--learning_rate", "2e-3",
        "--workspace", str(tmp_path), "--master_port", str(free_port_base(2)), f"--train_args={demo_train_args()}",
        "--server_optimizer", "fedavgm", "--server_lr", "0.5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    ws = tmp_path / JOB_NAME
    sent, weights = sent_updates(ws, SITE_SIZES, (0, 1))
    expected = {k: v.double() for k, v in Qwen3VLModel(str(tiny_model_dir)).state_dict().items()}
    momentum = {}
    for rnd in (0, 1):
        after = expected_global({k: v.clone() for k, v in expected.items()}, sent, weights, (rnd,))  # adds in place
        average = {k: v - expected[k] for k, v in after.items()}
        for key in {k for (r, _), update in sent.items() if r == rnd for k in update}:
            momentum[key] = 0.9 * momentum.get(key, 0) + average[key]
            expected[key] += 0.5 * momentum[key]
    final = global_weights(ws)
    for key, value in final.items():
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-8, msg=key)
    state = torch.load(server_app(ws) / "FL_server_optimizer.pt", weights_only=True)
    assert state["optimizer"] == "fedavgm" and set(state["state"]) == set(momentum)
    assert "server optimizer state (fedavgm)" in (ws / "server" / "log.txt").read_text()


@pytest.mark.slow
def test_sites_score_the_global_model_they_receive_and_eval_only_scores_a_model(
    tmp_path, tiny_model_dir, site_data, synthetic_pubmedvision
):
    """With a val.json per site, each round's results carry the site's scores of the model it received; the server
    records their weighted means and keeps the best scored model. `--eval_only` scores the initial model the same
    way, training nothing: its scores equal round 0's of the training run, which received the same model."""
    from prepare_data import add_image_placeholders
    from synthetic_data import JSON_NAME

    records = json.loads((synthetic_pubmedvision / JSON_NAME).read_text())
    data = tmp_path / "data"
    for i, site in enumerate(SITE_SIZES, start=1):
        (data / site).mkdir(parents=True)
        (data / site / "train.json").write_text((site_data / site / "train.json").read_text())
        val = [add_image_placeholders(r) for r in records[-4 * i :][:4]]
        (data / site / "val.json").write_text(json.dumps(val))
    common = (
        "--n_clients", "2", "--max_steps", "1", "--data_dir", str(data), "--image_root", str(synthetic_pubmedvision),
        "--model_name_or_path", str(tiny_model_dir), "--learning_rate", "2e-3", f"--train_args={demo_train_args()}",
        "--eval_samples", "2", "--eval_max_new_tokens", "4",
    )  # fmt: skip
    trained = run_job(*common, "--num_rounds", "3", "--eval_every", "2", "--workspace", str(tmp_path / "train"),
                      "--master_port", str(free_port_base(2)))  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    ws = tmp_path / "train" / JOB_NAME
    history = json.loads((server_app(ws) / "site_metrics.json").read_text())
    for rnd in range(3):
        got = {r["site"]: r for r in history if r["round"] == rnd}
        generated = rnd != 1  # every 2nd round and the last
        for site in SITE_SIZES:
            assert got[site]["val_samples"] == 4 and math.isfinite(got[site]["val_loss"]), (rnd, site)
            assert ("val_exact_match" in got[site]) == generated and ("val_token_f1" in got[site]) == generated
        mean = got["weighted mean"]
        assert mean["val_loss"] == pytest.approx(sum(got[s]["val_loss"] for s in SITE_SIZES) / 2, rel=1e-9)
        assert mean["val_samples"] == 8 and ("val_generated" in mean) == generated
    best = [r for r in history if r.get("best")]
    assert len(best) == 1 and best[0]["val_loss"] == min(r["val_loss"] for r in history if r["site"] == "weighted mean")
    assert (server_app(ws) / "FL_best_model.pt").is_file()
    assert "the model the sites received, weighted mean: val loss" in trained.stdout
    # the weighted means reached TensorBoard on the server's side, the sites' own values on theirs
    assert list((ws / "server" / "simulate_job" / "tb_events" / "simulator_server").glob("events.out.tfevents.*"))
    # --eval_only: the initial model scored on every site's val.json, nothing trained
    scored = run_job(*common, "--eval_only", "--workspace", str(tmp_path / "eval"),
                     "--master_port", str(free_port_base(2)))  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-2000:]
    evaluation = json.loads((server_app(tmp_path / "eval" / JOB_NAME) / "site_metrics.json").read_text())
    round0 = {r["site"]: r for r in history if r["round"] == 0}
    for r in evaluation:
        assert r["round"] == 0 and r.get("weight", 0) == 0
        for key in ("val_loss", "val_exact_match", "val_token_f1"):
            assert r[key] == pytest.approx(round0[r["site"]][key], rel=1e-5), (r["site"], key)
    assert "evaluated; val loss" in scored.stdout


@pytest.mark.parametrize("flag", ["--num_round", "--n_client", "--resume", "--work"])
def test_a_mistyped_or_shortened_flag_is_refused(flag, capsys):
    """A prefix of a flag is not taken for the flag: `--num_round 3` would otherwise silently mean --num_rounds."""
    from job import define_parser

    with pytest.raises(SystemExit) as exited:
        define_parser().parse_args([flag, "3"])
    assert exited.value.code == 2 and f"unrecognized arguments: {flag} 3" in capsys.readouterr().err


def test_torchrun_ports_are_free_ones_here_unless_given(monkeypatch):
    """Two jobs on one machine must not share site-i's torchrun port: without --master_port, sim and poc pick a
    range free here; prod and --export keep 29500 (the sites' machines' ports are not this one's to test)."""
    from job import define_parser, master_port

    def port(*argv: str) -> int:
        return master_port(define_parser().parse_args(["--n_clients", "3", *argv]))

    assert port("--master_port", "31000") == port("--master_port", "31000", "--env", "prod") == 31000
    assert port("--env", "prod") == port("--export", "x") == 29500
    for env in ("sim", "poc"):
        base = port("--env", env)
        for i in range(1, 4):  # each site's port can be listened on now
            with socket.socket() as s:
                s.bind(("127.0.0.1", base + i))
    with socket.socket() as held:  # a port in use is never handed out
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        monkeypatch.setattr(socket.socket, "getsockname", lambda self: ("127.0.0.1", taken - 1))
        with pytest.raises(SystemExit, match="no 3 free ports"):
            port()


def test_a_job_where_no_site_contributed_exits_non_zero_but_an_evaluation_does_not(tmp_path, capsys):
    """report() reads site_metrics.json: without a round with weight > 0 the model written is the initial one, so
    it is labelled so and the exit is 1; an --eval_only run (weight 0 by design, every site scored) exits 0."""
    from job import report

    torch.save({"model": {}, "meta_props": {"current_round": 0}}, tmp_path / "FL_global_model.pt")
    failed = {"round": 0, "weight": 0.0, "error": "rank 0: ValueError: no records"}
    cases = {
        "failed": ([{"site": s, **failed} for s in ("site-1", "site-2")], 1),
        "evaluated": ([{"round": 0, "site": s, "weight": 0.0, "val_loss": 2.0} for s in ("site-1", "site-2")], 0),
        "one trained": ([{"site": "site-1", **failed}, {"round": 0, "site": "site-2", "weight": 8.0, "loss": 1.5}], 0),
    }  # fmt: skip
    for name, (records, code) in cases.items():
        (tmp_path / "site_metrics.json").write_text(json.dumps(records))
        assert report(tmp_path, ["site-1", "site-2"], 1) == code, name
        out = capsys.readouterr()
        untrained = "initial model, untrained: no site contributed (.pt)"
        assert (untrained in out.out) == (code == 1) and ("global model (.pt)" in out.out) == (code == 0), name
        assert ("no site contributed in any round" in out.err) == (code == 1), name


def test_the_summary_names_each_output_once_in_one_column(tmp_path, capsys):
    from job import report

    torch.save({"model": {}, "meta_props": {"current_round": 0}}, tmp_path / "FL_global_model.pt")
    torch.save({}, tmp_path / "FL_best_model.pt")
    (tmp_path / "site_metrics.json").write_text(
        json.dumps([{"round": 0, "site": "site-1", "weight": 8.0, "loss": 1.5}])
    )
    for folder in ("server", "site-1", "site-2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "log.txt").write_text("")
    assert report(tmp_path, ["site-1"], 1) == 0
    lines = capsys.readouterr().out.split("Results under")[1].splitlines()[1:]
    assert sum("logs (server, each site)" in line for line in lines) == 1
    assert sum(line.endswith("log.txt") for line in lines) == 3
    column = {line.index(str(tmp_path) if str(tmp_path) in line else "(none found)") for line in lines}
    assert len(column) == 1, lines  # every path starts in the same column, the longest label's included
    assert "W&B" not in "".join(lines) and "LoRA" not in "".join(lines)  # optional outputs not produced


@pytest.mark.slow
def test_demo_resumes_from_its_own_global_model_in_the_same_workspace(tmp_path):
    """`--demo --workspace DIR` writes there; `--resume_from` the run's FL_global_model.pt with the same workspace
    (which the simulator empties) resumes from a copy kept beside it: the new run starts from exactly the file's
    weights. Neither run names --master_port: each takes free ports."""
    ws = tmp_path / "ws"
    demo = ("--demo", "--n_clients", "2", "--num_rounds", "1", "--workspace", str(ws), "--train_args=--save_sent")
    first = run_job(*demo)
    assert first.returncode == 0, first.stderr[-2000:]
    saved = server_app(ws / JOB_NAME) / "FL_global_model.pt"
    before = global_weights(ws / JOB_NAME)
    resumed = run_job(*demo, "--resume_from", str(saved))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"--resume_from {saved} lies in {ws / JOB_NAME}, which the simulator empties first" in resumed.stdout
    (kept,) = ws.glob("resume-*/FL_global_model.pt")
    assert all(torch.equal(v, torch.load(kept, weights_only=True)["model"][k]) for k, v in before.items())
    # The rounds continue: the first run's was round 0, so the resumed run's is round 1 (its data order, schedule
    # position and last round follow from that number).
    assert "Resuming after round 0: rounds 1 to 1" in resumed.stdout
    history = json.loads((server_app(ws / JOB_NAME) / "site_metrics.json").read_text())  # the first run's round too
    assert {r["round"] for r in history} == {0, 1} and "round 1 site-1: loss" in resumed.stdout
    # The resumed run's global model is the file's weights plus the round's sample-weighted average update.
    sites = ("site-1", "site-2")
    sent, weights = sent_updates(ws / JOB_NAME, sites, (1,))
    expected = expected_global(before, sent, weights, (1,))
    for key, value in global_weights(ws / JOB_NAME).items():
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-8, msg=key)


class _Payload:  # what a malicious checkpoint would run when unpickled
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_a_checkpoint_that_runs_code_when_loaded_is_refused(tmp_path):
    """`.pt` files are loaded weights-only: a pickled payload in a `--resume_from` or a compared checkpoint is refused
    with a message naming the file, and never runs."""
    import job
    import run_inference

    marker, bad = tmp_path / "ran", tmp_path / "FL_global_model.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "meta_props": _Payload(str(marker))}, bad)
    with pytest.raises(SystemExit, match=f"--resume_from {bad} is not a weights-only torch checkpoint"):
        job.resumed_round(str(bad))
    with pytest.raises(run_inference.UserError, match=f"cannot load {bad} as a weights-only torch checkpoint"):
        run_inference.read_checkpoint(bad)
    assert not marker.exists()


def test_a_model_the_hub_cannot_give_is_said_at_once(site_data, synthetic_pubmedvision, tmp_path):
    """A Hub ID that is not cached, with the Hub unreachable (here: an endpoint nobody listens on) or HF_HUB_OFFLINE
    set, stops job.py and run_inference.py with one line saying so, before any Hugging Face retries."""
    model = "nobody/not-a-cached-model"
    for extra in ({"HF_ENDPOINT": f"http://127.0.0.1:{free_port_base(0)}", "HF_HUB_OFFLINE": "0"},
                  {"HF_HUB_OFFLINE": "1"}):  # fmt: skip
        env = {**os.environ, **extra}
        job = subprocess.run(
            [sys.executable, str(ROOT / "job.py"), "--data_dir", str(site_data), "--image_root",
             str(synthetic_pubmedvision), "--model_name_or_path", model, "--workspace", str(tmp_path)],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
        )  # fmt: skip
        expected = "is unreachable" if extra.get("HF_HUB_OFFLINE") == "0" else "HF_HUB_OFFLINE is set"
        assert job.returncode == 1 and f"error: --model_name_or_path '{model}' (" in job.stderr, job.stderr
        assert expected in job.stderr and "Traceback" not in job.stderr
        inference = subprocess.run(
            [sys.executable, str(ROOT / "run_inference.py"), "--model_path", model, "--data_file",
             str(site_data / "site-1" / "train.json"), "--image_root", str(synthetic_pubmedvision)],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
        )  # fmt: skip
        assert inference.returncode != 0 and expected in inference.stderr and "Traceback" not in inference.stderr


@pytest.mark.slow
def test_a_site_killed_mid_round_is_left_out_down_to_min_sites_and_a_stopped_run_resumes(
    tmp_path, tiny_model_dir, site_data, synthetic_pubmedvision
):
    """SIGKILL mid-round. Run A (--min_sites 1): site-2's trainer process is killed in round 0; NVFlare does not start
    it again, so both rounds average site-1 alone and the run succeeds. Run B resumes from A's model (rounds 2-3,
    every site needed): site-2's whole client job is killed in round 2; 10 s after site-1 answered (--round_timeout)
    the round is discarded and the run stops with exit 1, saying so; FL_global_model.pt is still A's model, labelled
    unchanged, and a rerun resumes it at round 2."""
    from job import resumed_round
    from model import Qwen3VLModel

    a = tmp_path / "a"
    job = start_job(a, *small_job(site_data, synthetic_pubmedvision, tiny_model_dir, a), "--num_rounds", "2",
                    "--min_sites", "1")  # fmt: skip
    wait_for(a / JOB_NAME / "site-2" / "log.txt", "site=site-2 round=0: received", job)
    for pid in trainer_pids(site_data, "site-2"):
        os.kill(pid, signal.SIGKILL)
    first = finish_job(job, a)
    assert first.returncode == 0, first.stderr[-2000:]
    for rnd in (0, 1):
        assert f"round {rnd} site-1: loss" in first.stdout
        assert f"round {rnd} site-2: weight 0 (failed: its trainer process ended without a result" in first.stdout
    ws = a / JOB_NAME
    sent, weights = sent_updates(ws, ["site-1"], (0, 1))
    expected = expected_global(Qwen3VLModel(str(tiny_model_dir)).state_dict(), sent, weights, (0, 1))
    for key, value in global_weights(ws).items():  # the initial model plus site-1's updates alone
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-8, msg=key)

    b = tmp_path / "b"
    job = start_job(b, *small_job(site_data, synthetic_pubmedvision, tiny_model_dir, b), "--num_rounds", "2",
                    "--round_timeout", "10", "--resume_from", str(server_app(ws) / "FL_global_model.pt"))  # fmt: skip
    wait_for(b / JOB_NAME / "site-2" / "log.txt", "site=site-2 round=2: received", job)
    client_job = pids_of("simulator_worker", f"-o {b / JOB_NAME / 'site-2'} ")
    assert client_job
    for pid in client_job:
        os.kill(pid, signal.SIGKILL)
    second = finish_job(job, b)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert "Resuming after round 1: rounds 2 to 3" in second.stdout
    late = "round 2 site-2: weight 0 (failed: no result within --round_timeout 10 s of the first site's)"
    assert late in second.stdout
    assert "round 2 site-1: weight 0 (failed: round discarded: 1 of 2 sites answered (--min_sites 2))" in second.stdout
    kept = server_app(b / JOB_NAME) / "FL_global_model.pt"
    assert (
        "error: the federation stopped in round 2: fewer than --min_sites sites answered. "
        f"{kept} holds the model after round 1: continue with --resume_from {kept}"
    ) in second.stderr
    assert re.search(r"resumed model, unchanged \(\.pt\)\s+\S+FL_global_model.pt", second.stdout)
    before = global_weights(ws)
    assert all(torch.equal(v, before[k]) for k, v in global_weights(b / JOB_NAME).items())
    assert resumed_round(str(kept)) == 2
    # The metrics history goes on from A's: its rounds 0 and 1, then round 2 as it failed.
    history = json.loads((server_app(b / JOB_NAME) / "site_metrics.json").read_text())
    assert sorted((r["round"], r["site"]) for r in history) == [(rnd, s) for rnd in (0, 1, 2) for s in SITE_SIZES]


@pytest.mark.slow
def test_a_straggler_is_left_out_after_the_round_timeout(tmp_path, tiny_model_dir, site_data, synthetic_pubmedvision):
    """site-2's trainer hangs (SIGSTOP) in round 0: 10 s after site-1 answered (--round_timeout 10) the round goes on
    without it (--min_sites 1); woken up, its late result is ignored."""
    from model import Qwen3VLModel

    job = start_job(tmp_path / "job", *small_job(site_data, synthetic_pubmedvision, tiny_model_dir, tmp_path),
                    "--num_rounds", "1", "--min_sites", "1", "--round_timeout", "10")  # fmt: skip
    ws = tmp_path / JOB_NAME
    wait_for(ws / "site-2" / "log.txt", "site=site-2 round=0: received", job)
    straggler = trainer_pids(site_data, "site-2")
    assert straggler
    for pid in straggler:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(ws / "server" / "log.txt", "site-2: no result in round 0", job)
    finally:
        for pid in straggler:
            os.kill(pid, signal.SIGCONT)
    done = finish_job(job, tmp_path / "job")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "round 0 site-2: weight 0 (failed: no result within --round_timeout 10 s of the first site's)" in done.stdout
    sent, weights = sent_updates(ws, ["site-1"], (0,))
    expected = expected_global(Qwen3VLModel(str(tiny_model_dir)).state_dict(), sent, weights, (0,))
    for key, value in global_weights(ws).items():  # the initial model plus site-1's update alone
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-8, msg=key)


@pytest.mark.slow
def test_a_killed_server_leaves_a_whole_global_model_and_a_rerun_resumes(
    tmp_path, tiny_model_dir, site_data, synthetic_pubmedvision
):
    """The whole job (job.py, the server, the client job and its trainer) SIGKILLed in round 2: FL_global_model.pt,
    written atomically (temp file, fsync, rename), is a whole checkpoint of round 0 or 1 (the save of round 1 may have
    been under way); a rerun with --resume_from in the same workspace goes on from the round after it."""
    ws = tmp_path / "ws"
    args = small_job(site_data, synthetic_pubmedvision, tiny_model_dir, ws, sites=1)
    job = start_job(tmp_path / "job", *args, "--num_rounds", "3")
    wait_for(ws / JOB_NAME / "site-1" / "log.txt", "site=site-1 round=2: received", job)
    for pid in process_tree(job.pid):  # the server, the client job, its trainer and job.py: the machine is gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.wait()
    saved = server_app(ws / JOB_NAME) / "FL_global_model.pt"
    checkpoint = torch.load(saved, weights_only=True)
    last = checkpoint["meta_props"]["current_round"]
    assert last in (0, 1) and checkpoint["model"].keys() == global_weights(ws / JOB_NAME).keys()
    rerun = run_job(*args, "--num_rounds", "1", "--resume_from", str(saved))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Resuming after round {last}: rounds {last + 1} to {last + 1}" in rerun.stdout
    assert f"round {last + 1} site-1: loss" in rerun.stdout


@pytest.mark.slow
def test_a_site_whose_disk_fills_while_receiving_fails_the_round_and_says_where(
    tmp_path, small_disk, tiny_model_dir, site_data, synthetic_pubmedvision
):
    """The sites receive the global model into their --work_dir, here a 1 MiB disk the tiny model does not fit: each
    site's log says what could not be stored where, nothing part-written is left there, the run stops with exit 1
    and the initial FL_global_model.pt is kept whole, labelled untrained."""
    args = small_job(site_data, synthetic_pubmedvision, tiny_model_dir, tmp_path)
    args[-1] += f" --work_dir {small_disk}"  # --train_args, every site's
    done = run_job(*args, "--num_rounds", "1", "--round_timeout", "30")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    for site in SITE_SIZES:
        assert f"round 0 {site}: weight 0 (failed:" in done.stdout
        log = (tmp_path / JOB_NAME / site / "log.txt").read_text()
        assert f"could not store the received weights in {small_disk / 'received'}" in log
        assert "No space left on device" in log
    assert "search 'site training failed' or 'could not'" in done.stdout
    assert [p for p in (small_disk / "received").rglob("*") if p.is_file()] == []
    assert re.search(r"initial model, untrained: no site contributed \(\.pt\)\s+\S+FL_global_model.pt", done.stdout)
    from model import Qwen3VLModel

    initial, final = Qwen3VLModel(str(tiny_model_dir)).state_dict(), global_weights(tmp_path / JOB_NAME)
    assert initial.keys() == final.keys() and all(torch.equal(initial[k].float(), final[k]) for k in initial)


@pytest.mark.slow
def test_no_secret_in_the_environment_reaches_the_console_or_the_logs(
    tmp_path, tiny_model_dir, site_data, synthetic_pubmedvision
):
    """Keys and tokens in the environment (which the sites' trainers inherit) appear in no console line and in no
    file the job writes."""
    marker = "5ec7e7f4k3"
    secrets = {name: f"{name.lower()}-{marker}" for name in ("WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY")}
    ws = tmp_path / "ws"
    proc = run_job(*small_job(site_data, synthetic_pubmedvision, tiny_model_dir, ws, sites=1), "--num_rounds", "1",
                   env={**os.environ, **secrets})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker not in proc.stdout + proc.stderr
    written = [f for f in ws.rglob("*") if f.is_file()]
    assert any(f.name == "log.txt" for f in written)
    assert [f for f in written if marker.encode() in f.read_bytes()] == []
