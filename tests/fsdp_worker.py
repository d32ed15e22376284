"""torchrun worker for test_local_trainer.py: FSDP rounds of LocalTrainer on the tiny Qwen3-VL, as client.py runs them.

`torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT MODEL_DIR SITE_DIR IMAGE_ROOT` runs, on every rank:
round 1 from the model's own weights (lr 1e-3, 3 steps of 2 ranks x batch 2 x accumulation 2), round 2 from those
initial weights again (lr 1e-5, 1 step) while the model holds round 1's, a load/read-back of round 1's weights, a state
that does not fit, and a checkpoint (saved by every rank, written by rank 0). Rank 0 writes OUT/update1.safetensors
(round 1's update), OUT/round1.safetensors (round 1's weights), OUT/ckpt/ and OUT/results.json; the test checks them.
"""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from local_trainer import LocalTrainer, TrainConfig, load_state_dict_from_checkpoint  # noqa: E402

ROUND_ONE = dict(learning_rate=1e-3, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2)


def config(model_dir: str, site_dir: str, image_root: str, output_dir: str, **overrides) -> TrainConfig:
    """The round-1 config; the test builds its single-process reference from the same one."""
    base = dict(model_name_or_path=model_dir, dataset_use=site_dir, image_root=image_root, output_dir=output_dir)
    settings = dict(warmup_ratio=0.0, bf16=False, logging_steps=1, **ROUND_ONE)
    return TrainConfig(**{**base, **settings, **overrides})


def fsdp_units(model: torch.nn.Module) -> int:
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) for m in model.modules())


def equal(a: dict | None, b: dict | None) -> bool:
    return a is not None and b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def full_fp32_trainable(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    """The trainable fp32 master weights, gathered from the shards (collective: every rank gets them)."""
    from local_trainer import _full_tensor, _reshard

    _reshard(trainer.model)
    with torch.no_grad():
        return {
            key: _full_tensor(param.detach()).clone()
            for key, param in trainer.model.named_parameters()
            if param.requires_grad
        }


def started_from(update: dict | None, trained: dict, start: dict | None) -> dict | None:
    """On rank 0: does `update` equal the gathered fp32 weights minus the bf16 `start`, rounded to bf16 (as it must
    if the round started from `start`)? Its keys, relative error and exactness."""
    if update is None or start is None:
        return None
    true = {k: trained[k] - start[k].float() for k in trained}
    error = sum(float((update[k].float() - true[k]).square().sum()) for k in true if k in update)
    norm = sum(float(t.square().sum()) for t in true.values())
    return {
        "same_keys": update.keys() == trained.keys(),
        "true_change_norm": norm**0.5,
        "relative_error": (error / norm) ** 0.5 if norm else None,
        "exact": all(torch.equal(update[k], true[k].to(torch.bfloat16)) for k in true if k in update),
        "on_cpu": all(v.device.type == "cpu" and v.dtype == torch.bfloat16 for v in update.values()),
    }


def main(out: str, model_dir: str, site_dir: str, image_root: str) -> None:
    out_dir = Path(out)
    trainer = LocalTrainer(config(model_dir, site_dir, image_root, str(out_dir / "trainer"), fsdp=True))
    rank = trainer.rank
    embedding = trainer.model.get_input_embeddings().weight
    initial = load_state_dict_from_checkpoint(model_dir) if rank == 0 else None
    units = fsdp_units(trainer.model)

    first = trainer.train_round(initial)
    first_check = started_from(first.update, full_fp32_trainable(trainer), initial)
    round1 = trainer.state_dict()  # collective; rank 0 gets round 1's weights (bf16, CPU)
    trainer.config = replace(trainer.config, learning_rate=1e-5, max_steps=1)
    # The model holds round 1's weights: only a working load makes the update the change from `initial`.
    second = trainer.train_round(initial)
    second_check = started_from(second.update, full_fp32_trainable(trainer), initial)
    trainer.load_global_state(round1)
    read_back = trainer.state_dict()

    bad = None if rank else {k: v for k, v in round1.items() if k != "model.language_model.norm.weight"}
    try:
        trainer.load_global_state(bad)
        refused = ""
    except ValueError as err:
        refused = str(err)
    trainer.save_checkpoint(str(out_dir / "ckpt"))  # every rank: it gathers the weights (round 1's, read back)
    # Round 3 of 4 with what the job turns on: the received model scored (loss and answers, every rank in step),
    # FedProx and the optimizer state kept; the run's schedule.
    trainer.config = replace(trainer.config, fedprox_mu=1.0, keep_optimizer_state=True, max_steps=1)
    third = trainer.train_round(initial, round_num=2, total_rounds=4, evaluate_on=site_dir, generate_samples=2,
                                max_new_tokens=4)  # fmt: skip
    optimizer_file = Path(trainer.config.output_dir) / f"optimizer.rank{rank}.pt"
    gc.collect()
    optimizers = sum(issubclass(type(o), torch.optim.Optimizer) for o in gc.get_objects())

    results = {
        "rank": rank,
        "world_size": trainer.world_size,
        "model_class": type(trainer.model).__name__,
        "embedding_rows_here": embedding.to_local().shape[0],
        "embedding_rows": embedding.shape[0],
        "fsdp_units": [units, fsdp_units(trainer.model)],
        "param_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
        "first_metrics": first.metrics,
        "second_metrics": second.metrics,
        "third_metrics": third.metrics,
        "optimizer_file": optimizer_file.is_file(),
        "update_on_rank": [first.update is not None, second.update is not None],
        "first_started_from_initial": first_check,
        "second_started_from_initial": second_check,
        "read_back_is_first": equal(read_back, round1),
        "refused": refused,
        "optimizers_left": optimizers,
    }
    gathered = [None] * trainer.world_size
    dist.all_gather_object(gathered, results)
    if rank == 0:
        from safetensors.torch import save_file

        save_file(first.update, str(out_dir / "update1.safetensors"))
        save_file(round1, str(out_dir / "round1.safetensors"))
        (out_dir / "results.json").write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
