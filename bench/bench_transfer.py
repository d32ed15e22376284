"""Benchmark: NVFlare's transfer of a state dict shaped like Qwen3-VL-2B's, with no model and no training.

Runs a FedAvgRecipe in the simulator (external client processes, PyTorch exchange, our aggregator with disk offload)
whose server holds the global state dict in fp32 and sends it in bf16 (cast item by item on the wire, as job.py's
server does), and whose clients receive it and send back a bf16 update of every tensor (`ParamsType.DIFF`, which the
aggregator adds to the fp32 global model); it prints per round and client the
seconds to receive and to send and the MB/s; per transfer phase (all clients receiving, all sending) the CPU seconds
per GB moved of the server process and of the clients together; and per round how many tensor items the sites'
downloads were served and from how many serializations (`transport.SerializedOnce`). `--env NAME=VALUE` passes
NVFlare settings to every process of the run (e.g. NVFLARE_STREAMING_CHUNK_SIZE), to compare transport settings side
by side; `--part_mb 24` sends tensors over 24 MiB as row parts both ways (transport.py, as job.py does), 0 (the
default) whole; `--receive disk` has the clients receive to disk as job.py's sites do (transport.receive_to_disk);
`--layout 2b` (the default) sends the first `--gb` GB of the 2B model's own tensors (many small ones among them, as
the job sends), `--layout mats` only the embedding and 25 MB matrices; `--values randn --compress_weights` sends
random weights (as Hugging Face initializes them) packed both ways (`transport.pack`; the clients' updates are the
received weights scaled by 2**-7, so they pack as the weights do), `--values randn` alone the same weights plain;
`--probe` times every download request (bench/request_probe, as bench_fl_round.py's). `--gb` is what travels (bf16);
the server holds twice that in fp32.
Usage: python bench/bench_transfer.py [--gb 4.26] [--clients 1] [--rounds 2] [--part_mb 0] [--receive memory|disk]
    [--layout 2b|mats] [--values zeros|randn] [--compress_weights] [--probe] [--keep_logs DIR] [--env NVFLARE_X=1 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_fl_round import (  # noqa: E402
    TRANSFER_DONE,
    env_overrides,
    peak_tree_rss,
    probe_env,
    request_summary,
    transfer_megabytes,
)

SERVER_MODEL = '''
import torch
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

import transport

SHAPES = None  # the 2B model's tensor shapes, in state dict order (bench_transfer.py fills them in), or None

class StateDictOnly(torch.nn.Module):
    """An fp32 state dict of `gb` GB in bf16 (what travels): the first tensors of Qwen3-VL-2B's (SHAPES), or the 622 MB
    embedding and 25 MB matrices. fp32, as the job's server holds the global model (QwenPersistor)."""

    def __init__(self, gb: float, values: str = "zeros"):
        super().__init__()
        if SHAPES is not None:
            shapes, total = [], 0
            for shape in SHAPES:
                if total >= gb * 1e9:
                    break
                shapes.append(shape)
                total += 2 * torch.Size(shape).numel()
        else:
            shapes = [(151936, 2048)]
            shapes += [(6144, 2048)] * max(0, round((gb * 1e9 - 151936 * 2048 * 2) / (6144 * 2048 * 2)))
        self.tensors = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(s)) for s in shapes)
        if values == "randn":  # as Hugging Face initializes Qwen3-VL's weights: what --compress_weights packs
            for p in self.tensors:
                torch.nn.init.normal_(p, std=0.02)
                p.data = p.data.bfloat16().float()  # bf16 values, as QwenPersistor widens the base model's


class PartsPersistor(PTFileModelPersistor):
    """NVFlare's persistor of StateDictOnly, sending the state dict with large tensors in row parts (0: whole)."""

    def __init__(self, gb: float, part_bytes: int, values: str = "zeros"):
        super().__init__(model={"path": "state_model.StateDictOnly", "args": {"gb": gb, "values": values}},
                         allow_numpy_conversion=False)
        self.gb, self.part_bytes, self.values = gb, part_bytes, values  # NVFlare writes the config from these

    def load_model(self, fl_ctx):
        learnable = super().load_model(fl_ctx)
        learnable[ModelLearnableKey.WEIGHTS] = transport.split(learnable[ModelLearnableKey.WEIGHTS], self.part_bytes)
        return learnable

    def save_model(self, ml, fl_ctx):
        # detached: the aggregator's tensors are aliases that NVFlare's deep copy takes as they are, torch.save cannot
        weights = {k: v.detach() for k, v in transport.join(ml[ModelLearnableKey.WEIGHTS]).items()}
        super().save_model(make_model_learnable(weights, ml.get(ModelLearnableKey.META)), fl_ctx)
'''

CLIENT = """
import sys, tempfile, time
from pathlib import Path
import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
import transport
from model import materialize, tensor_shape

part_bytes, to_disk = int(sys.argv[1]), sys.argv[2] == "disk"
randn, packed = sys.argv[3] == "randn", sys.argv[4] == "packed"
if to_disk:  # as job.py's sites receive: NVFlare writes the received tensors into files, read back one at a time
    from transport import receive_to_disk

    folder = Path(tempfile.mkdtemp(prefix='received_', dir='.'))
    print(f"[transfer] receive to disk: {receive_to_disk(folder, packed)}")
else:  # into memory, sending in grouped items as job.py's sites do
    from nvflare.fuel.utils import fobs

    fobs.register(transport.GroupedTensorDecomposer(packed))


flare.init()
while flare.is_running():
    received = flare.receive()
    if received is None:
        break
    # a bf16 update of every tensor: the received random weights scaled by 2**-7 (their spread kept, so packing sees
    # what it got), or a constant
    if randn:
        params = {k: materialize(v) * 2**-7 for k, v in received.params.items()}
    else:
        params = {k: torch.full(tensor_shape(v), 2**-10, dtype=torch.bfloat16) for k, v in received.params.items()}
    round_num, received = received.current_round, None
    gb = sum(v.numel() * v.element_size() for v in params.values()) / 1e9
    ready = time.time()
    params = transport.split(params, part_bytes)  # parts stay parts; whole tensors over the size are split
    flare.send(FLModel(params_type=ParamsType.DIFF, params=params, metrics={"samples": 1.0},
                       meta={"NUM_STEPS_CURRENT_ROUND": 1}))
    print(f"[transfer] {flare.get_site_name()} round {round_num}: {gb:.2f} GB, send {time.time() - ready:.1f} s",
          flush=True)
"""


def stamped_lines(server_log: Path):
    """(seconds since the epoch, line) for each timestamped line of an NVFlare log; nothing if it does not exist."""
    stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)")
    for line in server_log.read_text().splitlines() if server_log.exists() else []:
        if m := stamp.match(line):
            yield datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), line


def download_seconds(server_log: Path) -> list[float]:
    """Per round, from the server's log: task sent to the clients until the global model was downloaded by all."""
    seconds, sent = [], None
    for t, line in stamped_lines(server_log):
        if "Sending task train" in line:
            sent = t
        elif "has been downloaded to all" in line and sent is not None:
            seconds.append(round(t - sent, 1))
            sent = None
    return seconds


SERIALIZATIONS = re.compile(r"downloads were served (\d+) tensor items from (\d+) serializations")


def serializations(server_log: Path) -> list[list[int]]:
    """Per round, from the aggregator's log line: [tensor items served to the sites' downloads, serializations]."""
    return [
        [int(m.group(1)), int(m.group(2))]
        for _, line in stamped_lines(server_log)
        if (m := SERIALIZATIONS.search(line))
    ]


def transfer_phases(server_log: Path) -> list[dict]:
    """The server log's transfers merged into phases: three clients receiving at once are one `receive` phase.

    NVFlare logs `[server] download tx ... done` when a client has downloaded the global model from the server and
    `[client] download ref ... done` when the server has downloaded a client's result, each with its seconds.
    """
    spans = []
    for end, line in stamped_lines(server_log):
        if done := TRANSFER_DONE.search(line):
            kind = "receive" if done.group(1) == "server" else "send"  # as the clients see it
            spans.append((kind, end - float(done.group(2)), end, int(done.group(3).replace(",", ""))))
    phases: list[dict] = []
    for kind, start, end, nbytes in sorted(spans, key=lambda s: s[1]):
        last = phases[-1] if phases else None
        if last and last["kind"] == kind and start <= last["end"]:
            last["end"], last["bytes"] = max(last["end"], end), last["bytes"] + nbytes
        else:
            phases.append(dict(kind=kind, start=start, end=end, bytes=nbytes))
    return phases


def cpu_seconds(samples: list[tuple[float, float, float]], start: float, end: float) -> tuple[float, float]:
    """User and system CPU seconds a process spent between two times, from its (time, user, system) samples."""

    def at(t):
        return min(samples, key=lambda s: abs(s[0] - t))

    (_, u0, s0), (_, u1, s1) = at(start), at(end)
    return u1 - u0, s1 - s0


def cpu_per_gb(phases: list[dict], cpu: dict, by_process: dict) -> list[dict]:
    """Per phase: CPU seconds per GB moved (user + system) of the server process and of all clients together."""
    servers = [k for k in by_process if "simulator.simulator " in k]
    server = max(servers, key=by_process.get) if servers else None
    clients = [k for k in cpu if "client.py" in k]
    rows = []
    for ph in phases:
        gb = ph["bytes"] / 1e9
        row = dict(phase=ph["kind"], seconds=round(ph["end"] - ph["start"], 1), gb=round(gb, 2))
        for name, keys in (("server", [server] if server in cpu else []), ("clients", clients)):
            spent = [cpu_seconds(cpu[k], ph["start"], ph["end"]) for k in keys]
            user, system = sum(u for u, _ in spent), sum(s for _, s in spent)
            row[f"{name}_cpu_s_per_gb"] = round((user + system) / gb, 2)
            row[f"{name}_user_sys"] = [round(user / gb, 2), round(system / gb, 2)]
        rows.append(row)
    return rows


def qwen3vl_2b_shapes() -> list[tuple[int, ...]]:
    """The shapes of Qwen3-VL-2B's state dict without the tied lm_head (625 tensors, 4.26 GB in bf16), in order."""
    import torch
    from bench_trainer import config_2b
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(config_2b(), dtype=torch.bfloat16)
    return [tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("lm_head")]


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=4.26, help="state dict size in GB (4.26: the 2B model)")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--part_mb", type=float, default=0, help="send tensors over this size in row parts; 0: whole")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for every process of the run")
    parser.add_argument(
        "--receive",
        choices=("memory", "disk"),
        default="memory",
        help="clients receive into memory or, as job.py's sites do, to disk",
    )
    parser.add_argument(
        "--layout",
        choices=("2b", "mats"),
        default="2b",
        help="2b: the first tensors of Qwen3-VL-2B's state dict (all 625 at 4.26 GB: 331 of 2 MiB and more, 322 "
        "smaller, with row parts); mats: the embedding and 25 MB matrices only",
    )
    parser.add_argument(
        "--values",
        choices=("zeros", "randn"),
        default="zeros",
        help="the state dict's values: zeros, or random as Hugging Face initializes the model (for packing); zeros "
        "with --compress_weights pack to next to nothing: the exchange's cost per request, without the bytes",
    )
    parser.add_argument(
        "--compress_weights", action="store_true", help="send packed both ways (job.py's --compress_weights)"
    )
    parser.add_argument("--probe", action="store_true", help="time NVFlare's download requests (bench/request_probe)")
    parser.add_argument("--keep_logs", type=Path, help="copy the run's NVFlare logs (server, sites) into this folder")
    args = parser.parse_args()

    sent_as = "packed" if args.compress_weights else "plain"
    work = Path(tempfile.mkdtemp(prefix="bench_transfer_"))
    shapes = qwen3vl_2b_shapes() if args.layout == "2b" else None
    server_model = textwrap.dedent(SERVER_MODEL).replace("SHAPES = None", f"SHAPES = {shapes!r}")
    (work / "state_model.py").write_text(server_model)
    (work / "transfer_client.py").write_text(textwrap.dedent(CLIENT))
    job = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.client.config import ExchangeFormat
from nvflare.recipe import SimEnv
from fl_server import SampleWeightedFedAvg
from state_model import PartsPersistor

part_bytes = {int(args.part_mb * 2**20)}
model = {{"path": "state_model.StateDictOnly", "args": {{"gb": {args.gb}, "values": {args.values!r}}}}}
recipe = FedAvgRecipe(name="transfer", model=model,
    model_persistor=PartsPersistor({args.gb}, part_bytes, {args.values!r}),
    train_args=f"{{part_bytes}} {args.receive} {args.values} {sent_as}",
    min_clients={args.clients}, num_rounds={args.rounds}, train_script={str(work / "transfer_client.py")!r},
    launch_external_process=True, server_expected_format=ExchangeFormat.PYTORCH, launch_timeout=600.0, key_metric="",
    aggregator=SampleWeightedFedAvg(compress_weights={args.compress_weights}),
    enable_tensor_disk_offload=True,
    server_memory_gc_rounds=1, client_memory_gc_rounds=1)
for f in ("fl_server.py", "model.py", "host_memory.py", "transport.py"):
    recipe.add_server_file({str(ROOT)!r} + "/" + f)
for f in ("model.py", "transport.py", "client.py", "host_memory.py"):
    recipe.add_client_file({str(ROOT)!r} + "/" + f)
recipe.add_server_file({str(work / "state_model.py")!r})
recipe.add_client_file({str(work / "state_model.py")!r})
timeouts = {{"get_task_timeout": 1200, "submit_task_result_timeout": 1200, "tensor_min_download_timeout": 1200,
            "streaming_per_request_timeout": 1200}}
recipe.add_client_config(timeouts)
recipe.add_server_config(timeouts)
recipe.execute(SimEnv(num_clients={args.clients}, workspace_root={str(work / "ws")!r})).get_result()
"""
    (work / "job.py").write_text(job)
    env = os.environ | env_overrides(args.env)
    if args.probe:
        env |= probe_env(work / "probe", env)
    start = time.time()
    proc = subprocess.Popen([sys.executable, "job.py"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    peak = {"rss": 0, "by_process": {}, "cpu": {}}
    threading.Thread(target=peak_tree_rss, args=(proc, peak), daemon=True).start()
    stdout, stderr = proc.communicate()
    wall = time.time() - start
    lines = [line for line in stdout.splitlines() if "[transfer]" in line and "ExternalProcess" not in line]
    sends = [float(m.group(1)) for line in lines if (m := re.search(r"send ([\d.]+) s", line))]
    server_log = work / "ws" / "transfer" / "server" / "log.txt"
    receives = download_seconds(server_log)
    for line in lines:
        print(line[line.index("[transfer]") :])
    print(json.dumps({"env": args.env, "layout": args.layout, "part_mb": args.part_mb, "receive": args.receive,
                      "values": args.values, "compress_weights": args.compress_weights,
                      "gb": args.gb,
                      "clients": args.clients,
                      "rounds": args.rounds,
                      "rc": proc.returncode,
                      "wall_s": round(wall, 1), "peak_tree_rss_gib": round(peak["rss"] / 2**30, 1),
                      "peak_rss_gib_by_process": {k: round(v / 2**30, 1) for k, v in
                                                  sorted(peak["by_process"].items(), key=lambda kv: -kv[1])[:6]},
                      "receive_s": receives, "send_s": sends, "served_serialized": serializations(server_log),
                      "megabytes_per_round": transfer_megabytes(server_log),
                      "receive_MB_per_s": [round(args.gb * 1e3 / s) for s in receives if s > 0],
                      "send_MB_per_s": [round(args.gb * 1e3 / s) for s in sends if s > 0],
                      "cpu_s_per_gb": cpu_per_gb(transfer_phases(server_log), peak["cpu"], peak["by_process"]),
                      "requests": request_summary(work / "probe") if args.probe else None}),
          flush=True)  # fmt: skip
    if proc.returncode:
        print(stdout[-3000:], stderr[-3000:])
    if args.keep_logs:
        for log in (work / "ws" / "transfer").glob("*/log.txt"):
            (args.keep_logs / log.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(log, args.keep_logs / log.parent.name / "log.txt")
    shutil.rmtree(work, ignore_errors=True)  # the run's workspace holds the offloaded state dicts (GBs)


if __name__ == "__main__":
    main()
