"""Build and run the federated Qwen3-VL fine-tuning job (NVFlare FedAvg, one torchrun per site), then say where
the global model, the loss plot and the logs are.

  python job.py --demo                                   # tiny model + synthetic data, 3 sites x 2 rounds on CPU
  python job.py --num_rounds 3 --max_steps 100           # real run: ./data/site-N/train.json, ./PubMedVision/images
  python job.py --export ./exported_job                  # write the job folder only (nvflare job submit ...)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import host_memory
from lora import ADAPTER_DIR_NAME, AGGREGATIONS, DEFAULT_TARGETS, PEFT_PREFIX

HERE = Path(__file__).resolve().parent
JOB_NAME = "qwen3-vl"
DEMO_DIR = HERE / "demo"
DEFAULT_WORKSPACE = "/tmp/nvflare/simulation"
DEFAULT_MASTER_PORT = 29500  # prod and export: the sites' machines, whose free ports this one cannot know
# Files each site needs next to client.py (qwen_official.py only when it exists).
CLIENT_FILES = (
    "local_trainer.py", "varlen_attention.py", "model.py", "host_memory.py", "transport.py", "qwen_official.py",
    "lora.py",
)  # fmt: skip
SERVER_FILES = ("fl_server.py", "model.py", "host_memory.py", "transport.py", "lora.py")
# NVFlare's comm setting `allow_adhoc_conns` as its processes read it from the environment (see --adhoc_connections).
ADHOC_ENV = "NVFLARE_ALLOW_ADHOC_CONNS"
# Small batches and images, and fp32 without gradient checkpointing: bf16 autocast is ~3x slower on CPU.
DEMO_TRAIN_ARGS = (
    "--per_device_train_batch_size 4 --gradient_accumulation_steps 1 --max_pixels 4096 --min_pixels 1024 "
    "--model_max_length 512 --warmup_ratio 0 --bf16 False --gradient_checkpointing False"
)


def define_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--demo", action="store_true", help="tiny model + synthetic data under ./demo, 3 sites x 2 rounds")
    p.add_argument("--n_clients", type=int, default=3, help="number of sites (site-1 .. site-N)")
    p.add_argument(
        "--min_sites", type=int, default=None,
        help="a round goes on without the sites that do not answer (trainer killed, client job gone, past "
        "--round_timeout) if at least this many answered; else the run stops after the last complete round "
        "(default: every site)",
    )  # fmt: skip
    p.add_argument("--num_rounds", type=int, default=None, help="FL rounds (default 3; 2 with --demo)")
    p.add_argument("--data_dir", default="./data", help="folder with site-N/train.json (python prepare_data.py)")
    p.add_argument("--image_root", default="PubMedVision", help="folder the records' image paths are relative to")
    p.add_argument("--model_name_or_path", default="Qwen/Qwen3-VL-2B-Instruct", help="Hub ID or local HF directory")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps per round (omit: one epoch per round)")
    p.add_argument("--learning_rate", default="5e-7", help="peak learning rate of each round")
    p.add_argument("--trainer", choices=("builtin", "qwen"), default="builtin", help="local_trainer.py or Qwen's code")
    p.add_argument(
        "--train_args",
        default="",
        help='flags added to every site\'s client.py: --train_args="--per_device_train_batch_size 2"',
    )
    p.add_argument("--gpu", default=None, help='GPU groups per site, e.g. "[0],[1],[2]" or "[0,1],[2,3]"')
    p.add_argument("--nproc_per_client", type=int, default=1, help="torchrun processes per site (without --gpu)")
    p.add_argument(
        "--master_port", type=int, default=None,
        help=f"site-i's torchrun uses master_port + i (default: a free range here in sim and poc, "
        f"{DEFAULT_MASTER_PORT} in prod and --export)",
    )  # fmt: skip
    p.add_argument(
        "--workspace", default=None,
        help=f"simulator workspace root (--env sim; default {DEFAULT_WORKSPACE}, ./demo/workspace with --demo)",
    )  # fmt: skip
    p.add_argument("--env", choices=("sim", "poc", "prod"), default="sim", help="where the job runs")
    p.add_argument("--startup_kit", default=None, help="admin startup kit folder (--env prod)")
    p.add_argument(
        "--export", nargs="?", const="/tmp/nvflare/jobs/job_config", default=None, metavar="DIR",
        help="write the job folder to DIR and stop (NVFlare's --export --export-dir DIR works too)",
    )  # fmt: skip
    p.add_argument("--export-dir", dest="export_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume_from", default=None, help="FL_global_model.pt of an earlier run as initial weights")
    p.add_argument(
        "--verbose", action="store_true",
        help="sim: NVFlare's detail on the console too (by default the console shows the rounds, each site's result "
        "and warnings; everything is in each site's and the server's log.txt)",
    )  # fmt: skip
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (offline without WANDB_API_KEY)")
    p.add_argument(
        "--adhoc_connections", action=argparse.BooleanOptionalAction, default=True,
        help="sim and POC: the weights travel straight between each site's trainer and the server job, over NVFlare's "
        "ad-hoc connections (NVFLARE_ALLOW_ADHOC_CONNS), not relayed by the site's client job process",
    )  # fmt: skip
    p.add_argument(
        "--part_mb", type=float, default=24,
        help="tensors larger than this many MiB travel as row parts of at most this size (0: whole tensors)",
    )  # fmt: skip
    p.add_argument(
        "--compress_weights", action=argparse.BooleanOptionalAction, default=True,
        help="send the global model and the sites' updates compressed, lossless (--no-compress_weights: as they are)",
    )  # fmt: skip
    p.add_argument(
        "--task_request_interval", type=float, default=0.25,
        help="seconds a site waits before asking the server for its next task again (NVFlare's default: 2)",
    )  # fmt: skip
    o = p.add_argument_group(
        "server optimizer (Reddi et al., Adaptive Federated Optimization, ICLR 2021)",
        "the sample-weighted average of the sites' updates is the pseudo-gradient; no bias correction, as in the paper",
    )
    o.add_argument(
        "--server_optimizer", choices=("fedavg", "fedavgm", "fedadam", "fedyogi"), default="fedavg",
        help="fedavg: w += lr*avg; fedavgm: server momentum; fedadam / fedyogi: adaptive",
    )  # fmt: skip
    o.add_argument("--server_lr", type=float, default=1.0, help="server learning rate (fedavg with 1: plain FedAvg)")
    o.add_argument("--server_momentum", type=float, default=0.9, help="fedavgm's momentum")
    o.add_argument(
        "--server_betas", type=float, nargs=2, default=[0.9, 0.99], metavar=("BETA1", "BETA2"),
        help="fedadam / fedyogi: decay of the first and second moments",
    )  # fmt: skip
    o.add_argument(
        "--server_eps", type=float, default=1e-3,
        help="fedadam / fedyogi: adaptivity tau added to sqrt(v); 1e-3 is the paper's tuned value (often better than "
        "Adam's 1e-8 for federated updates)",
    )  # fmt: skip
    e = p.add_argument_group("evaluation: each site scores the global model it receives on its val.json")
    e.add_argument(
        "--eval_every", type=int, default=5,
        help="validation loss every round; generation metrics (exact match, token F1, closed-question accuracy) every "
        "N rounds (rounds 0, N, 2N, ...) and in the last (16 answers: up to ~25 s a site on an H100); 0: no evaluation",
    )  # fmt: skip
    e.add_argument("--eval_samples", type=int, default=16, help="records per site answered for the generation metrics")
    e.add_argument(
        "--eval_max_new_tokens", type=int, default=None, help="longest answer generated (default 256; 16 with --demo)"
    )  # fmt: skip
    e.add_argument(
        "--eval_only", action="store_true",
        help="one round that scores the model (--resume_from, else --model_name_or_path) on every site's val.json, "
        "training nothing",
    )  # fmt: skip
    lo = p.add_argument_group(
        "LoRA (--peft lora): the sites train adapters on the language model and send only those (lora.py)"
    )
    lo.add_argument("--peft", choices=("none", "lora"), default="none", help="none: full fine-tuning; lora: adapters")
    lo.add_argument(
        "--lora_r", default="16",
        help="adapter rank; a comma list gives each site its own (site-1 first): the global adapter has the largest",
    )  # fmt: skip
    lo.add_argument("--lora_alpha", type=float, default=32.0, help="scale alpha / r (r: the global adapter's rank)")
    lo.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the adapters' input")
    lo.add_argument(
        "--lora_target_modules", default=DEFAULT_TARGETS,
        help="layer names of the language model (comma list), or a regex over module names",
    )  # fmt: skip
    lo.add_argument(
        "--lora_aggregation", choices=AGGREGATIONS, default="exact",
        help="exact: A shared and frozen, B trained (FFA-LoRA): the average of B is the average of the sites' "
        "B*A; naive: A and B trained and averaged separately (for comparison)",
    )  # fmt: skip
    t = p.add_argument_group("timeouts (seconds; sized for a 4.3 GB bf16 state dict)")
    t.add_argument(
        "--round_timeout", type=int, default=3600,
        help="how long a round waits for the other sites after the first one answered; those not in by then are "
        "left out of the round (see --min_sites). 0: wait for every site (one whose client job died: until NVFlare "
        "declares it dead; in the simulator, forever)",
    )  # fmt: skip
    t.add_argument(
        "--collective_timeout", type=int, default=1800,
        help="a site's ranks give up on a collective (broadcast, all-reduce) after this long, so one hung rank fails "
        "its site's round instead of hanging the others",
    )  # fmt: skip
    t.add_argument("--launch_timeout", type=float, default=1800, help="site process start-up to first contact")
    t.add_argument("--get_task_timeout", type=float, default=1800, help="client waiting for the global model")
    t.add_argument("--submit_task_result_timeout", type=float, default=1800, help="client uploading its weights")
    t.add_argument("--tensor_min_download_timeout", type=float, default=1800, help="lifetime of a tensor transfer")
    t.add_argument(
        "--streaming_per_request_timeout", type=float, default=120,
        help="one streamed request (at most 24 MiB); a request NVFlare loses is retried after it",
    )  # fmt: skip
    return p


# ------------------------------------------------------------------------------------------ per-site commands


def site_devices(args: argparse.Namespace) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES per site: "0,1" for GPUs, "" for CPU, None to leave it to the site (prod)."""
    if args.gpu is not None:
        groups = re.findall(r"\[([^\]]*)\]", args.gpu)
        if len(groups) != args.n_clients or not all(g.strip() for g in groups):
            raise SystemExit(
                f'error: --gpu "{args.gpu}" has {len(groups)} group(s) for --n_clients {args.n_clients}; '
                'give one non-empty group per site, e.g. "[0],[1],[2]" or "[0,1],[2,3],[4,5]"'
            )
        return [",".join(x.strip() for x in g.split(",")) for g in groups]
    if not runs_here(args):
        return [None] * args.n_clients
    import torch

    if not torch.cuda.is_available():
        return [""] * args.n_clients
    n = args.nproc_per_client
    if torch.cuda.device_count() < n * args.n_clients:
        raise SystemExit(
            f"error: {args.n_clients} sites x {n} processes need {n * args.n_clients} GPUs, this machine has "
            f'{torch.cuda.device_count()}; share them with --gpu, e.g. --gpu "[0],[0],[1]"'
        )
    return [",".join(str(i * n + j) for j in range(n)) for i in range(args.n_clients)]


def site_command(index: int, devices: str | None, nproc: int, args: argparse.Namespace) -> str:
    """torchrun for one site; NVFlare runs it without a shell, so the environment goes through `env`."""
    from local_trainer import COLLECTIVE_TIMEOUT_ENV

    local = runs_here(args)
    env = []
    if devices is not None:
        env.append(f"CUDA_VISIBLE_DEVICES={devices}")
    if devices == "" and local:
        # CPU sites share this machine's cores: one torch thread pool per core share, not one per core each.
        threads = max(1, (os.cpu_count() or 1) // (args.n_clients * nproc))
        env.append(f"OMP_NUM_THREADS={threads}")
    env.append(f"{COLLECTIVE_TIMEOUT_ENV}={args.collective_timeout}")
    python = sys.executable if local else "python3"
    torchrun = (
        f"{python} -u -m torch.distributed.run --nnodes=1 --nproc_per_node={nproc} "
        f"--master_addr=127.0.0.1 --master_port={args.master_port + index}"
    )
    return f"env {' '.join(env)} {torchrun}"


def runs_here(args: argparse.Namespace) -> bool:
    """True when the sites run on this machine (sim, poc), so local paths can be checked and made absolute."""
    return args.env != "prod" and not args.export


def free_port_base(count: int) -> int:
    """A base port with `count` free ports after it on this machine, so two jobs here do not collide."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count < 65000 and all(_port_is_free(base + i) for i in range(1, count + 1)):
            return base
    raise SystemExit(f"error: found no {count} free ports in a row for the sites' torchrun; pass --master_port")


def master_port(args: argparse.Namespace) -> int:
    """--master_port if given; else a free range here (sim, poc), or the usual 29500 on the sites' machines."""
    if args.master_port is not None:
        return args.master_port
    return free_port_base(args.n_clients) if runs_here(args) else DEFAULT_MASTER_PORT


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def site_path(args: argparse.Namespace, path: str) -> str:
    """Sites start in their app folder, so local paths must be absolute; prod paths belong to the sites."""
    return str(Path(path).resolve()) if runs_here(args) else path


def lora_ranks(args: argparse.Namespace) -> list[int]:
    """Each site's LoRA rank (`--lora_r`: one for all, or one per site)."""
    try:
        ranks = [int(r) for r in args.lora_r.split(",")]
    except ValueError:
        raise SystemExit(f"error: --lora_r {args.lora_r!r}: a rank, or one per site, e.g. 8,16,16") from None
    if len(ranks) == 1:
        ranks *= args.n_clients
    if len(ranks) != args.n_clients or min(ranks) < 1:
        raise SystemExit(f"error: --lora_r {args.lora_r!r}: give one rank >= 1, or one per site ({args.n_clients})")
    return ranks


def train_flag(train_args: str, name: str) -> str | None:
    """The last value `--train_args` gives the trainer flag `--name` (a bare boolean flag: "True"), or None."""
    value, words = None, shlex.split(train_args)
    for i, word in enumerate(words):
        if word == f"--{name}":
            follows = words[i + 1] if i + 1 < len(words) else "--"
            value = "True" if follows.startswith("--") else follows
        elif word.startswith(f"--{name}="):
            value = word.split("=", 1)[1]
    return value


def lora_settings(args: argparse.Namespace) -> dict | None:
    """The global adapter's settings (lora.LoraSettings' fields) for the server, or None without --peft lora. The
    mergers are trained fully only if --train_args says --tune_mm_mlp True (they would add 400 MB fp32 for 2B)."""
    if args.peft != "lora":
        return None
    mergers = (train_flag(args.train_args, "tune_mm_mlp") or "False").lower() in ("true", "1", "yes")
    return {
        "r": max(lora_ranks(args)), "alpha": args.lora_alpha, "dropout": args.lora_dropout,
        "target_modules": args.lora_target_modules, "aggregation": args.lora_aggregation, "train_mergers": mergers,
    }  # fmt: skip


def site_lora_args(args: argparse.Namespace, index: int) -> list[str]:
    """The trainer flags of site `index` (from 0) for --peft lora: the global adapter's, and its own rank."""
    lora = lora_settings(args)
    if lora is None:
        return []
    return [
        "--peft", "lora", "--lora_r", str(lora["r"]), "--lora_trained_r", str(lora_ranks(args)[index]),
        "--lora_alpha", f"{args.lora_alpha:g}", "--lora_dropout", f"{args.lora_dropout:g}",
        "--lora_target_modules", args.lora_target_modules, "--lora_aggregation", args.lora_aggregation,
        "--tune_mm_mlp", str(lora["train_mergers"]),
    ]  # fmt: skip


def site_train_args(args: argparse.Namespace, site_dir: str, index: int = 0) -> str:
    schedule = ["--max_steps", str(args.max_steps)] if args.max_steps else ["--num_train_epochs", "1"]
    flags = [
        "--trainer", args.trainer,
        "--part_mb", f"{args.part_mb:g}",
        "--compress_weights" if args.compress_weights else "--no-compress_weights",
        "--model_name_or_path", args.model_name_or_path,
        "--dataset_use", site_dir,
        "--image_root", site_path(args, args.image_root),
        "--learning_rate", str(args.learning_rate),
        *schedule,
        "--report_to", "none",
        "--eval_every", str(args.eval_every),
        "--eval_samples", str(args.eval_samples),
        "--eval_max_new_tokens", str(args.eval_max_new_tokens),
        *(["--eval_only"] if args.eval_only else []),
        *site_lora_args(args, index),
    ]  # fmt: skip
    return shlex.join(flags) + (" " + args.train_args if args.train_args else "")


# ------------------------------------------------------------------------------------------ inputs


def prepare_demo(args: argparse.Namespace) -> None:
    """Point the run at ./demo (tiny model, synthetic shards), building what is missing."""
    model_dir, raw_dir, data_dir = DEMO_DIR / "tiny-qwen3-vl", DEMO_DIR / "PubMedVision", DEMO_DIR / "data"
    if not (model_dir / "config.json").exists():
        from model import build_tiny_model

        print(f"Building the tiny random Qwen3-VL in {model_dir} ...")
        build_tiny_model(model_dir)
    shards = [data_dir / f"site-{i}" / f for i in range(1, args.n_clients + 1) for f in ("train.json", "val.json")]
    if not all(path.exists() for path in shards):
        import prepare_data
        from synthetic_data import write_dataset

        print(f"Writing synthetic PubMedVision-style data to {raw_dir} and splitting it into {args.n_clients} sites")
        json_path = write_dataset(raw_dir, num_records=24 * args.n_clients, seed=0)
        argv = ["--data_file", str(json_path), "--output_dir", str(data_dir), "--num_clients", str(args.n_clients)]
        if prepare_data.main(argv) != 0:
            raise SystemExit("error: splitting the demo data failed (see above)")
    args.model_name_or_path, args.data_dir, args.image_root = str(model_dir), str(data_dir), str(raw_dir)
    args.learning_rate = "2e-3"  # high enough for the random tiny model to learn visibly within two rounds
    args.workspace = args.workspace or str(DEMO_DIR / "workspace")
    args.train_args = f"{DEMO_TRAIN_ARGS} {args.train_args}".strip()


def check_inputs(args: argparse.Namespace) -> dict[str, str]:
    """Site name -> data folder, or exit naming what is missing and how to make it."""
    sites = {
        f"site-{i}": site_path(args, os.path.join(args.data_dir, f"site-{i}")) for i in range(1, args.n_clients + 1)
    }
    local = runs_here(args)  # prod/export: the paths live on the sites' machines
    missing = [name for name, folder in sites.items() if not (Path(folder) / "train.json").is_file()]
    data_dir = Path(args.data_dir).resolve()
    if local and missing:
        raise SystemExit(
            f"error: --data_dir {data_dir} has no train.json for {', '.join(missing)}. "
            f"Run `python prepare_data.py --output_dir {args.data_dir} --num_clients {args.n_clients}` first "
            "(or `python job.py --demo` for synthetic data)."
        )
    if local and Path(args.model_name_or_path).exists():  # a local HF directory, not a Hub ID
        args.model_name_or_path = str(Path(args.model_name_or_path).resolve())
    if args.resume_from and local and not Path(args.resume_from).is_file():
        raise SystemExit(f"error: --resume_from {args.resume_from} is not a file (expected an FL_global_model.pt)")
    if args.env == "prod" and not args.export and not args.startup_kit:
        raise SystemExit("error: --env prod needs --startup_kit (the admin's startup kit folder)")
    if args.nproc_per_client < 1 or args.n_clients < 1 or args.num_rounds < 1:
        raise SystemExit("error: --n_clients, --num_rounds and --nproc_per_client must be at least 1")
    if args.master_port is not None and not 1 <= args.master_port < 65536 - args.n_clients:
        raise SystemExit(f"error: --master_port {args.master_port} leaves no port for {args.n_clients} site(s)")
    if min(args.eval_every, args.eval_samples, args.eval_max_new_tokens) < 0:
        raise SystemExit("error: --eval_every, --eval_samples and --eval_max_new_tokens must be 0 or more")
    if args.eval_only and (args.eval_every == 0 or args.trainer != "builtin"):
        raise SystemExit("error: --eval_only needs the built-in trainer and --eval_every 1 or more")
    if args.part_mb < 0:
        raise SystemExit(f"error: --part_mb {args.part_mb:g} is negative (0 sends every tensor whole)")
    if not (math.isfinite(args.server_lr) and args.server_lr > 0):
        raise SystemExit(f"error: --server_lr {args.server_lr:g} must be a positive number")
    if not 0 <= args.server_momentum < 1:
        raise SystemExit(f"error: --server_momentum {args.server_momentum:g} must be in [0, 1)")
    if not all(0 <= b < 1 for b in args.server_betas):
        raise SystemExit(f"error: --server_betas {' '.join(f'{b:g}' for b in args.server_betas)} must be in [0, 1)")
    if not (math.isfinite(args.server_eps) and args.server_eps > 0):
        raise SystemExit(f"error: --server_eps {args.server_eps:g} must be a positive number")
    if args.min_sites is not None and not 1 <= args.min_sites <= args.n_clients:
        raise SystemExit(f"error: --min_sites {args.min_sites} must be between 1 and --n_clients {args.n_clients}")
    if args.round_timeout < 0 or args.collective_timeout <= 0:
        raise SystemExit("error: --round_timeout must be 0 (no limit) or more, --collective_timeout more than 0")
    if not args.task_request_interval > 0:
        raise SystemExit(f"error: --task_request_interval {args.task_request_interval:g} must be a positive number")
    if local and not Path(args.image_root).is_dir():
        raise SystemExit(
            f"error: --image_root {Path(args.image_root).resolve()} is not a folder (the records' image paths are "
            "relative to it; `python download_data.py` fetches PubMedVision there)"
        )
    return sites


def keep_resume_source(args: argparse.Namespace) -> None:
    """The simulator empties <workspace>/qwen3-vl before it starts: a --resume_from inside it (e.g. the last run's
    FL_global_model.pt) and the FL_server_optimizer.pt and site_metrics.json beside it are first linked (else copied)
    out of it, to <workspace>/resume-<time>-*/, and the run resumes from there."""
    if args.env != "sim" or args.export or not args.resume_from:
        return
    from fl_server import OPTIMIZER_FILE, SITE_METRICS_FILE

    source, cleared = Path(args.resume_from).resolve(), (Path(args.workspace) / JOB_NAME).resolve()
    if not source.is_relative_to(cleared):
        return
    keep = Path(tempfile.mkdtemp(prefix=f"resume-{time.strftime('%Y%m%d-%H%M%S')}-", dir=cleared.parent))
    for file in (source, source.with_name(OPTIMIZER_FILE), source.with_name(SITE_METRICS_FILE)):
        if file.is_file():
            try:
                os.link(file, keep / file.name)
            except OSError:
                shutil.copy2(file, keep / file.name)
    args.resume_from = str(keep / source.name)
    print(f"--resume_from {source} lies in {cleared}, which the simulator empties first: resuming from a copy, "
          f"{args.resume_from}")  # fmt: skip


# ------------------------------------------------------------------------------------------ the job


def resumed_round(checkpoint: str | None, peft: str | None = None) -> int:
    """The round a run resumed from `checkpoint` starts at: the one after the round that wrote it (0 if unknown).
    Only the file's metadata is read (mapped, not loaded): the 2B fp32 model is 8.5 GB. Given `peft` (the run's
    --peft), a LoRA adapter's checkpoint resumes only with --peft lora, a whole model's only without."""
    if not checkpoint or not Path(checkpoint).is_file():
        return 0
    import torch

    try:
        data = torch.load(checkpoint, weights_only=True, mmap=True, map_location="cpu")
    except Exception as err:  # torch raises several types for bad or unsafe files; all mean "not loadable"
        raise SystemExit(f"error: --resume_from {checkpoint} is not a weights-only torch checkpoint: {err}") from None
    weights = (data.get("model") if isinstance(data, dict) else None) or {}
    adapter = any(str(k).startswith(PEFT_PREFIX) for k in weights)
    if peft is not None and weights and adapter != (peft == "lora"):
        held = "a LoRA adapter: add --peft lora" if adapter else "a whole model, not a LoRA adapter: leave --peft out"
        raise SystemExit(f"error: --resume_from {checkpoint} holds {held}")
    meta = (data.get("meta_props") if isinstance(data, dict) else None) or {}
    last = meta.get("current_round")
    return last + 1 if isinstance(last, int) and last >= 0 else 0


def build_recipe(args: argparse.Namespace, sites: dict[str, str]):
    """FedAvg over `sites` (name -> data folder) with our aggregator and persistor, one torchrun per site."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.client.config import ExchangeFormat
    from nvflare.recipe import add_experiment_tracking, set_per_site_config

    from fl_server import SITE_METRICS_FILE, FaultTolerantFedAvg, QwenPersistor, SampleWeightedFedAvg

    names = list(sites)
    resume = site_path(args, args.resume_from) if args.resume_from else None

    class ResumingFedAvgRecipe(FedAvgRecipe):
        """NVFlare's FedAvg recipe with FaultTolerantFedAvg as its controller, starting at `start_round`."""

        def _create_controller(self, persistor_id: str, model_params, model_aggregator) -> FaultTolerantFedAvg:
            return FaultTolerantFedAvg(
                num_clients=self.min_clients, num_rounds=self.num_rounds, start_round=start_round,
                persistor_id=persistor_id, model=model_params, aggregator=model_aggregator, task_name="train",
                save_filename=self.save_filename, memory_gc_rounds=self.server_memory_gc_rounds,
                enable_tensor_disk_offload=self.enable_tensor_disk_offload,
                min_sites=args.min_sites or args.n_clients, round_timeout=args.round_timeout,
                ignore_result_error=True,  # a site whose trainer died is left out, not the run aborted
            )  # fmt: skip

    start_round = args.start_round = 0 if args.eval_only else resumed_round(resume, args.peft)
    lora = lora_settings(args)
    whole_model = lora is None  # multi-GB state dicts travel (not an adapter)
    if start_round:
        print(f"Resuming after round {start_round - 1}: rounds {start_round} to {start_round + args.num_rounds - 1}")
    recipe = ResumingFedAvgRecipe(
        name=JOB_NAME,
        min_clients=args.n_clients,
        num_rounds=args.num_rounds,
        model_persistor=QwenPersistor(
            args.model_name_or_path, source_ckpt_file_full_name=resume, part_bytes=int(args.part_mb * 2**20), lora=lora
        ),
        aggregator=SampleWeightedFedAvg(
            compress_weights=args.compress_weights,
            server_optimizer=args.server_optimizer,
            server_lr=args.server_lr,
            server_momentum=args.server_momentum,
            server_betas=args.server_betas,
            server_eps=args.server_eps,
            history_file=str(Path(resume).with_name(SITE_METRICS_FILE)) if resume else None,
            send_fp32=lora is not None,  # the adapter travels in fp32 both ways
        ),
        train_script=str(HERE / "client.py"),
        launch_external_process=True,
        server_expected_format=ExchangeFormat.PYTORCH,  # NumPy has no bf16
        launch_timeout=args.launch_timeout,
        shutdown_timeout=60.0,  # let the sites leave after NVFlare's SHUTDOWN instead of being SIGTERMed
        key_metric="",
        # gc + malloc_trim every round on the server and in the sites' client API: multi-GB state dicts freed by
        # Python otherwise stay in the allocator's arenas round after round. Adapters are tens of MB: no cleanup,
        # which would cost each round 0.3 s on the server and as much in each site after it sends.
        server_memory_gc_rounds=int(whole_model),
        client_memory_gc_rounds=int(whole_model),
        # The sites' results go to temporary files on the server (under $TMPDIR) instead of its memory; the
        # aggregator averages them tensor by tensor. A LoRA update (37 MB for 2B at r=16) stays in memory: from
        # files its average took 0.13-0.15 s against 0.02 s (bench_aggregate.py --lora_r 16 [--in_memory]).
        enable_tensor_disk_offload=whole_model,
    )
    per_site = {}
    for i, ((name, folder), devices) in enumerate(zip(sites.items(), site_devices(args), strict=True), start=1):
        nproc = len(devices.split(",")) if devices else args.nproc_per_client
        command = site_command(i, devices, nproc, args)
        per_site[name] = {"train_args": site_train_args(args, folder, i - 1), "command": command}
    set_per_site_config(recipe, per_site)
    for file in CLIENT_FILES:
        if (HERE / file).exists():
            recipe.add_client_file(str(HERE / file), clients=names)
    for file in SERVER_FILES:
        recipe.add_server_file(str(HERE / file))
    transfer = {"tensor_min_download_timeout": args.tensor_min_download_timeout}
    recipe.add_client_config(
        {"get_task_timeout": args.get_task_timeout, "submit_task_result_timeout": args.submit_task_result_timeout}
        | transfer
        | {"streaming_per_request_timeout": args.streaming_per_request_timeout},
        clients=names,
    )
    recipe.add_server_config(transfer | {"streaming_per_request_timeout": args.streaming_per_request_timeout})
    # NVFlare's server tells each site to wait this long after a task, and between polls while no task is ready:
    # with its default of 2 s a site could sit up to 2 s after the average before fetching the next global model.
    recipe.add_server_config({"server": {"task_request_interval": args.task_request_interval}})
    add_experiment_tracking(recipe, "tensorboard")
    if args.wandb:
        wandb_args = {"name": "qwen3-vl-fedavg", "project": "nvflare", "group": "nvidia", "job_type": "training"}
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        add_experiment_tracking(recipe, "wandb", {"wandb_args": wandb_args, "mode": mode})
    return recipe


def make_env(args: argparse.Namespace, names: list[str]):
    from nvflare.recipe import PocEnv, ProdEnv, SimEnv

    if args.env == "poc":
        return PocEnv(clients=names)
    if args.env == "prod":
        return ProdEnv(startup_kit_location=str(Path(args.startup_kit).resolve()))
    workspace = Path(args.workspace).resolve()
    log_config = None if args.verbose else quiet_log_config(workspace)
    return SimEnv(clients=names, num_threads=len(names), workspace_root=str(workspace), log_config=log_config)


def quiet_log_config(workspace: Path) -> str:
    """NVFlare's concise logging with a quieter console: the server's rounds and each site's result (fl_server's
    components) and every warning or error. Each process's log.txt keeps everything. Written to the workspace."""
    from nvflare.fuel.utils.log_utils import concise_log_dict

    config = copy.deepcopy(concise_log_dict)
    rounds = {"()": "nvflare.fuel.utils.log_utils.LoggerNameFilter", "logger_names": ["fl_server"]}
    config["filters"]["RoundsFilter"] = rounds
    config["handlers"]["consoleHandler"]["filters"] = ["RoundsFilter"]
    path = workspace / "log_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))
    return str(path)


# ------------------------------------------------------------------------------------------ results


OPTIONAL_OUTPUTS = ("best global model by val_loss (.pt)", "global LoRA adapter (PEFT dir)", "W&B runs (--wandb)")


def find_outputs(root: Path) -> dict[str, list[Path]]:
    """Everything worth pointing at under a finished job's workspace (simulator) or downloaded result."""
    return {
        "global model (.pt)": sorted(root.rglob("FL_global_model.pt")),
        "best global model by val_loss (.pt)": sorted(root.rglob("FL_best_model.pt")),
        "global model (Hugging Face dir)": sorted(p.parent for p in root.rglob("hf_global_model/config.json")),
        "global LoRA adapter (PEFT dir)": sorted(p.parent for p in root.rglob(f"{ADAPTER_DIR_NAME}/adapter_*.json")),
        "per-site metrics": sorted(root.rglob("site_metrics.json")),
        "TensorBoard logs": sorted(root.rglob("tb_events")),
        "W&B runs (--wandb)": sorted(root.rglob("wandb/*run-*")),
        "logs (server, each site)": sorted(root.rglob("log.txt")),
    }


def plot_losses(metrics_file: Path, png: Path) -> Path:
    """Training loss per site per round, and the validation loss of the global model each round started from, from
    the aggregator's site_metrics.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fl_server import MEAN

    records = json.loads(metrics_file.read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    for site in sorted({r["site"] for r in records} - {MEAN}):
        points = sorted((r["round"], r["loss"]) for r in records if r["site"] == site and r.get("loss") is not None)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=site)
    validation = sorted((r["round"], r["val_loss"]) for r in records if r["site"] == MEAN and "val_loss" in r)
    if validation:
        ax.plot(*zip(*validation, strict=True), "k--", marker="s", label="global model as received: val loss")
    ax.set(xlabel="FL round", ylabel="loss", title="Qwen3-VL federated fine-tuning: loss per site")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def scores(record: dict) -> str:
    """The `val_*` scores in a site_metrics.json record, as `val loss 1.23, exact_match 0.25`, or ''."""
    keys = ("val_loss", "val_exact_match", "val_token_f1", "val_closed_acc")
    found = [f"{k.removeprefix('val_')} {record[k]:.4g}" for k in keys if math.isfinite(record.get(k, math.nan))]
    return f"val {', '.join(found)}" if found else ""


def report(
    root: Path, sites: list[str], num_rounds: int, site_logs: list[Path] | None = None, start_round: int = 0
) -> int:
    """Print per-round site results and where every output is; write the loss plot. Non-zero without a model, when
    no site contributed to any round (nor, with --eval_only, scored the model): the model is the initial one, or when
    FL_global_model.pt holds an earlier round than the run's last (it stopped early, or a save failed)."""
    from fl_server import DISCARDED, MEAN

    outputs = find_outputs(root)
    outputs["logs (server, each site)"] += site_logs or []
    contributed = False  # some site trained (weight > 0) or, with --eval_only, scored the model, in some round
    stopped = None  # the round in which too few sites answered (fl_server.FaultTolerantFedAvg)
    if outputs["per-site metrics"]:
        try:
            outputs["loss plot (PNG)"] = [plot_losses(outputs["per-site metrics"][0], root / "loss_per_site.png")]
        except OSError as e:  # a full disk: the summary matters more
            print(f"warning: the loss plot was not written ({e})", file=sys.stderr)
        records = json.loads(outputs["per-site metrics"][0].read_text())
        failed = False
        ran = sorted({r["round"] for r in records}) or [start_round]
        for rnd in range(ran[0], ran[-1] + 1):
            got = {r["site"]: r for r in records if r["round"] == rnd}
            for site in sites:
                r = got.get(site) or {"weight": 0, "error": "no result"}
                evaluated_only = not r["weight"] and not r.get("error") and r.get("val_loss") is not None
                failed |= not (r["weight"] or evaluated_only)
                if rnd >= start_round:  # this run's rounds (a resumed run's history has the earlier ones first)
                    stopped = rnd if str(r.get("error")).startswith(DISCARDED) else stopped
                    contributed |= r["weight"] > 0 or evaluated_only
                failure = f"weight 0 (failed: {str(r.get('error'))[:160]})"
                sent = f", sent {r['sent_bytes'] / 1e6:.2f} MB" if "sent_bytes" in r else ""
                status = f"loss {r['loss']:.4f}, weight {r['weight']:g}{sent}" if r["weight"] else failure
                line = "; ".join(filter(None, ["evaluated" if evaluated_only else status, scores(r)]))
                print(f"  round {rnd} {site}: {line}")
            if MEAN in got:
                best = " (the best: FL_best_model.pt)" if got[MEAN].get("best") else ""
                print(f"  round {rnd} the model the sites received, weighted mean: {scores(got[MEAN])}{best}")
        if failed:
            print("  A failed site sends no weights; its log says why (search 'site training failed' or 'could not').")
    model = next(iter(outputs["global model (.pt)"]), None)
    if not contributed:  # what was written is the model the run started from
        untrained = "resumed model, unchanged" if start_round else "initial model, untrained: no site contributed"
        outputs = {(untrained + k.removeprefix("global model") if k.startswith("global model") else k): v
                   for k, v in outputs.items()}  # fmt: skip
    print(f"\nResults under {root}:")
    # optional outputs not asked for (no evaluation, no LoRA, no W&B) are left out
    shown = {what: paths for what, paths in outputs.items() if paths or what not in OPTIONAL_OUTPUTS}
    width = max(map(len, shown))
    for what, paths in shown.items():
        for i, p in enumerate(paths or ["(none found)"]):
            print(f"  {what if i == 0 else '':{width}s} {p}")
    if model is None:
        print("error: no global model was saved; see the server and site logs above", file=sys.stderr)
        return 1
    last, held = start_round + num_rounds - 1, resumed_round(str(model)) - 1
    if stopped is not None:
        why = f"the federation stopped in round {stopped}: fewer than --min_sites sites answered"
    elif not contributed:
        why = "no site contributed in any round, so the model was not trained; the sites' logs say why (search 'site " \
              "training failed')"  # fmt: skip
    elif held < last:
        why = "a save failed (the server log says why: search 'could not write')"
    else:
        return 0
    resume = f". {model} holds the model after round {held}: continue with --resume_from {model}"
    print(f"error: {why}{resume if 0 <= held < last else ''}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = define_parser().parse_args(argv)
    if args.demo:
        prepare_demo(args)
    if args.peft == "lora" and args.trainer == "qwen":
        from qwen_official import PEFT_UNSUPPORTED

        raise SystemExit(f"error: {PEFT_UNSUPPORTED}")
    if args.peft == "lora":
        lora_ranks(args)  # a bad --lora_r is named before anything runs
    if args.eval_only and (args.num_rounds or 1) != 1:
        raise SystemExit("error: --eval_only scores the model in one round; leave --num_rounds out")
    args.num_rounds = 1 if args.eval_only else args.num_rounds or (2 if args.demo else 3)
    args.eval_max_new_tokens = args.eval_max_new_tokens or (16 if args.demo else 256)
    if args.export_dir:
        args.export = args.export_dir
    # NVFlare consumes --export/--export-dir from sys.argv when nvflare.recipe is imported; they are parsed above.
    warnings.filterwarnings("ignore", message="NVFlare reserves")
    args.workspace = args.workspace or DEFAULT_WORKSPACE
    sites = check_inputs(args)
    args.master_port = master_port(args)
    keep_resume_source(args)
    recipe = build_recipe(args, sites)
    if args.export:
        recipe.export(job_dir=str(Path(args.export).resolve()))
        print(f"Job folder written to {Path(args.export).resolve() / JOB_NAME}")
        return 0
    from model import hub_problem  # after every other check: it may take a network round trip

    if runs_here(args) and (problem := hub_problem(args.model_name_or_path)):  # the server loads it here: now
        raise SystemExit(f"error: --model_name_or_path {args.model_name_or_path!r} ({problem})")
    # The simulator's or POC's processes started from here (NVFlare's relays among them) inherit these.
    for name, value in host_memory.ENV.items():
        os.environ.setdefault(name, value)
    os.environ[ADHOC_ENV] = "true" if args.adhoc_connections else "false"
    start = time.time()
    try:
        run = recipe.execute(make_env(args, list(sites)))
    except RuntimeError as e:  # NVFlare aborted the run (the simulator says so this way); what it wrote is reported
        if args.env != "sim":
            raise
        print(f"error: {e}", file=sys.stderr)
        report(Path(args.workspace) / JOB_NAME, list(sites), args.num_rounds, start_round=args.start_round)
        return 1
    result = run.get_result(clean_up=False) if args.env == "poc" else run.get_result()
    status = run.get_status()  # the simulator has none to give
    status = f", status: {status}" if status else ""
    print(f"\nJob {run.get_job_id()} finished in {time.time() - start:.0f} s{status}")
    if not result:
        print("error: the job produced no result folder", file=sys.stderr)
        return 1
    site_logs = []
    if args.env == "poc":  # the downloaded result holds the server's side; the sites' logs stay in the POC folders
        from nvflare.tool.poc.poc_commands import get_poc_workspace

        site_logs = sorted(Path(get_poc_workspace()).glob(f"*/prod_*/site-*/{run.get_job_id()}/log.txt"))
    return report(Path(result), list(sites), args.num_rounds, site_logs, start_round=args.start_round)


if __name__ == "__main__":
    sys.exit(main())
