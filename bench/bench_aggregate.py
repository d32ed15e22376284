"""Benchmark: the server's average of offloaded site updates (fl_server.SampleWeightedFedAvg), alone.

Writes `--sites` bf16 updates shaped like Qwen3-VL-2B's state dict (the 622 MB embedding and 25 MB matrices, `--gb`
GB each) as safetensors files, hands them to the aggregator as NVFlare's tensor disk offload does (LazyTensorDict
references, `ParamsType.DIFF`), and reports per repeat the seconds of `aggregate_model` and the page faults it took
(fresh pages). The aggregator adds their sample-weighted average to its fp32 global model in place (twice `--gb` in
memory), which it takes from the run's initial model as the job's server does (`INITIAL_MODEL_LOADED`); every repeat
writes into the same tensors, as the job's rounds do. With `--server_optimizer`, the average is that optimizer's
pseudo-gradient (fl_server.ServerOptimizer: its fp32 moments on the CPU), and each repeat also times writing its
state as the server does (`FL_server_optimizer.pt`, atomically, in the workdir). Reports the peak RSS too.
`--lora_r R`: the updates are instead a LoRA site's (`--peft lora`, exact aggregation): the 196 B matrices of rank R of
the 2B's 28 language-model layers, fp32 (36.7 MB at R=16). `--in_memory`: the updates are handed over as tensors, as
they arrive without NVFlare's tensor disk offload.
Usage: python bench/bench_aggregate.py [--gb 1.0] [--sites 3] [--repeats 2] [--server_optimizer fedadam]
    [--lora_r 16] [--in_memory] [--workdir /tmp/bench_aggregate]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.lazy_tensor_dict import LazyTensorDict
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_server import OPTIMIZER_FILE, SERVER_OPTIMIZERS, SampleWeightedFedAvg, atomic_write  # noqa: E402


def shapes(gb: float) -> dict[str, tuple[int, ...]]:
    embed = (151936, 2048)
    n = max(0, round((gb * 1e9 - embed[0] * embed[1] * 2) / (6144 * 2048 * 2)))
    return {"embed": embed} | {f"mlp.{i}": (6144, 2048) for i in range(n)} | {f"norm.{i}": (2048,) for i in range(8)}


def lora_shapes(rank: int) -> dict[str, tuple[int, ...]]:
    """The B matrices of a rank-`rank` adapter on the 7 projections of the 2B's 28 language-model layers."""
    outputs = {"q_proj": 2048, "k_proj": 1024, "v_proj": 1024, "o_proj": 2048, "gate_proj": 6144, "up_proj": 6144,
               "down_proj": 2048}  # fmt: skip
    return {f"layers.{i}.{name}.lora_B": (out, rank) for i in range(28) for name, out in outputs.items()}


def offloaded_result(folder: Path, layout: dict[str, tuple[int, ...]], value: float, dtype: torch.dtype) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, (key, shape) in enumerate(layout.items()):
        path = folder / f"{i}.safetensors"
        if not path.exists():
            save_file({key: torch.full(shape, value, dtype=dtype)}, str(path))
        files[key] = (str(path), key)
    lazy = LazyTensorDict(files, str(folder))
    return {key: lazy.make_lazy_ref(key) for key in layout}


def start_run(aggregator: SampleWeightedFedAvg, initial: dict[str, torch.Tensor]) -> None:
    """What FedAvg does at the run's start: the initial global model into the context, INITIAL_MODEL_LOADED."""
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(initial, {}), private=True, sticky=True)
    aggregator.handle_event(AppEventType.INITIAL_MODEL_LOADED, fl_ctx)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of each site's bf16 update in GB")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--server_optimizer", default="fedavg", choices=SERVER_OPTIMIZERS)
    parser.add_argument("--lora_r", type=int, default=0, help="LoRA updates of this rank instead (fp32, B only)")
    parser.add_argument("--in_memory", action="store_true", help="updates as tensors, not offloaded files")
    parser.add_argument("--workdir", default="/tmp/bench_aggregate")
    args = parser.parse_args()

    layout = lora_shapes(args.lora_r) if args.lora_r else shapes(args.gb)
    dtype = torch.float32 if args.lora_r else torch.bfloat16
    aggregator = SampleWeightedFedAvg(server_optimizer=args.server_optimizer, send_fp32=bool(args.lora_r))
    optimizer = aggregator.optimizer
    start_run(aggregator, {key: torch.ones(shape) for key, shape in layout.items()})  # fp32, its pages written
    rows = []
    for _ in range(args.repeats):  # written anew each time: the aggregator deletes the updates it averaged
        if args.in_memory:
            results = [{k: torch.full(shape, (1 + s) * 2**-10, dtype=dtype) for k, shape in layout.items()}
                       for s in range(args.sites)]  # fmt: skip
        else:
            results = [offloaded_result(Path(args.workdir) / f"site-{s}", layout, (1 + s) * 2**-10, dtype)
                       for s in range(args.sites)]  # fmt: skip
        start = time.perf_counter()
        for s, params in enumerate(results):
            meta = {"client_name": f"site-{s}"}
            aggregator.accept_model(
                FLModel(params_type=ParamsType.DIFF, params=params, metrics={"samples": 1.0 + s}, meta=meta)
            )
        accept_s = time.perf_counter() - start
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        averaged = aggregator.aggregate_model().params
        seconds = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        row = {"seconds": round(seconds, 3), "accept_s": round(accept_s, 3), "page_faults": faults}
        if optimizer.state:
            start, path = time.perf_counter(), Path(args.workdir) / OPTIMIZER_FILE
            atomic_write(path, lambda f: torch.save(optimizer.state_dict(), f))
            row |= {"state_bytes": optimizer.nbytes(), "state_save_s": round(time.perf_counter() - start, 2)}
            path.unlink()
        rows.append(row)
        del averaged, results, params  # NVFlare deletes a result's folder once its last reference goes
        aggregator.wait_for_discard()
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    setting = {"gb_per_site": args.gb, "sites": args.sites, "server_optimizer": args.server_optimizer,
               "lora_r": args.lora_r, "in_memory": args.in_memory}  # fmt: skip
    print(json.dumps(setting | {"threads": torch.get_num_threads(), "peak_rss_gib": round(peak_gib, 2), "runs": rows}))


if __name__ == "__main__":
    main()
