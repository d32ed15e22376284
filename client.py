"""One site of the federated job: receive the global Qwen3-VL, fine-tune it on the site's shard, send it back.

NVFlare launches this under torchrun (one torchrun per site). Rank 0 alone talks to the server; it tells the other
ranks what to do (train round N, or stop) with `broadcast_object_list`, and the trainer broadcasts the received
weights to them in place. Every rank trains. Rank 0 sends the round's update (`ParamsType.DIFF`: the trainer's fp32
weights minus the bf16 weights it started from, in bf16, trained parameters only; with `--peft lora` the adapter's
trained tensors in fp32) with metrics the server weighs by (`samples`) and logs (`loss`, `steps`, `seconds`, and
`sent_bytes`: the update's size before compression). A round that fails on this site sends no weights, only the error in
its meta, so the average ignores it; the site tries again next round. The built-in trainer keeps its model between
rounds, so the server may leave out the tensors no site has updated, which the site then holds as they were sent
(`transport.HeldWeights`). After a trainer's first round the site freezes what lives as long as it (`gc.freeze()`), so
the collector's passes each round skip the imports and the model.

Flags: `--trainer builtin|qwen`, `--work_dir` (default ./qwen3vl_checkpoints), `--checkpoint last|every` (write the
site's checkpoint after the last round only, the default, or after every round, keeping the latest), `--save_sent`
(also keep exactly what was sent each round under <work_dir>/sent, for checks), `--part_mb` (tensors larger than this
travel in row parts, transport.py), `--compress_weights` (send the update compressed, lossless: transport.pack),
`--eval_every`/`--eval_samples`/`--eval_max_new_tokens` (the built-in trainer scores the received global model on the
site's val.json before training: `val_*` metrics); all others go to the trainer (`local_trainer.parse_train_args`).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import nvflare.client as flare
import torch
import torch.distributed as dist
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.client.tracking import SummaryWriter

import host_memory
import transport
from local_trainer import init_distributed
from model import is_lazy

RANK, WORLD_SIZE = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", choices=("builtin", "qwen"), default="builtin")
    parser.add_argument("--work_dir", default=None, help="checkpoint folder (default: ./qwen3vl_checkpoints)")
    parser.add_argument(
        "--checkpoint",
        choices=("last", "every"),
        default="last",
        help="write the site's checkpoint after the last round only, or after every round (keeping the latest)",
    )
    parser.add_argument("--save_sent", action="store_true", help="keep the weights sent each round (sent/round-N)")
    parser.add_argument(
        "--part_mb",
        type=float,
        default=transport.PART_BYTES / 2**20,
        help="send larger tensors in row parts (0: whole)",
    )
    parser.add_argument(
        "--compress_weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send the update compressed, lossless (transport.pack)",
    )
    e = parser.add_argument_group("evaluation of the received global model on the site's val.json (built-in trainer)")
    e.add_argument(
        "--eval_every", type=int, default=5,
        help="validation loss every round; generation metrics every N rounds and in the last (0: no evaluation)",
    )  # fmt: skip
    e.add_argument("--eval_samples", type=int, default=16, help="records answered for the generation metrics")
    e.add_argument("--eval_max_new_tokens", type=int, default=256, help="longest answer generated when evaluating")
    e.add_argument("--eval_only", action="store_true", help="score the received model on val.json, train nothing")
    args, rest = parser.parse_known_args(argv)
    for flag in ("eval_every", "eval_samples", "eval_max_new_tokens"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must be 0 or more, got {getattr(args, flag)}")
    return args, rest


def build_trainer(kind: str, train_argv: list[str]) -> Any:
    """The trainer for `--trainer`: both kinds offer `train_round(global_state, ..., round_num) -> TrainResult`."""
    from local_trainer import LocalTrainer, parse_train_args  # transformers is imported when the trainer is built

    config = parse_train_args(train_argv)
    if kind == "qwen":
        import qwen_official  # needs $QWEN3VL_ROOT and its own environment: imported only when chosen

        return qwen_official.QwenOfficialTrainer(config)
    return LocalTrainer(config)


def broadcast(obj: Any) -> Any:
    """`obj` from rank 0 on every rank."""
    if WORLD_SIZE == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(error: str | None) -> str | None:
    """The first rank's error, on every rank, so all ranks agree whether the round failed."""
    if WORLD_SIZE == 1:
        return error
    errors = [None] * WORLD_SIZE
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def hint(error: str, train_argv: list[str]) -> str:
    if "OutOfMemory" in error or "out of memory" in error:
        return "lower --per_device_train_batch_size or --max_pixels, raise --gradient_accumulation_steps"
    if any(k in error for k in ("FileNotFound", "No such file", "JSONDecode", "dataset_use", "train.json", "image")):
        data = train_argv[train_argv.index("--dataset_use") + 1] if "--dataset_use" in train_argv else "--dataset_use"
        return f"check {data}/train.json and --image_root; python prepare_data.py writes <data_dir>/site-N/train.json"
    return "see the traceback above in this site's log"


def last_round(round_num: int, total_rounds: int | None) -> bool:
    """Whether `round_num` is the run's last (taken to be so when the total is unknown)."""
    return total_rounds is None or round_num >= total_rounds - 1


def checkpoint_due(mode: str, round_num: int, total_rounds: int | None) -> bool:
    """Whether this round's checkpoint is written: every round, or the last one (every round if the total is unknown).

    A checkpoint of the 2B model is 4.26 GB written per site, replaced the next round, so by default only the last
    round writes one (the server keeps the global model every round).
    """
    return mode == "every" or last_round(round_num, total_rounds)


def save_round(work_dir: Path, round_num: int, trainer: Any, result: Any, checkpoint: bool, keep_sent: bool) -> None:
    """Checkpoint this round if `checkpoint` (every rank calls it), dropping older ones (disk use stays flat); if
    `keep_sent`, also keep exactly what was sent (the update). A failure is reported, not raised: the update is sent."""
    try:
        if checkpoint:
            ckpt = work_dir / f"round-{round_num}"
            if hasattr(trainer, "save_checkpoint"):  # the official-code trainer keeps its own output folder instead
                trainer.save_checkpoint(str(ckpt))
            if RANK == 0:
                ckpt.mkdir(parents=True, exist_ok=True)
                (ckpt / "fl_metrics.json").write_text(json.dumps(result.metrics))
                for old in work_dir.glob("round-*"):
                    if old != ckpt:
                        shutil.rmtree(old, ignore_errors=True)
                print(f"round={round_num}: checkpoint written to {ckpt}", flush=True)
        if RANK == 0 and keep_sent and result.update is not None:
            from safetensors.torch import save_file

            sent_dir = work_dir / "sent"
            sent_dir.mkdir(parents=True, exist_ok=True)
            sent = {k: v.contiguous() for k, v in result.update.items()}
            save_file(sent, str(sent_dir / f"round-{round_num}.safetensors"))
            (sent_dir / f"round-{round_num}.json").write_text(json.dumps(result.metrics))
    except Exception as e:
        print(f"round={round_num}: checkpoint not saved ({type(e).__name__}: {e})", flush=True)


def round_options(trainer: Any, args, round_num: int, total_rounds: int | None, tag: str) -> dict[str, Any]:
    """The built-in trainer's options for this round: the run's length (its learning-rate schedule spans the run)
    and what to evaluate the received model on (`--eval_every`); the official code takes none of them."""
    if args.trainer != "builtin":
        if args.eval_only:
            raise ValueError("--eval_only needs the built-in trainer (--trainer builtin)")
        return {}
    options: dict[str, Any] = {"total_rounds": total_rounds}
    val = trainer.validation_file() if args.eval_every else None
    if args.eval_every and val is None and not getattr(trainer, "said_no_val", False):
        trainer.said_no_val = True
        print(f"{tag} no val.json beside the training data: training without evaluating", flush=True)
    if val is not None:
        due = args.eval_only or round_num % args.eval_every == 0 or last_round(round_num, total_rounds)
        generate = args.eval_samples if due else 0
        options |= {"evaluate_on": val, "generate_samples": generate, "max_new_tokens": args.eval_max_new_tokens}
    return options


def train_round(
    trainer: Any,
    held: transport.HeldWeights,
    global_model: FLModel | None,
    round_num: int,
    total_rounds: int | None,
    tag: str,
    args,
    train_argv: list[str],
):
    """One round on this rank: (the trainer, its result, None), or (None, None, the first rank's error) after a
    failure on any rank, which is reported and leaves the site in the federation (a fresh trainer next round).
    `held`: what the trainer holds as the server sent it (rank 0), for a task that leaves those tensors out."""
    start, error, result = time.time(), None, None
    try:
        if trainer is None:  # built on first use, and again after a failed round (e.g. the data was fixed)
            trainer = build_trainer(args.trainer, train_argv)  # holds nothing as sent: `held` was forgotten
        global_state, unchanged = None, set()
        if global_model is not None:  # rank 0: the weights (on disk), row parts joined under their tensor's name
            unchanged = held.left_out(global_model.meta)
            lazy = sum(map(is_lazy, global_model.params.values()))
            kept = f", {len(unchanged)} left out as this site holds them" if unchanged else ""
            print(f"{tag} received {len(global_model.params)} tensors ({lazy} on disk){kept}", flush=True)
            global_state, global_model.params = transport.join(global_model.params), None
        received = set(global_state or ())
        options = round_options(trainer, args, round_num, total_rounds, tag)
        if unchanged:
            options["unchanged"] = unchanged
        if args.eval_only:  # a federated evaluation of the received model: nothing trains, no update is sent
            if "evaluate_on" not in options:
                raise FileNotFoundError(f"--eval_only: {tag} has no val.json beside its training data to score")
            del options["total_rounds"]
            result = trainer.evaluate_received(global_state, release_global_state=True, **options)
        else:
            result = trainer.train_round(global_state, release_global_state=True, round_num=round_num, **options)
        result.metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        result.metrics.setdefault("seconds", time.time() - start)
        held.after_round(received, set(result.update or ()))
    except Exception as e:  # any failure, OOM included: report it and stay in the federation
        traceback.print_exc()
        error = f"rank {RANK}: {type(e).__name__}: {e}"
    error = first_error(error)
    if error is None:
        print(f"{tag} rank {RANK} of {WORLD_SIZE} trained" if RANK else f"{tag} metrics {result.metrics}", flush=True)
        return trainer, result, None
    if RANK == 0:
        print(f"site training failed (--trainer {args.trainer}): {error}", file=sys.stderr, flush=True)
        print(f"{tag} sent weight 0 (after error) {hint(error, train_argv)}", flush=True)
    trainer = result = None  # a fresh trainer next round frees what a failure (e.g. OOM) left behind
    held.forget()
    gc.unfreeze()  # the dropped model refers to itself (compiled blocks): only a collector's pass frees it
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None, None, error


def freeze_long_lived(trainer: Any) -> None:
    """After a trainer's first round, take what lives as long as it does (the imports, the model, its compiled code:
    440k objects for the tiny model) out of Python's garbage collector: a full pass walks every tracked object (0.25 s
    here on the development machine), and Hugging Face's Trainer and accelerate make three a round. What is garbage
    now is collected first; a failed round unfreezes before dropping the trainer."""
    if trainer is not None and not gc.get_freeze_count():
        gc.collect()
        gc.freeze()


def update_message(result: Any, error: str | None, part_mb: float, keeps: bool = False) -> FLModel:
    """What rank 0 sends: the round's update (`ParamsType.DIFF`, large tensors in row parts) with the metrics the
    server weighs by and logs, or, after a failure, no weights and the error in the meta (weight 0: the average
    leaves this site out). `keeps`: the site's trainer keeps what it received, so the next task may leave out the
    tensors it holds as sent (`transport.KEEPS`)."""
    no_update = {transport.NO_UPDATE: torch.zeros(1)}  # NVFlare's FedAvg passes no result without params on
    if error is not None:
        meta = {"ERROR": error, "NUM_STEPS_CURRENT_ROUND": 0}
        return FLModel(params_type=ParamsType.DIFF, params=no_update, metrics={"samples": 0.0}, meta=meta)
    metrics, meta = result.metrics, {transport.KEEPS: keeps}
    if result.update is None:  # --eval_only: the scores alone
        return FLModel(params_type=ParamsType.DIFF, params=no_update, metrics=metrics, meta={**meta, "EVAL_ONLY": True})
    return FLModel(
        params_type=ParamsType.DIFF,
        params=transport.split(result.update, int(part_mb * 2**20)),
        metrics=metrics,
        meta={**meta, "NUM_STEPS_CURRENT_ROUND": int(metrics.get("steps", 0)), "NUM_SAMPLES": metrics["samples"]},
    )


def sent_bytes(result: Any) -> int:
    """The bytes of the round's update as sent, before compression (0 when there is none)."""
    update = result.update if result is not None else None
    return sum(transport.nbytes(v) for v in update.values()) if update else 0


def run_rounds(global_model: FLModel) -> int | None:
    """The number of the round after the run's last: `start_round` + `total_rounds` (None if unknown)."""
    if global_model.total_rounds is None:
        return None
    return (global_model.start_round or 0) + global_model.total_rounds


def _exit_on_sigterm(*_) -> None:
    print(f"rank {RANK}: SIGTERM, exiting", flush=True)
    os._exit(0)


def exchange(call, what: str, *args) -> Any:
    """`flare.receive()` or `flare.send(...)` on rank 0; if it fails the session with this site's client job is gone
    (the run ended or aborted while this site was late, or the client job died): say so and leave at once (NVFlare's
    messaging threads would keep a normal exit waiting; torchrun then stops the other ranks)."""
    try:
        return call(*args)
    except Exception as e:
        print(f"rank 0: could not {what} ({type(e).__name__}: {e}): the run is over for this site, leaving",
              file=sys.stderr, flush=True)  # fmt: skip
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    args, train_argv = parse_args(argv)
    host_memory.apply()  # reused buffers for sending and receiving the weights
    # No leading timestamp: NVFlare puts timestamped lines on the console only, others into the site's log.txt.
    logging.basicConfig(level=logging.INFO, format=f"rank {RANK} %(name)s %(levelname)s: %(message)s")
    init_distributed()  # torchrun's process group, before rank 0 tells the others what to do
    work_dir = Path(args.work_dir or Path.cwd() / "qwen3vl_checkpoints").resolve()
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in train_argv):
        train_argv += ["--output_dir", str(work_dir / "trainer_output")]
    site, writer = None, None
    if RANK == 0:
        on_disk = transport.receive_to_disk(work_dir / "received", args.compress_weights)
        flare.init(rank="0")
        site = flare.get_site_name()
        writer = SummaryWriter()
        print(f"site={site}: global weights are received {'to disk' if on_disk else 'in memory'}", flush=True)
    site = broadcast(site)
    # If NVFlare has to SIGTERM us (no orderly SHUTDOWN in time), leave at once: NVFlare's messaging threads
    # would keep a normal interpreter exit waiting until the SIGKILL.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    trainer, held = None, transport.HeldWeights()
    while True:
        global_model = exchange(flare.receive, "receive the global model") if RANK == 0 else None  # None: job over
        # The run's rounds: a resumed job starts at the round after its checkpoint's (start_round) and runs
        # total_rounds more, so its schedule, data order and last round continue the first run's.
        rounds = None if global_model is None else (global_model.current_round, run_rounds(global_model))
        round_num, total_rounds = broadcast(rounds) or (None, None)
        if round_num is None:
            break
        tag = f"site={site} round={round_num}:"
        trainer, result, error = train_round(
            trainer, held, global_model, round_num, total_rounds, tag, args, train_argv
        )
        if RANK == 0:
            size = sent_bytes(result)
            if size:  # reported per site and round: the site's log, site_metrics.json, TensorBoard
                result.metrics["sent_bytes"] = float(size)
            keeps = getattr(trainer, "keeps_unchanged", False)
            out = update_message(result, error, args.part_mb, keeps)  # the round's update, or the error
            print(f"{tag} sent {len(out.params) if size else 0} tensors ({size / 1e6:.2f} MB)", flush=True)
            for key, value in out.metrics.items() if error is None else ():  # TensorBoard/W&B on the server
                name = key if key.startswith("val_") else f"train_{key}"
                if math.isfinite(value):
                    writer.add_scalar(name, value, round_num)
            exchange(flare.send, f"send round {round_num}'s result", out)
        if error is None and not args.eval_only:  # after sending: the server aggregates while this site saves
            due = checkpoint_due(args.checkpoint, round_num, total_rounds)
            save_round(work_dir, round_num, trainer, result, due, args.save_sent)
        global_model = result = None  # sent: NVFlare's send() returns once the server has the update
        freeze_long_lived(trainer)

    if RANK == 0:
        transport.shutdown()
        for folder in (work_dir / "received").glob("*"):
            shutil.rmtree(folder, ignore_errors=True)
    if WORLD_SIZE > 1 and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
