"""Benchmark: does federated fine-tuning learn as much as one site with the same data, which server and site
methods close the gap, and why it lags (issue #33).

Trains the tiny random Qwen3-VL (`model.tiny_config`, on CPU) on the synthetic colour-and-shape task
(`synthetic_data.write_dataset`, one image per record: the answer names the image's background colour and shape, so
it can only be learned by looking) and reports, after every round, the held-out exact match (greedy answers through
run_inference.py's own `generate_answers` and `exact_match`) and the held-out loss (mean cross-entropy over the
answer tokens) in two regimes (`--start`):

- `scratch`: from the random tiny model at a high learning rate (2e-3), the regime where federated learned far less;
- `trained`: from a "trained start" (the tiny model trained centrally at `--start_lr` for `--start_steps` steps,
  rounded to bf16) at a low learning rate (3e-5), the regime of real fine-tuning.

Runs, each with the same total optimizer steps per round (`sites x steps`) and a constant learning rate:

- `centralized`: one trainer on all the training data, `sites x steps` steps a round, its fp32 weights and AdamW
  state kept from round to round (one uninterrupted run: the baseline);
- `fedavg`: today's arithmetic (fl_server.py, local_trainer.py; the former `fedavg_after`): each site starts from the
  fp32 global's bf16 rounding, trains `steps` steps with a fresh AdamW and returns `TrainResult.update`; the server
  adds the sample-weighted average update to its fp32 global;
- `fedavgm`, `fedadam`, `fedavg_slr`: the same sites, the server step fl_server.ServerOptimizer's (momentum 0.9 and
  server lr 1; Adam with the regime's server lr and eps; plain FedAvg with server lr = sites);
- `fedprox`: sites add FedProx's mu/2 ||w - w_global||^2 (`TrainConfig.fedprox_mu`);
- `fedavg_keepopt`: sites keep their AdamW state across rounds (`TrainConfig.keep_optimizer_state`);
- `fedavg_before` (not in the default run): the arithmetic of the code before issue #28, simulated exactly (the
  sites' fp32 weights rounded to bf16, averaged in fp32, rounded to bf16: the new global).

A method takes parameters after colons, `fedadam:lr=3e-3:eps=1e-4`, `fedprox:mu=0.1`, `fedavg_slr:lr=2`,
`fedavgm:lr=1:momentum=0.9` (then its name in the output is the whole spec); the defaults per regime are `REGIMES`'.
The federated runs use 3 sites (`--sites`), iid and Dirichlet(`--alpha` 0.3) over each record's background colour
(prepare_data.py's `split_indices`), weighted by the samples each site trained on (`metrics["samples"]`).

Per federated round it also records why the global moves as it does: `cos_sites` (mean pairwise cosine of the sites'
updates), `shrink` (||average update|| / mean ||site update||), `avg_vs_central` and `step_vs_central` (the average
update's and the server step's norm against the centralized run's weight change in the same round, as many steps),
and `kept` (the share of the sites' true fp32 averaged change that the global took, projected onto it).

All of it runs in this one process with one `LocalTrainer` (its dataset, and for kept optimizer states its output
folder, swapped from site to site) and fl_server.ServerOptimizer on the fp32 global tensors: no NVFlare. Training
computes in fp32 (`--bf16`: the trainer's bf16 autocast, slow on CPUs).

Output: one JSON line per (start, method, split, round) on stdout, `results.json` (the lines, settings, summary) and
`learning.png` (per start and split: exact match, loss and server step per round) in `--out`, and a summary table
(final exact match and loss per run, gap to centralized in points, mean diagnostics).

Usage: python bench/bench_learning.py [--start both|scratch|trained] [--methods fedavg,fedadam:lr=1e-3,...]
       [--rounds N] [--steps N] [--lr LR] [--eval_samples 48] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_common import (  # noqa: E402
    Evaluator,
    ServerOptimizer,
    bf16,
    body,
    dot,
    fp32_params,
    norm,
    plot,
    prepare_data,
    print_summary,
    server_step,
    site_splits,
    summarize,
    train,
    update_diagnostics,
)

from local_trainer import LocalTrainer, SFTDataset, TrainConfig  # noqa: E402
from model import build_tiny_model, untied_state_dict  # noqa: E402

METHODS = ("centralized", "fedavg", "fedavgm", "fedadam", "fedprox", "fedavg_keepopt", "fedavg_slr")
KNOWN = (*METHODS, "fedavg_before")
# Per start: the sites' constant lr, rounds, steps per site and round, and the tuned methods' parameters, picked by a
# pilot (4-5 rounds, Dirichlet; BENCHMARKS.md): fedadam's server lr about half a centralized round's largest per-weight
# move (lr x sites x steps), eps well below a round's typical move; FedProx's mu the grid's (0.01, 0.1, 1) best.
REGIMES = {
    "scratch": dict(lr=2e-3, rounds=8, steps=10, fedadam_lr=3e-2, fedadam_eps=1e-4, fedprox_mu=0.01),
    "trained": dict(lr=3e-5, rounds=10, steps=8, fedadam_lr=3e-4, fedadam_eps=1e-6, fedprox_mu=0.01),
}
QUICK = dict(rounds=2, steps=2, eval_samples=8, num_train=48, batch_size=2, max_new_tokens=12, start_steps=6)
QUICK_LR = {"scratch": 2e-3, "trained": 5e-6}


def method_spec(spec: str, regime: dict, sites: int) -> tuple[str, dict, dict]:
    """'fedadam:lr=1e-3:eps=1e-4' -> ('fedadam', server optimizer kwargs, site TrainConfig overrides)."""
    base, *params = spec.split(":")
    if base not in KNOWN:
        raise ValueError(f"unknown method {base!r}: one of {', '.join(KNOWN)}")
    given = {key: float(value) for key, value in (p.split("=", 1) for p in params)}
    server, site = {"name": "fedavg"}, {}
    if base == "fedavgm":
        server = {"name": "fedavgm", "lr": given.get("lr", 1.0), "momentum": given.get("momentum", 0.9)}
    elif base == "fedadam":
        lr, eps = given.get("lr", regime["fedadam_lr"]), given.get("eps", regime["fedadam_eps"])
        server = {"name": "fedadam", "lr": lr, "eps": eps, "betas": [given.get("b1", 0.9), given.get("b2", 0.99)]}
    elif base == "fedavg_slr":
        server = {"name": "fedavg", "lr": given.get("lr", float(sites))}
    elif base == "fedprox":
        site = {"fedprox_mu": given.get("mu", regime["fedprox_mu"])}
    elif base == "fedavg_keepopt":
        site = {"keep_optimizer_state": True}
    return base, server, site


# --------------------------------------------------------------------------------------------------------- runs


def federated_round(ctx, datasets, global32, method: str, optimizer, site_config, round_num, steps, lr, central):
    """One round over the sites; steps `global32` in place ("before": returns a new bf16 global) and returns the
    new global and the round's diagnostics."""
    before = method == "fedavg_before"
    sent = dict(global32) if before else bf16(global32)  # what every site starts from
    updates, weights, true_changes, losses, rounded = [], [], [], [], {}
    for i, dataset in enumerate(datasets):
        folder = ctx["work"] / "sites" / f"site{i}"  # where a kept optimizer state lives
        site = {"keep_optimizer_state": False, "fedprox_mu": 0.0, **site_config, "output_dir": str(folder)}
        result = train(ctx["trainer"], dataset, sent, round_num, max_steps=steps, learning_rate=lr, **site)
        w = result.metrics["samples"]
        weights.append(w)
        losses.append(result.metrics["loss"])
        updates.append({k: u.float() for k, u in result.update.items()})
        params = fp32_params(ctx["trainer"])
        with torch.no_grad():
            true_changes.append({k: params[k] - sent[k].float() for k in result.update})
            if before:  # the old code sent its fp32 weights rounded to bf16
                for key, p in params.items():
                    value = p.to(torch.bfloat16).float()
                    rounded[key] = rounded[key].add_(value, alpha=w) if key in rounded else value.mul(w)
    total = sum(weights)
    with torch.no_grad():
        average = {k: sum(w * u[k] for w, u in zip(weights, updates, strict=True)) / total for k in updates[0]}
        true = {k: sum(w * c[k] for w, c in zip(weights, true_changes, strict=True)) / total for k in average}
        old = {k: global32[k].float().clone() for k in average}
        if before:
            global32 = {**global32, **{k: (v / total).to(torch.bfloat16) for k, v in rounded.items()}}
        else:
            server_step(optimizer, global32, average)
        moved = {k: global32[k].float() - old[k] for k in average}
        step, step_body, true_norm = norm(moved), norm(body(moved)), norm(true)
        error = norm({k: moved[k] - true[k] for k in true})
    stats = {
        **update_diagnostics(updates, weights, average),
        "step_norm": step,
        "avg_vs_central": norm(average) / central[0] if central else None,
        "step_vs_central": step / central[0] if central else None,
        "step_norm_body": step_body,
        "avg_vs_central_body": norm(body(average)) / central[1] if central else None,
        "step_vs_central_body": step_body / central[1] if central else None,
        "kept": dot(moved, true) / true_norm**2 if true_norm else 0.0,
        "rel_err": error / true_norm if true_norm else 0.0,
        "true_change_norm": true_norm,
        "train_loss": sum(losses) / len(losses),
    }
    return global32, stats


def run_start(ctx, start: str, state0: dict, settings: dict, methods: list[str], args, emit) -> dict[str, float]:
    """Every run of one start: centralized first (its per-round change is the diagnostics' yardstick), then each
    federated method on each split. Returns each run's seconds."""
    trainer, evaluate, seconds = ctx["trainer"], ctx["evaluate"], {}
    lr, rounds, steps = settings["lr"], settings["rounds"], settings["steps"]
    start_eval = evaluate(state0)
    central_change = []
    for spec in methods:
        base, server, site_config = method_spec(spec, settings, args.sites)
        for split in ["all"] if base == "centralized" else args.splits:
            t = time.perf_counter()
            shutil.rmtree(ctx["work"] / "sites", ignore_errors=True)  # no optimizer state from an earlier run
            emit(start, spec, split, 0, start_eval, lr=lr, server=server, site=site_config)
            if base == "centralized":
                state = {k: v.float() for k, v in state0.items()}
                for r in range(rounds):
                    result = train(
                        trainer, ctx["everything"], bf16(state) if r == 0 else None, r, max_steps=args.sites * steps,
                        learning_rate=lr, output_dir=str(ctx["work"] / "sites" / "central"), keep_optimizer_state=True,
                        fedprox_mu=0.0,
                    )  # fmt: skip
                    new = {k: v.detach().clone() for k, v in untied_state_dict(trainer.model).items()}
                    moved = {k: new[k] - state[k] for k in result.update}
                    change, change_body = norm(moved), norm(body(moved))
                    central_change.append((change, change_body))
                    state = new
                    emit(start, spec, split, r + 1, evaluate(state), train_loss=result.metrics["loss"],
                         step_norm=change, step_norm_body=change_body)  # fmt: skip
            else:
                optimizer = ServerOptimizer(**server)
                state = dict(state0) if base == "fedavg_before" else {k: v.float() for k, v in state0.items()}
                for r in range(rounds):
                    central = central_change[r] if r < len(central_change) else None
                    state, stats = federated_round(
                        ctx, ctx["datasets"][split], state, base, optimizer, site_config, r, steps, lr, central
                    )
                    emit(start, spec, split, r + 1, evaluate(state), **stats)
            seconds[f"{start}/{spec}/{split}"] = round(time.perf_counter() - t, 1)
            print(f"{start}/{spec}/{split}: {seconds[f'{start}/{spec}/{split}']} s", file=sys.stderr, flush=True)
    return start_eval, seconds


def run(args: argparse.Namespace) -> dict:
    """The whole benchmark; returns everything it printed and wrote (rows, settings, summary)."""
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else out / "work"
    model_dir = Path(args.model_dir) if args.model_dir else work / "tiny-qwen3-vl"
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir, seed=args.seed)
    data_dir = work / "data"
    records, colours = prepare_data(data_dir, args.num_train, args.eval_samples, args.seed)
    splits, test = site_splits(len(records), args.eval_samples, args.sites, args.seed, args.alpha, colours)
    train_json = work / "train.json"
    train_json.write_text(json.dumps([records[i] for site in splits["iid"] for i in site]))

    config = TrainConfig(
        model_name_or_path=str(model_dir), dataset_use=str(train_json), image_root=str(data_dir),
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        bf16=args.bf16, torch_compile=False, lr_scheduler_type="constant", lr_schedule="round", warmup_ratio=0.0,
        logging_steps=10**6, seed=args.seed,
    )  # fmt: skip
    trainer = LocalTrainer(config)
    make = lambda indices: SFTDataset([records[i] for i in indices], data_dir, trainer.processor, 8192)  # noqa: E731
    ctx = {"trainer": trainer, "work": work, "everything": trainer.dataset}
    ctx["datasets"] = {name: [make(site) for site in sites] for name, sites in splits.items()}
    ctx["evaluate"] = Evaluator(model_dir, [records[i] for i in test], data_dir, trainer.processor, args.max_new_tokens)
    sizes = {name: [len(d) for d in ds] for name, ds in ctx["datasets"].items()}
    print(f"sites {sizes}; {len(ctx['everything'])} training records, {len(test)} held out", file=sys.stderr)
    # Every round's Trainer runs gc.collect() three times; over the objects built so far (tokenizer, images, records)
    # that took a third of a round. Frozen, they are no longer scanned; what rounds allocate still is.
    gc.freeze()

    starts = ["scratch", "trained"] if args.start == "both" else [args.start]
    settings = {}
    for start in starts:
        s = dict(REGIMES[start])
        s.update({k: v for k, v in (("lr", args.lr), ("rounds", args.rounds), ("steps", args.steps)) if v is not None})
        if args.quick:
            s.update(rounds=args.rounds or QUICK["rounds"], steps=args.steps or QUICK["steps"])
            s["lr"] = args.lr or QUICK_LR[start]
        settings[start] = s
    states = {"scratch": bf16(untied_state_dict(trainer.model))}  # the random model, before any training
    if "trained" in starts:
        t = time.perf_counter()
        train(trainer, ctx["everything"], None, 10**4, max_steps=args.start_steps, learning_rate=args.start_lr)
        states["trained"] = bf16(untied_state_dict(trainer.model))
        print(f"trained start: {args.start_steps} steps at {args.start_lr} in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)  # fmt: skip

    rows, seconds, start_evals = [], {}, {}

    def emit(start: str, method: str, split: str, round_num: int, metrics: dict, **extra) -> None:
        row = {"start": start, "method": method, "split": split, "round": round_num, **metrics, **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for start in starts:
        start_evals[start], took = run_start(ctx, start, states[start], settings[start], args.methods, args, emit)
        seconds.update(took)

    runs = list(dict.fromkeys((r["start"], r["method"], r["split"]) for r in rows))
    rounds = {start: s["rounds"] for start, s in settings.items()}
    summary = summarize(rows, runs, rounds)
    result = {
        "settings": {**vars(args), "starts": settings},
        "sites": sizes,
        "starts": start_evals,
        "trained_start": start_evals.get("trained"),
        "rows": rows,
        "summary": summary,
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 1)},
        "trained_keys": sorted(k for k, p in trainer.model.named_parameters() if p.requires_grad),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot(rows, runs, out / "learning.png", settings, args.sites)
    print_summary(summary, start_evals, rounds)
    print(f"wrote {out / 'results.json'} and {out / 'learning.png'} in {result['seconds']['total']:.0f} s")
    return result


# ----------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--start", choices=("scratch", "trained", "both"), default="both", help="regime(s) to run")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated; known: {', '.join(KNOWN)}")
    parser.add_argument("--rounds", type=int, help=f"rounds of each run (default per start: {REGIMES})")
    parser.add_argument("--steps", type=int, help="optimizer steps per site per round (default per start)")
    parser.add_argument("--lr", type=float, help="the sites' constant learning rate (default per start)")
    parser.add_argument("--splits", default="iid,dirichlet", help="the federated runs' site splits")
    parser.add_argument("--eval_samples", type=int, default=48, help="held-out records (exact match and loss)")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench_learning"), help="output folder")
    parser.add_argument("--quick", action="store_true", help=f"a tiny run for tests: {QUICK}, lr {QUICK_LR}")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration over the colour label")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--start_steps", type=int, default=56, help="steps of the trained start")
    parser.add_argument("--start_lr", type=float, default=2e-3, help="learning rate of the trained start")
    parser.add_argument("--num_train", type=int, default=600, help="training records (all sites together)")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="longest generated answer")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in training (slow on CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_dir", help="an existing tiny Qwen3-VL directory (default: build one in the work dir)")
    parser.add_argument("--work_dir", help="model and data (default: OUT/work; reused when there)")
    if parser.parse_args(argv).quick:
        parser.set_defaults(**{k: v for k, v in QUICK.items() if k not in ("rounds", "steps")})  # flags still win
    args = parser.parse_args(argv)
    args.splits = [s for s in args.splits.split(",") if s in ("iid", "dirichlet")] or ["iid", "dirichlet"]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "centralized" not in args.methods:
        args.methods.insert(0, "centralized")  # the yardstick of every gap and ratio
    for spec in args.methods:
        method_spec(spec, REGIMES["scratch"], args.sites)  # unknown methods fail here, not after minutes
    return args


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
