"""Helpers of bench/bench_learning.py: the data and its site splits, the held-out evaluator, one site's round, the
server's step (fl_server.ServerOptimizer on the fp32 global tensors), the per-round diagnostics, and the outputs
(summary table and plot)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_server import ServerOptimizer  # noqa: E402
from local_trainer import LocalTrainer, SFTCollator, SFTDataset  # noqa: E402
from model import load_hf_model  # noqa: E402
from prepare_data import split_indices  # noqa: E402
from run_inference import apply_checkpoint, exact_match, generate_answers, load_images, record_to_sample  # noqa: E402
from synthetic_data import JSON_NAME, make_records, write_dataset  # noqa: E402

# ------------------------------------------------------------------------------------------------------- set-up


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


# ------------------------------------------------------------------------------------------------------ training


def train(trainer: LocalTrainer, dataset: SFTDataset, state, round_num: int, **config):
    """One round of `trainer` on `dataset` from `state` (None: the weights it holds), its Trainer logs to stderr.
    `config`: TrainConfig fields for this round (learning_rate, max_steps, fedprox_mu, keep_optimizer_state,
    output_dir: where a kept optimizer state lives)."""
    trainer.dataset = dataset
    trainer.config = replace(trainer.config, **config)
    with contextlib.redirect_stdout(sys.stderr):
        return trainer.train_round(state, round_num=round_num)


def fp32_params(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    return {key: p.detach() for key, p in trainer.model.named_parameters()}


def bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(torch.bfloat16) for key, value in state.items()}


def server_step(optimizer: ServerOptimizer, global32: dict[str, torch.Tensor], average: dict[str, torch.Tensor]):
    """fl_server's server step, in place on the fp32 global tensors: each tensor stepped as one flat slice with the
    sites' average update (the pseudo-gradient), as SampleWeightedFedAvg does a slice at a time."""
    for key, delta in average.items():
        weights = global32[key].view(-1)  # contiguous fp32: a view, stepped in place
        flat = delta.reshape(-1).clone()  # step() uses it as scratch
        optimizer.step(optimizer.moments(key, weights.numel()), 0, weights, flat, torch.empty_like(flat))


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


def dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k].double() * b[k].double()).sum()) for k in a)


def is_embedding(key: str) -> bool:
    """The token embedding (tied to lm_head): most of the tiny model's trained weights (151,936 rows), nearly all of
    them rows of tokens the task never uses, whose tiny softmax gradients AdamW turns into full-size steps."""
    return "embed_tokens" in key or key == "lm_head.weight"


def body(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained weights other than the token embedding."""
    return {k: v for k, v in tensors.items() if not is_embedding(k)}


def update_diagnostics(updates: list[dict], weights: list[float], average: dict) -> dict[str, float]:
    """Why the average moves less: the sites' updates' mean pairwise cosine, their norms, and the average's norm
    against their (weighted) mean norm, the shrink of averaging (1: all alike; 1/sqrt(sites): orthogonal); over all
    trained weights and (`_body`) over all but the token embedding."""
    out = {}
    for suffix, pick in (("", dict), ("_body", body)):
        mine = [pick(u) for u in updates]
        norms = [norm(u) for u in mine]
        cosines = [
            dot(mine[i], mine[j]) / (norms[i] * norms[j] or 1.0)
            for i in range(len(mine))
            for j in range(i + 1, len(mine))
        ]
        mean_site = sum(w * n for w, n in zip(weights, norms, strict=True)) / sum(weights)
        average_norm = norm(pick(average))
        out |= {
            f"cos_sites{suffix}": sum(cosines) / len(cosines) if cosines else 1.0,
            f"site_update_norm{suffix}": mean_site,
            f"avg_update_norm{suffix}": average_norm,
            f"shrink{suffix}": average_norm / mean_site if mean_site else 0.0,
        }
    return out


# ------------------------------------------------------------------------------------------------------- outputs


def summarize(rows: list[dict], runs: list[tuple[str, str, str]], rounds: dict[str, int]) -> list[dict]:
    """Per (start, method, split): the final round's exact match and loss, and the gap to that start's centralized."""
    final = {(r["start"], r["method"], r["split"]): r for r in rows if r["round"] == rounds[r["start"]]}
    out = []
    for start, method, split in runs:
        row, base = final[(start, method, split)], final[(start, "centralized", "all")]
        out.append(
            {
                "start": start,
                "method": method,
                "split": split,
                "exact_match": row["exact_match"],
                "loss": row["loss"],
                "gap_points": round(100 * (row["exact_match"] - base["exact_match"]), 1),
                "loss_gap": row["loss"] - base["loss"],
                "mean_shrink": _mean(rows, start, method, split, "shrink"),
                "mean_cos_sites": _mean(rows, start, method, split, "cos_sites"),
                "mean_step_vs_central": _mean(rows, start, method, split, "step_vs_central"),
                "mean_shrink_body": _mean(rows, start, method, split, "shrink_body"),
                "mean_cos_sites_body": _mean(rows, start, method, split, "cos_sites_body"),
                "mean_step_vs_central_body": _mean(rows, start, method, split, "step_vs_central_body"),
            }
        )
    return out


def _mean(rows, start, method, split, key) -> float | None:
    values = [r[key] for r in rows if (r["start"], r["method"], r["split"]) == (start, method, split) and key in r]
    return sum(values) / len(values) if values else None


def print_summary(summary: list[dict], starts: dict[str, dict], rounds: dict[str, int]) -> None:
    for start, evaluation in starts.items():
        em, loss = 100 * evaluation["exact_match"], evaluation["loss"]
        print(f"\n{start} start, after {rounds[start]} rounds (round 0: exact match {em:.1f}%, loss {loss:.4f})")
        print(f"{'run':<28}{'exact_match':>12}{'loss':>9}{'EM gap':>8}{'loss gap':>10}{'shrink':>8}{'cos':>7}"
              f"{'step/central':>13}{'| body:':>8}{'shrink':>8}{'cos':>7}{'step/central':>13}")  # fmt: skip
        for s in (s for s in summary if s["start"] == start):
            name, em, gap = f"{s['method']}/{s['split']}", f"{100 * s['exact_match']:.1f}%", f"{s['gap_points']:+.1f}"
            extra = "".join(
                f"{v:>{w}.2f}" if v is not None else f"{'':>{w}}"
                for v, w in (
                    (s["mean_shrink"], 8),
                    (s["mean_cos_sites"], 7),
                    (s["mean_step_vs_central"], 13),
                    (None, 8),
                    (s["mean_shrink_body"], 8),
                    (s["mean_cos_sites_body"], 7),
                    (s["mean_step_vs_central_body"], 13),
                )  # fmt: skip
            )
            print(f"{name:<28}{em:>12}{s['loss']:>9.4f}{gap:>8}{s['loss_gap']:>+10.4f}{extra}")


def plot(rows: list[dict], runs: list[tuple[str, str, str]], path: Path, settings: dict[str, dict], sites: int):
    """One row of panels per (start, split): held-out exact match, held-out loss, and the server's step against the
    centralized run's change over the same round, per round and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(
        {(start, split) for start, _, split in runs if split != "all"}, key=lambda p: (p[0] != "scratch", p[1] != "iid")
    )
    fig, axes = plt.subplots(len(panels), 3, figsize=(16, 3.6 * len(panels)), squeeze=False)
    methods = list(dict.fromkeys(m for _, m, _ in runs))
    colours = dict(zip(methods, plt.get_cmap("tab10").colors, strict=False))
    for (start, split), ax_row in zip(panels, axes, strict=True):
        s = settings[start]
        for method in methods:
            key = (start, method, "all" if method == "centralized" else split)
            mine = sorted((r for r in rows if (r["start"], r["method"], r["split"]) == key), key=lambda r: r["round"])
            if not mine:
                continue
            x = [r["round"] for r in mine]
            style = dict(
                color=colours[method], marker="o", ms=3, label=method, lw=2.5 if method == "centralized" else 1.3
            )
            ax_row[0].plot(x, [100 * r["exact_match"] for r in mine], **style)
            ax_row[1].plot(x, [r["loss"] for r in mine], **style)
            if method != "centralized":
                ax_row[2].plot(x[1:], [r["step_vs_central"] for r in mine[1:]], **style)
        title = f"{start} start, {split}: lr {s['lr']:g}, {sites} sites x {s['steps']} steps/round"
        for ax, label in zip(
            ax_row, ("held-out exact match (%)", "held-out loss", "|server step| / |central round change|"), strict=True
        ):
            ax.set_title(title, fontsize=9)
            ax.set_ylabel(label)
            ax.set_xlabel(f"round ({sites * s['steps']} central steps each)")
            ax.grid(alpha=0.3)
        ax_row[2].axhline(1, color="black", lw=0.8)
    axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
