"""Benchmark: what the FedAvg arithmetic does to learning, before and after sites sent updates to an fp32 global model.

Trains the tiny random Qwen3-VL (`model.tiny_config`, on CPU) on the synthetic colour-and-shape task
(`synthetic_data.write_dataset`, one image per record: the answer names the image's background colour and shape, so
it can only be learned by looking) and reports, after every round, the held-out exact match (greedy answers through
run_inference.py's own `generate_answers` and `exact_match`) and the held-out loss (mean cross-entropy over the
answer tokens, as tests/test_local_trainer.py's `_eval_loss` computes it) of:

- `centralized`: one trainer on all the training data, `sites x steps` optimizer steps per round (as many as the
  whole federation takes), its fp32 weights kept from round to round;
- `fedavg_after` (the arithmetic of today's code, fl_server.py and local_trainer.py): the server holds the global
  model in fp32; each site starts a round from the global's bf16 rounding, trains `steps` steps and returns
  `TrainResult.update` (its fp32 weights minus the bf16 start, rounded to bf16 once); the server adds the
  sample-weighted average of the updates to its fp32 global;
- `fedavg_before` (the arithmetic of the code before, simulated exactly): each site sends its trainer's fp32 weights
  rounded to bf16 (read from `trainer.model.named_parameters()` after the round, the weights the old code rounded),
  the server averages them in fp32, sample-weighted, and rounds the average to bf16: that is the new global model,
  and the next round starts from it.

The federated runs use 3 sites (`--sites`) with an iid split and a Dirichlet(`--alpha` 0.3) split over each record's
background colour (prepare_data.py's `split_indices`, so one site sees mostly some colours), weighted by the samples
each site trained on (`metrics["samples"]`, what fl_server.py weighs by). Every run starts from the same "trained
start", the regime of real fine-tuning: the tiny model first trained centrally at `--start_lr` for `--start_steps`
steps, then rounded to bf16. The compared runs use a low constant learning rate without warm-up (`--lr`), where a
round moves most weights by less than half a bf16 step: the old arithmetic rounds that away, the new one keeps it.
Per federated round it also prints `kept` (the share of the sites' true averaged fp32 change that the global model
took, projected onto that change) and `rel_err` (of the global's move against that change).

All of it runs in this one process with one `LocalTrainer` (its dataset swapped from site to site, a fresh optimizer
every round as in the job), and simulates the server's arithmetic in a few lines: no NVFlare. That the real job does
the "after" arithmetic is what the end-to-end tests check (tests/test_job.py, tests/test_fl_server.py). Training
computes in fp32 (`--bf16` turns on the trainer's bf16 autocast, slow on CPUs): the weights' rounding, the subject
here, is the same either way.

The defaults were picked by measuring. The trained start (56 steps at 2e-3) answers 21% of the held-out questions
exactly, at loss 0.99, while it is still learning the colours. With its vision tower frozen (the job's default: the
language model and the mergers train) the tiny model learns the colours in minutes but hardly the shapes, so exact
match stops near 1/3 (colour right, shape a guess) and moves in steps of 1/48: the held-out loss, still falling, is
the finer measure. At 3e-5 a site's 8 steps move a weight by at most 2.4e-4, less than half a bf16 step of most
trained weights: the old arithmetic keeps 2-3% of the averaged change (`kept`); at 6e-5 it keeps about 95%.
Centralized takes 3 x 8 steps one after the other per round, while a FedAvg round averages three 8-step moves from
one point (about 8 steps' progress on iid data), so at a constant low learning rate it runs ahead of either
arithmetic. About 5 minutes on 2 idle CPU cores; `--quick` (a few steps, for the test) about 20 s.

Output: one JSON line per (method, split, round) on stdout, `results.json` (the lines, the per-round `kept`, the
settings and the summary) and `learning.png` (held-out exact match and loss per round) in `--out`, and a summary
table: the final round's exact match and loss per run and each federated run's gap to centralized in points.

Usage: python bench/bench_learning.py [--rounds 15] [--steps 8] [--lr 3e-5] [--eval_samples 48] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from local_trainer import LocalTrainer, SFTCollator, SFTDataset, TrainConfig  # noqa: E402
from model import build_tiny_model, load_hf_model, untied_state_dict  # noqa: E402
from prepare_data import split_indices  # noqa: E402
from run_inference import apply_checkpoint, exact_match, generate_answers, load_images, record_to_sample  # noqa: E402
from synthetic_data import JSON_NAME, make_records, write_dataset  # noqa: E402

METHODS = ("centralized", "fedavg_after", "fedavg_before")
QUICK = dict(rounds=1, steps=2, lr=5e-6, start_steps=6, eval_samples=8, num_train=48, batch_size=2, max_new_tokens=12)


# -------------------------------------------------------------------------------------------------------- set-up


def prepare_data(folder: Path, num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[str]]:
    """Write the synthetic dataset (single-image records) once; return its records and each record's background
    colour (the Dirichlet split's label)."""
    n = num_train + num_eval
    expected = list(make_records(n, seed, multi_image_fraction=0.0))
    json_path = folder / JSON_NAME
    if not json_path.is_file() or json.loads(json_path.read_text()) != [record for record, _ in expected]:
        write_dataset(folder, num_records=n, seed=seed, multi_image_fraction=0.0)
    return json.loads(json_path.read_text()), [picks[0][0] for _, picks in expected]


def site_splits(n: int, num_eval: int, sites: int, seed: int, alpha: float, colours: list[str]):
    """Record indices per site, iid and Dirichlet over the colour, and of the held-out records (the same for both)."""
    iid, test = split_indices(n, sites, seed=seed, test_size=num_eval)
    dirichlet, same_test = split_indices(n, sites, seed, num_eval, split="dirichlet", alpha=alpha, keys=colours)
    assert same_test == test
    return {"iid": iid, "dirichlet": dirichlet}, test


class Evaluator:
    """Held-out exact match and loss of a state dict, on a separate fp32 model (SDPA attention, KV cache)."""

    def __init__(self, model_dir: Path, records: list[dict], image_root: Path, processor, max_new_tokens: int) -> None:
        self.model_dir, self.max_new_tokens = str(model_dir), max_new_tokens
        self.model = load_hf_model(self.model_dir, dtype=torch.float32).eval()
        samples = [record_to_sample(record, i, image_root) for i, record in enumerate(records)]
        self.prompts = [(load_images(s), s.question) for s in samples]
        self.references = [s.ground_truth for s in samples]
        self.processor = processor  # the trainer's, sized as in training
        dataset = SFTDataset(records, image_root, processor, model_max_length=8192)
        self.batch = SFTCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
        self.batch.pop("sample_counts")

    def __call__(self, state: dict[str, torch.Tensor], batch_size: int = 16) -> dict[str, float]:
        apply_checkpoint(self.model, state, "state", self.model_dir)
        with torch.no_grad():
            loss = float(self.model(**self.batch).loss)
        side = self.processor.tokenizer.padding_side
        self.processor.tokenizer.padding_side = "left"  # generation: prompts end where answers start
        try:
            answers = []
            for start in range(0, len(self.prompts), batch_size):
                prompts = self.prompts[start : start + batch_size]
                answers += generate_answers(self.model, self.processor, prompts, self.max_new_tokens, do_sample=False)
        finally:
            self.processor.tokenizer.padding_side = side
        hits = [exact_match(a, r) for a, r in zip(answers, self.references, strict=True)]
        return {"exact_match": sum(hits) / len(hits), "loss": loss, "answer": answers[0]}


# ---------------------------------------------------------------------------------------------------- training


def train(trainer: LocalTrainer, dataset: SFTDataset, state, round_num: int, **config):
    """One round of `trainer` on `dataset` from `state` (None: the weights it holds), its Trainer logs to stderr."""
    trainer.dataset = dataset
    trainer.config = replace(trainer.config, **config)
    with contextlib.redirect_stdout(sys.stderr):
        return trainer.train_round(state, round_num=round_num)


def fp32_params(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    return {key: p.detach() for key, p in trainer.model.named_parameters()}


def bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(torch.bfloat16) for key, value in state.items()}


def fedavg_round(trainer, datasets, global_state, arithmetic: str, round_num: int, steps: int, lr: float):
    """One FedAvg round over the sites; returns the new global state and how much of the true change it took.

    `global_state`: fp32 ("after": the server's fp32 global) or bf16 ("before": the old bf16 global).
    """
    sent = bf16(global_state)  # what every site starts from; only read ("before": the bf16 global itself)
    weight_sum, sums, true_sums = 0.0, {}, {}
    losses = []
    for dataset in datasets:
        result = train(trainer, dataset, sent, round_num, max_steps=steps, learning_rate=lr)
        w = result.metrics["samples"]
        weight_sum += w
        losses.append(result.metrics["loss"])
        params = fp32_params(trainer)
        with torch.no_grad():
            for key in result.update:  # the trained parameters: their true fp32 change
                change = params[key] - sent[key].float()
                true_sums[key] = true_sums.get(key, 0) + w * change
            contribution = (
                {k: u.float() for k, u in result.update.items()}
                if arithmetic == "after"
                else {k: p.to(torch.bfloat16).float() for k, p in params.items()}  # the old sent weights
            )
            for key, value in contribution.items():
                sums[key] = sums[key].add_(value, alpha=w) if key in sums else value.mul(w)
    with torch.no_grad():
        if arithmetic == "after":
            new = {k: v.clone() for k, v in global_state.items()}
            for key, total in sums.items():
                new[key] += total / weight_sum
        else:
            new = dict(global_state)
            for key, total in sums.items():
                new[key] = (total / weight_sum).to(torch.bfloat16)
        dot = true2 = err2 = 0.0
        for key, total in true_sums.items():
            true = total / weight_sum
            moved = new[key].float() - global_state[key].float()
            dot += float((moved * true).sum())
            true2 += float(true.square().sum())
            err2 += float((moved - true).square().sum())
    stats = {
        "kept": dot / true2 if true2 else 0.0,
        "rel_err": (err2 / true2) ** 0.5 if true2 else 0.0,
        "true_change_norm": true2**0.5,
        "train_loss": sum(losses) / len(losses),
    }
    return new, stats


# --------------------------------------------------------------------------------------------------------- runs


def run(args: argparse.Namespace) -> dict:
    """The whole benchmark; returns everything it printed and wrote (rows, per-round stats, summary)."""
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
        bf16=args.bf16, torch_compile=False, lr_scheduler_type="constant", warmup_ratio=0.0, logging_steps=10**6,
        seed=args.seed,
    )  # fmt: skip
    trainer = LocalTrainer(config)
    make = lambda indices: SFTDataset([records[i] for i in indices], data_dir, trainer.processor, 8192)  # noqa: E731
    everything = trainer.dataset
    datasets = {name: [make(site) for site in sites] for name, sites in splits.items()}
    evaluate = Evaluator(model_dir, [records[i] for i in test], data_dir, trainer.processor, args.max_new_tokens)
    sizes = {name: [len(d) for d in ds] for name, ds in datasets.items()}
    print(f"sites {sizes}; {len(everything)} training records, {len(test)} held out", file=sys.stderr)
    # Every round's Trainer runs gc.collect() three times; over the objects built so far (tokenizer, images, records)
    # that took a third of a round. Frozen, they are no longer scanned; what rounds allocate still is.
    gc.freeze()

    t = time.perf_counter()
    train(trainer, everything, None, 10**4, max_steps=args.start_steps, learning_rate=args.start_lr)
    start = bf16(untied_state_dict(trainer.model))
    start_eval = evaluate(start)
    print(f"trained start: {args.start_steps} steps at {args.start_lr} in {time.perf_counter() - t:.0f} s, "
          f"{start_eval}", file=sys.stderr)  # fmt: skip

    rows, seconds = [], {}

    def emit(method: str, split: str, round_num: int, metrics: dict, **extra) -> None:
        row = {"method": method, "split": split, "round": round_num, "lr": args.lr, **metrics, **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    runs = [("centralized", "all"), *((m, s) for m in METHODS[1:] for s in ("iid", "dirichlet"))]
    for method, split in runs:
        emit(method, split, 0, start_eval)
        t = time.perf_counter()
        if method == "centralized":
            steps = args.sites * args.steps
            for r in range(args.rounds):
                state = start if r == 0 else None  # then the fp32 weights it holds
                result = train(trainer, everything, state, r, max_steps=steps, learning_rate=args.lr)
                state = {k: v.detach().clone() for k, v in untied_state_dict(trainer.model).items()}
                emit(method, split, r + 1, evaluate(state), train_loss=result.metrics["loss"])
        else:
            arithmetic = method.removeprefix("fedavg_")
            state = {k: v.float() for k, v in start.items()} if arithmetic == "after" else dict(start)
            for r in range(args.rounds):
                state, stats = fedavg_round(trainer, datasets[split], state, arithmetic, r, args.steps, args.lr)
                emit(method, split, r + 1, evaluate(state), **stats)
        seconds[f"{method}/{split}"] = round(time.perf_counter() - t, 1)
        print(f"{method}/{split}: {seconds[f'{method}/{split}']} s", file=sys.stderr)

    summary = summarize(rows, runs, args.rounds)
    result = {
        "settings": dict(vars(args)),
        "sites": sizes,
        "trained_start": start_eval,
        "rows": rows,
        "summary": summary,
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 1)},
        "trained_keys": sorted(k for k, p in trainer.model.named_parameters() if p.requires_grad),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot(rows, runs, out / "learning.png", args)
    print_summary(summary, start_eval, args.rounds)
    print(f"wrote {out / 'results.json'} and {out / 'learning.png'} in {result['seconds']['total']:.0f} s")
    return result


def summarize(rows: list[dict], runs: list[tuple[str, str]], rounds: int) -> list[dict]:
    final = {(r["method"], r["split"]): r for r in rows if r["round"] == rounds}
    base = final[("centralized", "all")]
    return [
        {
            "method": method,
            "split": split,
            "exact_match": final[(method, split)]["exact_match"],
            "loss": final[(method, split)]["loss"],
            "gap_points": round(100 * (final[(method, split)]["exact_match"] - base["exact_match"]), 1),
            "loss_gap": final[(method, split)]["loss"] - base["loss"],
        }
        for method, split in runs
    ]


def print_summary(summary: list[dict], start: dict, rounds: int) -> None:
    em, loss = 100 * start["exact_match"], start["loss"]
    print(f"after {rounds} rounds (from the trained start: exact match {em:.1f}%, loss {loss:.4f})")
    print(f"{'run':<26}{'exact_match':>12}{'loss':>9}{'EM gap (points)':>17}{'loss gap':>10}")
    for s in summary:
        name, em, gap = f"{s['method']}/{s['split']}", f"{100 * s['exact_match']:.1f}%", f"{s['gap_points']:+.1f}"
        print(f"{name:<26}{em:>12}{s['loss']:>9.4f}{gap:>17}{s['loss_gap']:>+10.4f}")


def plot(rows: list[dict], runs: list[tuple[str, str]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"centralized": "-", "fedavg_after": "-", "fedavg_before": "--"}
    colours = {"all": "black", "iid": "tab:blue", "dirichlet": "tab:orange"}
    for method, split in runs:
        mine = sorted((r for r in rows if r["method"] == method and r["split"] == split), key=lambda r: r["round"])
        x = [r["round"] for r in mine]
        label = method if method == "centralized" else f"{method} {split}"
        for ax, key, scale in ((axes[0], "exact_match", 100), (axes[1], "loss", 1)):
            ax.plot(x, [scale * r[key] for r in mine], styles[method], color=colours[split], marker="o", label=label)
    axes[0].set_ylabel("held-out exact match (%)")
    axes[1].set_ylabel("held-out loss (answer tokens)")
    for ax in axes:
        ax.set_xlabel(f"round ({args.sites} sites x {args.steps} steps, or {args.sites * args.steps} central steps)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Tiny Qwen3-VL from a trained start, lr {args.lr:g} constant, batch {args.batch_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15, help="rounds of each run")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per site per round")
    parser.add_argument("--lr", type=float, default=3e-5, help="the compared runs' constant learning rate")
    parser.add_argument("--eval_samples", type=int, default=48, help="held-out records (exact match and loss)")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench_learning"), help="output folder")
    parser.add_argument("--quick", action="store_true", help=f"a tiny run for tests: {QUICK}")
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
        parser.set_defaults(**QUICK)  # flags given still win
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
