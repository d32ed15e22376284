"""torchrun worker for test_local_trainer.py: FSDP rounds of LocalTrainer on the tiny Qwen3-VL, as client.py runs them.

`torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT MODEL_DIR SITE_DIR IMAGE_ROOT` runs, on every rank:
round 1 from the model's own weights (lr 1e-3, 3 steps of 2 ranks x batch 2 x accumulation 2), round 2 from those
initial weights again with lr 0, a load/read-back of round 1's weights, a state that does not fit, and a checkpoint.
Rank 0 writes OUT/round1.safetensors, OUT/ckpt/ and OUT/results.json; the test checks them.
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


def main(out: str, model_dir: str, site_dir: str, image_root: str) -> None:
    out_dir = Path(out)
    trainer = LocalTrainer(config(model_dir, site_dir, image_root, str(out_dir / "trainer"), fsdp=True))
    rank = trainer.rank
    embedding = trainer.model.get_input_embeddings().weight
    initial = load_state_dict_from_checkpoint(model_dir) if rank == 0 else None
    units = fsdp_units(trainer.model)

    first = trainer.train_round(initial)
    trainer.config = replace(trainer.config, learning_rate=0.0, max_steps=1)
    second = trainer.train_round(initial)  # the model holds round 1's weights: only a working load gives `initial`
    trainer.load_global_state(first.state_dict)
    read_back = trainer.state_dict()

    bad = None if rank else {k: v for k, v in first.state_dict.items() if k != "model.language_model.norm.weight"}
    try:
        trainer.load_global_state(bad)
        refused = ""
    except ValueError as err:
        refused = str(err)
    trainer.save_checkpoint(str(out_dir / "ckpt"), first.state_dict)
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
        "state_on_rank": first.state_dict is not None,
        "second_is_initial": equal(second.state_dict, initial),
        "read_back_is_first": equal(read_back, first.state_dict),
        "refused": refused,
        "optimizers_left": optimizers,
    }
    gathered = [None] * trainer.world_size
    dist.all_gather_object(gathered, results)
    if rank == 0:
        from safetensors.torch import save_file

        save_file(first.state_dict, str(out_dir / "round1.safetensors"))
        (out_dir / "results.json").write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
