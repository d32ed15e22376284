"""Server side of the federated job: the fp32 global model, FedAvg of the sites' updates, and the persistor.

`SampleWeightedFedAvg` holds the global model in fp32. The sites send their round's update (`ParamsType.DIFF`, bf16:
their fp32 result minus the bf16 weights they started from); it adds the average of the updates, each weighted by
the samples its site trained on, to the fp32 global model in place. A step of fine-tuning moves a weight by far less
than half a bf16 step, so a bf16 global model would round most of every round away; in fp32 each round's average
survives, and rounds whose updates are each below half a bf16 step add up. The sites receive the global model's bf16
rounding (the server's downloads cast each item as they send it, `transport`). A site that failed (weight 0 or
`ERROR` in its meta) is left out; a tensor a site did not send (it froze it) counts as no change from that site; when
no site contributes the global model stays as it was. Per round it also writes `site_metrics.json` (loss, samples,
steps, seconds, weight per site) next to the global model.
A server optimizer (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) can take the average update as its
pseudo-gradient (`ServerOptimizer`: fedavgm, fedadam, fedyogi, or fedavg with a server learning rate); plain FedAvg
(server_lr 1) keeps the in-place path below. When sites report `val_loss` and `val_samples` (scored on the global model
they received), the sample-weighted mean goes into `site_metrics.json` and the persistor keeps the best scored
global model as `FL_best_model.pt`.
With NVFlare's tensor disk offload (job.py turns it on) the sites' updates arrive as files on the server's disk; the
average is then taken a slice at a time when the last one is in, from the mapped files, so the server never holds a
whole update or a second copy of the model in memory. Tensors sent in row parts (transport.py) are averaged into
their tensor's rows. The averaged updates' files are deleted in a background thread. The sites' downloads share each
item's serialized bytes (`transport.SerializedOnce`), compressed with `compress_weights` (`transport.pack`).

`QwenPersistor` is NVFlare's PyTorch file persistor: it loads the initial model (or a saved `FL_global_model.pt`) as
fp32, writes `FL_global_model.pt` atomically every round with the exact fp32 global model (in the background while
the next round goes on, finished before the next average changes its tensors), and, when the run ends, writes the
global model's bf16 rounding as a Hugging Face directory (weights plus processor) that
`Qwen3VLForConditionalGeneration.from_pretrained` loads. It keeps no weights of its own: the global model's tensors
are the only copy on the server. It writes the initial model too, so `FL_global_model.pt` always holds the model the
sites are training from; the server optimizer's state goes beside it (`FL_server_optimizer.pt`, in the same background
save) and is loaded again with `--resume_from`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import torch
from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReturnCode, WorkspaceConstants
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

import host_memory
import transport
from lora import ADAPTER_DIR_NAME, LoraSettings, load_merged, save_adapter
from model import is_lazy, materialize

SITE_METRICS_FILE = "site_metrics.json"
HF_DIR_NAME = "hf_global_model"
NUM_SAMPLES = "NUM_SAMPLES"
SLICE = 1 << 22  # elements averaged at a time: 16 MiB fp32 buffers
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
OPTIMIZER_FILE = "FL_server_optimizer.pt"
BEST_MODEL_FILE = "FL_best_model.pt"
OPTIMIZER_TOKEN = "server_optimizer_token"  # in both files of one save: the state belongs to that model
TASK_CHECK_PERIOD = 0.05  # seconds between the controller's checks for the round's last result
BEST_META = "val_loss_best"  # the aggregate's meta: the global model the sites received this round scored best
DISCARDED = "round discarded"  # site_metrics.json: the error of a round too few sites answered (FaultTolerantFedAvg)
MEAN = "weighted mean"  # site_metrics.json: the "site" of a round's weighted val_* entry
# The sites' scores of the global model they received (client.py): each is averaged weighted by its count.
VAL_WEIGHTS = {"val_loss": "val_samples", "val_exact_match": "val_generated", "val_token_f1": "val_generated",
               "val_closed_acc": "val_generated"}  # fmt: skip
VAL_KEYS = (*VAL_WEIGHTS, "val_samples", "val_generated", "val_seconds")
SENT_BYTES = "sent_bytes"  # a site's metric: the bytes of the update it sent (before compression)
EVAL_ONLY = "EVAL_ONLY"  # a site's meta: it evaluated the global model and trained nothing (job.py --eval_only)
# The run's server optimizer by job id: the aggregator holds it, the persistor saves and restores its state.
_OPTIMIZERS: dict = {}


def atomic_write(path: Path, write) -> None:
    """`write(file)` into a temporary file beside `path`, flushed to disk, then renamed onto `path`: `path` is the
    old file or the new one, never a part. On any failure (a full disk) the temporary file is removed and the error
    raised; `path` is untouched."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_json(path: Path, data) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))


class OffloadedTensor:
    """NVFlare's lazy reference to a tensor offloaded to a safetensors file, checked and with its shape and dtype.

    NVFlare's `materialize()` maps the file without reading it (safetensors validates the header and the file's size
    first), so checking every result up front costs no copy, and a truncated or mismatched one is refused before any
    tensor of the global model is overwritten.
    """

    def __init__(self, ref):
        from safetensors import SafetensorError

        self.ref, self.path = ref, ref.file_path
        try:
            mapped = ref.materialize()
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{self.path}: offloaded tensor {ref.key!r} is unreadable: {e}") from e
        self.shape, self.dtype = tuple(mapped.shape), mapped.dtype

    @staticmethod
    def of(value) -> OffloadedTensor | None:
        """The checked form of NVFlare's lazy reference to an offloaded tensor; None for any other value."""
        is_ref = isinstance(getattr(value, "file_path", None), str) and isinstance(getattr(value, "key", None), str)
        return OffloadedTensor(value) if is_ref else None

    def tensor(self) -> torch.Tensor:
        """The tensor on the mapped file: its pages are read as they are used.

        Mapped again here rather than kept from the check: a mapping's touched pages count as this process's memory
        while it lives, so each one lives only while its tensor is averaged.
        """
        return self.ref.materialize()


class ServerOptimizer:
    """A server optimizer over the average update Δ (the pseudo-gradient; updates are new − old, so steps add):

    fedavg: w += lr·Δ; fedavgm: m = β·m + Δ, w += lr·m; fedadam: m = β1·m + (1−β1)·Δ, v = β2·v + (1−β2)·Δ²,
    w += lr·m/(√v + ε); fedyogi: as fedadam with v = v − (1−β2)·Δ²·sign(v − Δ²). As in the paper's algorithms there
    is no bias correction, and the moments start at zero. The state is fp32 on the CPU, one flat tensor per moment for
    each tensor an update has reached (allocated then), stepped a slice at a time.
    """

    def __init__(
        self,
        name: str = "fedavg",
        lr: float = 1.0,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
    ):
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer {name!r} is not one of {', '.join(SERVER_OPTIMIZERS)}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"server_lr {lr} must be a positive number")
        if not 0 <= momentum < 1:
            raise ValueError(f"server_momentum {momentum} must be in [0, 1)")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"server_betas {betas} must be two numbers in [0, 1)")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"server_eps {eps} must be a positive number")
        self.name, self.lr, self.momentum, self.betas, self.eps = name, float(lr), momentum, tuple(betas), eps
        self.state: dict[str, dict[str, torch.Tensor]] = {}  # tensor name -> moment name -> flat fp32 tensor

    @property
    def plain(self) -> bool:
        """FedAvg as it was: the average added as it is (the aggregator's in-place path)."""
        return self.name == "fedavg" and self.lr == 1.0

    def moments(self, name: str, numel: int) -> dict[str, torch.Tensor]:
        """The tensor's moments, made (zeros) when an update first reaches it."""
        if name not in self.state:
            kinds = {"fedavg": (), "fedavgm": ("m",)}.get(self.name, ("m", "v"))
            self.state[name] = {k: torch.zeros(numel, dtype=torch.float32) for k in kinds}
        return self.state[name]

    def step(self, moments: dict, start: int, weights: torch.Tensor, delta: torch.Tensor, tmp: torch.Tensor) -> None:
        """One slice's step: `weights` (fp32 view of the global model) += the step for `delta`, the slice's average
        update at flat offset `start` of its tensor. `delta` and `tmp` (same size) are scratch buffers."""
        stop = start + delta.numel()
        if self.name == "fedavg":
            weights.add_(delta, alpha=self.lr)
            return
        m = moments["m"][start:stop]
        if self.name == "fedavgm":
            weights.add_(m.mul_(self.momentum).add_(delta), alpha=self.lr)
            return
        beta1, beta2 = self.betas
        v, square = moments["v"][start:stop], tmp.copy_(delta).mul_(delta)
        m.mul_(beta1).add_(delta, alpha=1 - beta1)
        if self.name == "fedadam":
            v.mul_(beta2).add_(square, alpha=1 - beta2)
        else:
            sign = delta.copy_(v).sub_(square).sign_()
            v.sub_(square.mul_(sign), alpha=1 - beta2)
        weights.addcdiv_(m, delta.copy_(v).sqrt_().add_(self.eps), value=self.lr)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for moments in self.state.values() for t in moments.values())

    def state_dict(self) -> dict:
        return {"optimizer": self.name, "state": self.state}

    def load_state_dict(self, saved: dict, numels: dict[str, int]) -> str:
        """Take a saved state whose tensors have the numels given (the global model's); says what it took."""
        if saved.get("optimizer") != self.name:
            return f"the saved state is {saved.get('optimizer')!r}'s, not {self.name!r}'s: the moments start at zero"
        state = saved.get("state") or {}
        bad = [k for k, moments in state.items() if any(t.numel() != numels.get(k) for t in moments.values())]
        if bad:
            raise ValueError(f"the saved server optimizer state does not fit the global model's tensors {bad[:5]}")
        self.state = {
            k: {n: t.to(torch.float32).reshape(-1) for n, t in moments.items()} for k, moments in state.items()
        }
        return f"continues {self.name}'s state of {len(self.state)} tensors ({self.nbytes():,} bytes)"


class SampleWeightedFedAvg(ModelAggregator):
    """FedAvg of the sites' updates in fp32, weighted by `metrics["samples"]`, added to the fp32 global model in
    place; failed sites (weight 0, `ERROR` meta) are ignored."""

    def __init__(
        self,
        weight_key: str = "samples",
        compress_weights: bool = True,
        server_optimizer: str = "fedavg",
        server_lr: float = 1.0,
        server_momentum: float = 0.9,
        server_betas: tuple[float, float] = (0.9, 0.99),
        server_eps: float = 1e-3,
        history_file: str | None = None,
        send_fp32: bool = False,
    ):
        super().__init__()
        host_memory.apply()  # the server's job process reuses its buffers for the sites' multi-GB updates
        # The global model goes to the sites in bf16; a LoRA adapter (small) in fp32, as the server holds it.
        self.send_fp32 = send_fp32
        dtype = None if send_fp32 else torch.bfloat16
        if not transport.serialize_once_for_all_sites(packed=compress_weights, dtype=dtype):
            self.logger.warning("another tensor decomposer was registered first: the global model goes as it is held")
        self.weight_key = weight_key
        self.compress_weights = compress_weights  # NVFlare's job config is written from the attributes
        self.server_optimizer, self.server_lr, self.server_momentum = server_optimizer, server_lr, server_momentum
        self.server_betas, self.server_eps = list(server_betas), server_eps
        self.optimizer = ServerOptimizer(server_optimizer, server_lr, server_momentum, tuple(server_betas), server_eps)
        self._best_val_loss: float | None = None
        self._global: dict[str, torch.Tensor] = {}  # the fp32 global model, under the tensors' own names
        self._keys: list[str] = []  # its keys as sent to the sites (row parts, transport.split)
        self._sum: dict[str, torch.Tensor] = {}  # fp32 weighted sums of updates that arrived in memory
        self._misshapen: dict[str, set] = {}  # shapes of in-memory updates that did not match their sum's
        self._slice_sum: torch.Tensor | None = None  # the fp32 buffers of _average_into, made once
        self._slice_value: torch.Tensor | None = None
        self._on_disk: list[tuple[dict, float]] = []  # updates offloaded to disk (lazy refs), with their weights
        self._total = 0.0
        self._loss_sum = 0.0
        self._round_records: list[dict] = []
        self._history: list[dict] = []
        self.history_file = history_file  # an earlier run's site_metrics.json (--resume_from): its rounds come first
        self._discarder: threading.Thread | None = None  # deletes the averaged updates' files (_discard)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        _OPTIMIZERS[fl_ctx.get_job_id()] = self.optimizer  # for the persistor, from the run's first event on
        if event_type == AppEventType.ROUND_STARTED:  # after FedAvg has set the offload up for the run
            transport.share_disk_offload_with_job_cell(fl_ctx.get_engine())
        elif event_type == AppEventType.INITIAL_MODEL_LOADED:
            learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL) or {}
            weights = learnable.get(ModelLearnableKey.WEIGHTS) or {}
            self._keys = list(weights)
            self._global = {k: v for k, v in transport.join(weights).items() if isinstance(v, torch.Tensor)}
        elif event_type == EventType.END_RUN:
            _OPTIMIZERS.pop(fl_ctx.get_job_id(), None)
            self.wait_for_discard()
            transport.shutdown()

    def reset_stats(self) -> None:
        self._sum, self._misshapen, self._on_disk = {}, {}, []
        self._total, self._loss_sum, self._round_records = 0.0, 0.0, []

    def accept_model(self, model: FLModel) -> None:
        meta, metrics = model.meta or {}, model.metrics or {}
        params = {k: v for k, v in (model.params or {}).items() if k != transport.NO_UPDATE}
        site = meta.get("client_name", "unknown")
        weight = float(metrics.get(self.weight_key, meta.get(NUM_SAMPLES, 0)) or 0)
        error = meta.get("ERROR")
        if not error and params and model.params_type != ParamsType.DIFF:
            error = f"sent {model.params_type} weights; this server averages updates (ParamsType.DIFF)"
        record = {"round": model.current_round, "site": site, "weight": 0.0, "error": error}
        record.update({k: metrics[k] for k in ("loss", "samples", "steps", "seconds", SENT_BYTES, *VAL_KEYS)
                       if k in metrics})  # fmt: skip
        if not error and not params and meta.get(EVAL_ONLY):
            self.info(f"{site}: evaluated the global model (val_loss {metrics.get('val_loss')}), sent no update")
        elif error or not math.isfinite(weight) or weight <= 0 or not params:
            self.warning(f"{site}: left out of the average (weight {weight}, error: {error})")
        else:
            record["weight"] = weight
            if any(is_lazy(v) for v in params.values()):
                self._on_disk.append((params, weight))  # averaged tensor by tensor in aggregate_model
            else:
                self._add(params, weight)
            self._total += weight
            if "loss" in metrics:
                self._loss_sum += weight * float(metrics["loss"])
            sent = f", sent {metrics[SENT_BYTES] / 1e6:.2f} MB" if SENT_BYTES in metrics else ""
            self.info(f"{site}: accepted with weight {weight} (loss {metrics.get('loss')}{sent})")
        self._round_records.append(record)

    def _add(self, params: dict, weight: float) -> None:
        """Add an update that arrived in memory to the weighted sums; a tensor in another shape than the one summed
        so far is kept out of them and refused in `aggregate_model`, before anything changes."""
        for key, value in params.items():
            value = materialize(value)
            held = self._sum.get(key)
            if held is None:
                self._sum[key] = value.to(torch.float32, copy=True).mul_(weight)
            elif tuple(held.shape) != tuple(value.shape):
                self._misshapen.setdefault(key, set()).add(tuple(value.shape))
            else:
                held.add_(value, alpha=weight)

    def aggregate_model(self) -> FLModel:
        """The new global model: the fp32 global plus the weighted average of this round's updates, in place.

        Changing the global model's tensors in place is safe here: every site has downloaded them before sending
        its update, and `QwenPersistor` finishes writing them to disk on `BEFORE_AGGREGATION`. Every update is
        checked (keys, shapes, files) before any tensor changes. The result has the keys the sites were sent: row
        parts are views of the fp32 tensors.
        """
        self._record_round()
        best = self._score_received_model()
        self._write_history()
        made, served = transport.SERIALIZED.clear()  # every site has downloaded the global model by now
        if made:
            self.info(f"the sites' downloads were served {served} tensor items from {made} serializations")
        if self._total <= 0:
            self.warning("no site contributed this round: the global model stays as it was")
            # An empty DIFF leaves the controller's global model untouched.
            return FLModel(params_type=ParamsType.DIFF, params={}, meta={"nr_contributing_sites": 0, BEST_META: best})
        start = time.perf_counter()
        on_disk = [({k: self._source(v) for k, v in update.items()}, weight) for update, weight in self._on_disk]
        targets = self._targets(on_disk)
        if self.optimizer.plain:
            for key, target in targets.items():
                values = [(update[key], weight) for update, weight in on_disk if key in update]
                self._average_into(target, values, self._sum.pop(key, None))
        else:
            self._optimize(targets, on_disk)
        params = {key: transport.sent_as_is(self._view(key)) for key in self._keys}
        files = len({v.path for update, _ in on_disk for v in update.values() if isinstance(v, OffloadedTensor)})
        self._discard(on_disk)
        contributing = sum(1 for r in self._round_records if r["weight"] > 0)
        metrics = {"loss": self._loss_sum / self._total, "samples": self._total}
        how = (
            "added" if self.optimizer.plain else f"{self.optimizer.name} (server_lr {self.optimizer.lr:g}) stepped with"
        )
        self.info(
            f"{how} the fp32 average of {contributing} site(s)' updates over {self._total:g} samples to "
            f"{len(targets)} of {len(self._keys)} tensors ({len(on_disk)} read from disk in {files} files) in "
            f"{time.perf_counter() - start:.1f} s"
        )
        result = FLModel(
            params_type=ParamsType.FULL,
            params=params,
            metrics=metrics,
            meta={"nr_contributing_sites": contributing, BEST_META: best},
        )
        self.reset_stats()
        return result

    def _score_received_model(self) -> int | None:
        """The weighted means of the sites' `val_*` scores of the global model they received this round (`val_loss`
        weighted by `val_samples`, the generation metrics by `val_generated`), recorded in the history. When the mean
        val_loss is the best so far, this round's number: the global model the sites received (the one before this
        round's update) is the best; else None."""
        entry: dict = {}
        for key, count in VAL_WEIGHTS.items():
            scored = [(float(r[key]), float(r[count])) for r in self._round_records if r.get(key) is not None
                      and r.get(count)]  # fmt: skip
            scored = [(value, n) for value, n in scored if math.isfinite(value) and math.isfinite(n) and n > 0]
            if scored:
                entry[count] = sum(n for _, n in scored)
                entry[key] = sum(value * n for value, n in scored) / entry[count]
        if "val_loss" not in entry:
            return None
        val_loss = entry["val_loss"]
        best = self._best_val_loss is None or val_loss < self._best_val_loss
        if best:
            self._best_val_loss = val_loss
            for old in self._history:
                old.pop("best", None)
        round_num = self._round_records[0]["round"]
        self._history.append({"round": round_num, "site": MEAN, **entry} | ({"best": True} if best else {}))
        for key in VAL_WEIGHTS.keys() & entry.keys():  # TensorBoard / W&B, beside the sites' own values
            dxo = create_analytic_dxo(f"global_{key}", entry[key], AnalyticsDataType.SCALAR, global_step=round_num)
            send_analytic_dxo(self, dxo, self.fl_ctx)
        scores = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k in VAL_WEIGHTS)
        self.info(f"round {round_num}: the global model the sites received scored {scores} (weighted over "
                  f"{entry['val_samples']:g} records){' (best so far)' if best else ''}")  # fmt: skip
        return round_num if best else None

    def _fp32(self, name: str) -> torch.Tensor:
        if self._global[name].dtype != torch.float32 or not self._global[name].is_contiguous():
            self._global[name] = self._global[name].to(torch.float32, memory_format=torch.contiguous_format)
        return self._global[name]

    def _targets(self, on_disk: list[tuple[dict, float]]) -> dict[str, torch.Tensor]:
        """Per update key, the fp32 rows of the global model it changes; refuses unknown keys and wrong shapes."""
        targets = {}
        for key in dict.fromkeys([*self._sum, *(k for update, _ in on_disk for k in update)]):
            name, rows = transport.parse(key)
            if name not in self._global:
                raise ValueError(f"a site sent an update for {key!r}, which the global model does not have")
            self._fp32(name)
            target = self._view(key)
            shapes = {tuple(update[key].shape) for update, _ in on_disk if key in update}
            shapes |= {tuple(self._sum[key].shape)} if key in self._sum else set()
            shapes |= self._misshapen.get(key, set())
            if shapes != {tuple(target.shape)}:
                raise ValueError(f"the sites sent {key!r} in shapes {sorted(shapes)}; the global model's is "
                                 f"{tuple(target.shape)}")  # fmt: skip
            targets[key] = target
        return targets

    def _view(self, key: str) -> torch.Tensor:
        name, rows = transport.parse(key)
        return self._global[name] if rows is None else self._global[name][rows]

    def _discard(self, on_disk: list[tuple[dict, float]]) -> None:
        """Delete the averaged results' files in a background thread, not in the controller's.

        NVFlare deletes an offloaded result's folder when the last reference to it goes, in whichever thread drops it:
        the controller's as the average returns (before the next round can start), or a stream callback's while it
        receives the next round's results. Deleting gigabytes of files written seconds ago can wait on the disk,
        which is still writing them back. Each folder is renamed instead (instant, and mapped files stay valid), so
        NVFlare's own deletion finds nothing, and a thread removes the renamed folders.
        """
        folders = {
            os.path.dirname(v.path) for result, _ in on_disk for v in result.values() if isinstance(v, OffloadedTensor)
        }
        renamed = []
        for folder in sorted(folders):
            try:
                os.rename(folder, folder + ".averaged")
                renamed.append(folder + ".averaged")
            except OSError as e:
                self.warning(f"{folder}: left for NVFlare to delete ({e})")
        self.wait_for_discard()
        if renamed:
            self._discarder = threading.Thread(target=self._remove, args=(renamed,), name="averaged-results-cleanup")
            self._discarder.start()

    def _remove(self, folders: list[str]) -> None:
        for folder in folders:
            try:
                shutil.rmtree(folder)
            except FileNotFoundError:  # NVFlare removes the whole offload folder when the run ends
                pass
            except OSError as e:
                self.warning(f"could not delete the averaged result {folder}: {e}")

    def wait_for_discard(self) -> None:
        """Wait until the last round's averaged results are deleted."""
        if self._discarder is not None:
            self._discarder.join()
            self._discarder = None

    @staticmethod
    def _source(value):
        """NVFlare's offloaded tensor, checked (`OffloadedTensor`); any other lazy value read now."""
        return OffloadedTensor.of(value) or materialize(value)

    def _average_into(self, target: torch.Tensor, values: list[tuple], in_memory: torch.Tensor | None) -> None:
        """Add the weighted average of one tensor's updates to `target` (fp32, contiguous rows of the global model).

        `values`: (offloaded update, weight) per site that sent this tensor; `in_memory`: the weighted sum of those
        that arrived in memory. Summed a slice at a time in two reused fp32 buffers: a whole-tensor fp32 sum, and
        bf16 + fp32 arithmetic (torch casts the bf16 operand into a temporary first), take fresh memory several times
        the updates' size every round, and each fresh page is a fault (bench/bench_aggregate.py).
        """
        if not values:
            target.add_(in_memory, alpha=1 / self._total)
            return
        if self._slice_sum is None:
            self._slice_sum, self._slice_value = torch.empty(SLICE, dtype=torch.float32), torch.empty(SLICE)
        # Offloaded values are mapped files here, one tensor at a time (its pages count as this process's memory
        # only while it is mapped).
        flat_values = [((v.tensor() if isinstance(v, OffloadedTensor) else v).reshape(-1), w) for v, w in values]
        flat_target, flat_sum = target.view(-1), None if in_memory is None else in_memory.view(-1)
        for start in range(0, flat_target.numel(), SLICE):
            stop = min(start + SLICE, flat_target.numel())
            acc, value_fp32 = self._slice_sum[: stop - start], self._slice_value[: stop - start]
            if flat_sum is None:
                acc.zero_()
            else:
                acc.copy_(flat_sum[start:stop])
            for value, weight in flat_values:
                acc.add_(value_fp32.copy_(value[start:stop]), alpha=weight)
            flat_target[start:stop].add_(acc, alpha=1 / self._total)

    def _optimize(self, targets: dict[str, torch.Tensor], on_disk: list[tuple[dict, float]]) -> None:
        """The server optimizer's step, tensor by tensor: each slice's average update is summed from every key that
        covers it (row parts of any split) into a buffer, then stepped. A tensor with state that no site updated this
        round steps with a zero update (its momentum goes on)."""
        parts: dict[str, list] = {name: [] for name in self.optimizer.state}
        for key, target in targets.items():
            name, _ = transport.parse(key)
            offset = target.storage_offset() - self._global[name].storage_offset()
            parts.setdefault(name, []).append((offset, key, self._sum.pop(key, None)))
        if self._slice_sum is None:
            self._slice_sum, self._slice_value = torch.empty(SLICE, dtype=torch.float32), torch.empty(SLICE)
        for name, keys in parts.items():
            flat_target = self._fp32(name).view(-1)
            moments = self.optimizer.moments(name, flat_target.numel())
            # (offset, flat weighted sum in memory or None, [(flat offloaded update, weight)]): mapped for this tensor
            sources = [
                (offset, None if held is None else held.view(-1),
                 [((v.tensor() if isinstance(v, OffloadedTensor) else v).reshape(-1), w)
                  for update, w in on_disk if (v := update.get(key)) is not None])
                for offset, key, held in keys
            ]  # fmt: skip
            for start in range(0, flat_target.numel(), SLICE):
                stop = min(start + SLICE, flat_target.numel())
                acc, tmp = self._slice_sum[: stop - start].zero_(), self._slice_value[: stop - start]
                for offset, held, values in sources:
                    size = (held if held is not None else values[0][0]).numel()
                    lo, hi = max(start, offset), min(stop, offset + size)
                    if lo >= hi:
                        continue
                    into = acc[lo - start : hi - start]
                    if held is not None:
                        into.add_(held[lo - offset : hi - offset])
                    for value, weight in values:
                        into.add_(tmp[: hi - lo].copy_(value[lo - offset : hi - offset]), alpha=weight)
                self.optimizer.step(moments, start, flat_target[start:stop], acc.div_(self._total), tmp)

    def _record_round(self) -> None:
        """Add this round's records to the history; before the run's first, the earlier run's records of the rounds
        before it (`history_file`), so site_metrics.json goes on where the resumed run's ended."""
        first = min((r["round"] for r in self._round_records if r["round"] is not None), default=None)
        if self.history_file and first is not None and not self._history:
            try:
                earlier = json.loads(Path(self.history_file).read_text())
                self._history = [r for r in earlier if r["round"] < first]
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError, KeyError) as e:
                self.warning(f"{self.history_file}: not read ({type(e).__name__}: {e}); the history starts here")
        self._history.extend(self._round_records)

    def _write_history(self) -> None:
        app_root = self.fl_ctx.get_prop(FLContextKey.APP_ROOT) if self.fl_ctx else None
        if app_root:
            path = Path(app_root) / SITE_METRICS_FILE
            try:
                _atomic_write_json(path, self._history)
            except OSError as e:  # a full disk must not stop the federation: the next round writes it all again
                self.error(f"could not write {path} ({e}); the file there is intact, without this round")

    def record_missing(self, round_num: int, missing: dict[str, str]) -> None:
        """The sites that sent no result in `round_num` (site -> why), recorded with weight 0."""
        for site, why in missing.items():
            self.warning(f"{site}: no result in round {round_num} ({why})")
            self._round_records.append({"round": round_num, "site": site, "weight": 0.0, "error": why})

    def discard_round(self, reason: str) -> None:
        """The round does not count: its records are kept with weight 0 and `reason`, the global model is unchanged."""
        for record in self._round_records:
            record.update(weight=0.0, error=record.get("error") or reason)
        self._record_round()
        self._write_history()
        self.reset_stats()


class FederationStopped(Exception):
    """Too few sites answered a round: the run ends after the last complete round."""


class FaultTolerantFedAvg(FedAvg):
    """NVFlare's FedAvg that goes on without the sites that do not answer a round, down to `min_sites`.

    A round waits for every site, at most `round_timeout` seconds after the first one answered (0: no limit). A site
    whose trainer process died answers with an error, which is ignored (not NVFlare's panic); one that timed out or
    whose client job left is not waited for further. Those sites are recorded with weight 0 and the reason
    (`site_metrics.json`) and the round averages the others. A site that answers, even with a failure of its own
    training (weight 0), counts as answered. When fewer than `min_sites` answered (0: every site), the round is
    discarded and the run ends cleanly: FL_global_model.pt holds the last complete round, which `--resume_from`
    continues.

    After the run's first round, a site whose last result said it keeps what it receives (`transport.KEEPS`) is sent
    the global model without the tensors no site has sent an update of this run (the vision tower while no site
    trains it): they are still as the site received them. Its task names them (`transport.NOT_SENT`); a site that
    does not hold them fails that round and gets the whole model the next. Other sites get the whole model: with a
    `round_timeout`, the two groups' tasks each wait for their own first answer.
    """

    def __init__(self, *args, min_sites: int = 0, round_timeout: int = 0, **kwargs):
        # FedAvg.run sleeps task_check_period between its checks that every site has answered (NVFlare's default
        # 0.5 s: 0.25 s on average between the last result and the average, every round); a check costs nothing.
        kwargs.setdefault("task_check_period", TASK_CHECK_PERIOD)
        super().__init__(*args, **kwargs)
        self.min_sites, self.round_timeout = min_sites, round_timeout
        self._targets: list[str] = []
        self._answered: set[str] = set()
        self._failed: dict[str, str] = {}  # site -> NVFlare's return code of its error result
        self._untouched: set[str] | None = None  # tensors no site has sent an update of this run (None: no round yet)
        self._keeping: set[str] = set()  # sites whose last result said they keep what they receive

    def run(self) -> None:
        try:
            super().run()
        except FederationStopped as stop:
            self.error(str(stop))

    def send_model(
        self,
        task_name: str = "train",
        data: FLModel | None = None,
        targets: list[str] | None = None,
        min_responses: int | None = None,
        timeout: int = 0,
        callback=None,
    ) -> None:
        """NVFlare's send, with this controller's wait: `min_responses` and `timeout` are set from `round_timeout`."""
        self._targets, self._answered, self._failed = list(targets or []), set(), {}
        # With a round_timeout: done once the first site answered and the others had round_timeout seconds more;
        # without: done when every site answered (or NVFlare declared the silent ones dead).
        for sites, task_data in self._tasks(data, self._targets):
            self.broadcast_model(
                task_name=task_name, data=task_data, targets=sites, min_responses=1 if self.round_timeout else 0,
                wait_time_after_min_received=self.round_timeout, blocking=False, callback=callback,
            )  # fmt: skip

    def _tasks(self, data: FLModel | None, targets: list[str]) -> list[tuple[list[str], FLModel | None]]:
        """The round's tasks: the whole global model for some sites, without the untouched tensors for the sites
        that keep what they receive; (sites, data) per task that has sites."""
        if data is None or not data.params:
            return [(targets, data)]
        if self._untouched is None:  # the run's first round: every site gets every tensor
            self._untouched = transport.tensor_names(data.params)
        slim_sites = [site for site in targets if site in self._keeping] if self._untouched else []
        full_sites = [site for site in targets if site not in slim_sites]
        tasks = [(full_sites, data)] if full_sites else []
        if slim_sites:
            slim = copy.copy(data)
            slim.params = transport.leave_out(data.params, self._untouched)
            slim.meta = {**(data.meta or {}), transport.NOT_SENT: sorted(self._untouched)}
            self.info(f"{', '.join(slim_sites)}: {len(self._untouched)} tensors no site has updated this run left "
                      f"out (the sites hold them); {', '.join(full_sites) or 'no site'}: the whole model")  # fmt: skip
            tasks.append((slim_sites, slim))
        return tasks

    def _accept_train_result(
        self, client_name: str, result: Shareable, fl_ctx: FLContext, is_unknown_task: bool = False
    ) -> bool:
        rc = result.get_return_code()
        if not is_unknown_task and rc and rc != ReturnCode.OK:
            self._failed[client_name] = rc
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

    def _aggregate_one_result(self, result: FLModel) -> bool:
        meta = result.meta
        site = meta.get("client_name")
        self._answered.add(site)
        if self._untouched is not None:  # any tensor a site sent may have changed: it travels from now on
            self._untouched -= transport.tensor_names(result.params or {})
        keeps = meta.get(transport.KEEPS) and not meta.get("ERROR")
        (self._keeping.add if keeps else self._keeping.discard)(site)
        return super()._aggregate_one_result(result)

    def _get_aggregated_result(self) -> FLModel:
        late = f"no result within --round_timeout {self.round_timeout} s of the first site's"
        missing = {
            site: f"its trainer process ended without a result ({self._failed[site]})" if site in self._failed
            else late if self.round_timeout else "its client job left"
            for site in self._targets if site not in self._answered
        }  # fmt: skip
        self.aggregator.record_missing(self.current_round, missing)
        self._keeping -= missing.keys()  # whatever it holds, it gets the whole model if it comes back
        need = self.min_sites or len(self._targets)
        if len(self._answered) < need:
            answered = f"{len(self._answered)} of {len(self._targets)} sites answered"
            self.aggregator.discard_round(f"{DISCARDED}: {answered} (--min_sites {need})")
            raise FederationStopped(
                f"the federation stopped in round {self.current_round}: {answered}, fewer than --min_sites {need}; "
                "FL_global_model.pt holds the last complete round: continue with --resume_from"
            )
        return super()._get_aggregated_result()


class QwenPersistor(PTFileModelPersistor):
    """Atomic `FL_global_model.pt` every round; a Hugging Face directory of the global model when the run ends."""

    def __init__(
        self,
        model_name_or_path: str,
        source_ckpt_file_full_name: str | None = None,
        hf_dir_name: str = HF_DIR_NAME,
        part_bytes: int = transport.PART_BYTES,
        lora: dict | None = None,
    ):
        # With `lora` (lora.LoraSettings' fields) the global model is the adapter (model.Qwen3VLAdapter), not the model
        held = ("model.Qwen3VLAdapter", {"lora": lora}) if lora else ("model.Qwen3VLModel", {})
        super().__init__(
            model={"path": held[0], "args": {"model_name_or_path": model_name_or_path, **held[1]}},
            source_ckpt_file_full_name=source_ckpt_file_full_name,
            allow_numpy_conversion=False,  # bf16 has no NumPy dtype
            load_device="cpu",
        )
        self.model_name_or_path = model_name_or_path
        self.hf_dir_name = hf_dir_name
        self.part_bytes = part_bytes
        self.lora = lora  # the global model goes to the sites with larger tensors in row parts
        self._saver: threading.Thread | None = None
        self._saved = False  # whether the last save wrote FL_global_model.pt

    def save_model(self, ml, fl_ctx: FLContext) -> None:
        """Take the new global model and write `FL_global_model.pt` (fp32) in the background, so the next round's
        send does not wait for the disk. Each save waits for the one before; the run's end for the last. When the
        aggregate says the model the sites scored this round is the best, the file still holding it (fully written:
        the save before this one is finished) becomes `FL_best_model.pt` first.
        """
        self.wait_for_save()
        best_round = (ml.get(ModelLearnableKey.META) or {}).get(BEST_META)
        if best_round is not None:
            self._keep_best(best_round, fl_ctx)
        # The aggregate's own tensors under their own names (row parts are views of them), not a copy: the next
        # round's average changes them only after BEFORE_AGGREGATION, on which this persistor waits for the file.
        weights = transport.join(ml.get(ModelLearnableKey.WEIGHTS) or {})
        weights = {k: (materialize(v) if isinstance(v, transport.Parts) else v).detach() for k, v in weights.items()}
        self._get_persistence_manager(fl_ctx).update(make_model_learnable(weights, ml.get(ModelLearnableKey.META)))
        self._start_save(_OPTIMIZERS.get(fl_ctx.get_job_id()))

    def _start_save(self, optimizer: ServerOptimizer | None) -> None:
        self._saver = threading.Thread(target=self._save_file, args=(optimizer,), name="global-model-save")
        self._saver.start()

    def _save_file(self, optimizer: ServerOptimizer | None) -> None:
        """The server optimizer's state (if it has any), then the model, each written atomically, with one token in
        both: a state is only loaded with the model it was saved with."""
        self._saved = False
        try:
            token = None
            if optimizer is not None and optimizer.state:
                token = uuid.uuid4().hex
                path = Path(self._ckpt_save_path).with_name(OPTIMIZER_FILE)
                atomic_write(path, lambda f: torch.save(optimizer.state_dict() | {OPTIMIZER_TOKEN: token}, f))
                self.logger.info(f"server optimizer state ({optimizer.name}): {optimizer.nbytes():,} bytes in {path}")
            other = self.persistence_manager.other_props
            other.pop(OPTIMIZER_TOKEN, None)
            other.update({OPTIMIZER_TOKEN: token} if token else {})
            self.save_model_file(self._ckpt_save_path)  # NVFlare's atomic write (temp file, fsync, rename)
            self._saved = True
        except Exception as e:  # a full disk: job.py sees the file's round behind the run's and exits 1
            self.logger.error(f"could not write {self._ckpt_save_path} ({type(e).__name__}: {e}); the file there "
                              "is intact and holds an earlier round")  # fmt: skip

    def _keep_best(self, round_num: int, fl_ctx: FLContext) -> None:
        """`FL_best_model.pt`: the file of the global model the sites received in `round_num`, hard-linked (the next
        save replaces FL_global_model.pt by a new file, leaving this one) or copied, then renamed into place."""
        best = Path(self.log_dir) / BEST_MODEL_FILE
        if not self._saved:
            self.log_error(fl_ctx, f"the global model of round {round_num} scored best, but its file was not written: "
                                   f"{best.name} is not updated")  # fmt: skip
            return
        tmp = best.with_name(f".{best.name}.tmp")
        try:
            tmp.unlink(missing_ok=True)
            try:
                os.link(self._ckpt_save_path, tmp)
            except OSError:
                shutil.copyfile(self._ckpt_save_path, tmp)
            os.replace(tmp, best)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self.log_error(fl_ctx, f"could not write {best} ({e}); the file there is intact")
            return
        self.log_info(fl_ctx, f"{best}: the global model the sites received in round {round_num} (best val_loss)")

    def wait_for_save(self) -> None:
        if self._saver is not None:
            self._saver.join()
            self._saver = None

    def load_model(self, fl_ctx: FLContext):
        """The initial global model in fp32 (the base model's bf16 weights widened, or a saved fp32 global as it is),
        with larger tensors in row parts (views) for the wire."""
        learnable = super().load_model(fl_ctx)
        if learnable is not None and learnable.get(ModelLearnableKey.WEIGHTS):
            weights = {
                k: v.to(torch.float32) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in learnable[ModelLearnableKey.WEIGHTS].items()
            }
            learnable = make_model_learnable(weights, learnable.get(ModelLearnableKey.META))
            self.persistence_manager.update(learnable)  # holds the fp32 tensors, not the bf16 ones
            learnable[ModelLearnableKey.WEIGHTS] = transport.split(weights, self.part_bytes)
            optimizer = _OPTIMIZERS.get(fl_ctx.get_job_id())
            self._restore_optimizer(optimizer, fl_ctx)
            self._start_save(optimizer)  # the initial model: the one round 0's val_loss scores
        # The global model now lives in the persistence manager (and the controller); the module's own tensors would
        # be a stale bf16 copy. Keep only its structure: export_hf puts the weights back.
        if self.model is not None and not self.lora:
            self.model = self.model.to("meta")
            self.model.model.tie_weights()  # .to() gives each module its own meta copy of a shared weight
        return learnable

    def _restore_optimizer(self, optimizer: ServerOptimizer | None, fl_ctx: FLContext) -> None:
        """Load the server optimizer's state saved beside the resumed model (`--resume_from`), if it is that save's."""
        source = self.source_ckpt_file_full_name
        if optimizer is None or optimizer.name == "fedavg" or not source:
            return
        if not os.path.isabs(source):  # as NVFlare resolves it
            source = os.path.join(fl_ctx.get_prop(FLContextKey.APP_ROOT), WorkspaceConstants.CUSTOM_FOLDER_NAME, source)
        path = Path(source).with_name(OPTIMIZER_FILE)
        if not path.is_file():
            self.log_info(fl_ctx, f"no {path.name} beside {source}: {optimizer.name}'s moments start at zero")
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        token = self.persistence_manager.other_props.get(OPTIMIZER_TOKEN)
        if saved.get(OPTIMIZER_TOKEN) != token:
            self.log_warning(fl_ctx, f"{path} was not saved with {source} (an interrupted save?): "
                                     f"{optimizer.name}'s moments start at zero")  # fmt: skip
            return
        numels = {k: v.numel() for k, v in self.persistence_manager.var_dict.items()}
        self.log_info(fl_ctx, f"{path}: {optimizer.load_state_dict(saved, numels)}")

    def handle_event(self, event: str, fl_ctx: FLContext) -> None:
        if event in (EventType.END_RUN, AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, AppEventType.BEFORE_AGGREGATION):
            self.wait_for_save()  # BEFORE_AGGREGATION: the average is about to overwrite the tensors being written
        super().handle_event(event, fl_ctx)
        if event == EventType.END_RUN and self.persistence_manager is not None:
            try:
                if self.lora:
                    adapter = self.export_adapter(Path(self.log_dir) / ADAPTER_DIR_NAME)
                    self.log_info(fl_ctx, f"global adapter exported in PEFT's format: {adapter}")
                path = self.export_hf(Path(self.log_dir) / self.hf_dir_name)
                self.log_info(fl_ctx, f"global model exported as a Hugging Face directory: {path}")
            except Exception as e:  # the .pt checkpoint is already safe; report and let the run end
                self.log_exception(fl_ctx, f"Hugging Face export failed: {e}")

    def export_adapter(self, output_dir: Path) -> Path:
        """Write the global adapter (fp32) as a PEFT folder that `PeftModel.from_pretrained(base, output_dir)` loads."""
        settings = LoraSettings(**self.lora)
        return save_adapter(self.persistence_manager.var_dict, settings, self.model_name_or_path, output_dir)

    def export_hf(self, output_dir: Path) -> Path:
        """Write the global model's bf16 rounding with the base model's config and processor to `output_dir`; with
        LoRA, the base model with the global adapter (`export_adapter`, written first) merged in fp32, then rounded."""
        from transformers import AutoProcessor

        tmp = output_dir.with_name(output_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if self.lora:
                adapter = output_dir.with_name(ADAPTER_DIR_NAME)
                load_merged(self.model_name_or_path, adapter, torch.bfloat16).save_pretrained(tmp)
            else:
                weights = {
                    k: v.to(torch.bfloat16) if v.is_floating_point() else v
                    for k, v in self.persistence_manager.var_dict.items()
                }
                self.model.load_state_dict(weights, assign=True)
                self.model.model.save_pretrained(tmp)
            AutoProcessor.from_pretrained(self.model_name_or_path).save_pretrained(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no part-written folder behind
            raise
        shutil.rmtree(output_dir, ignore_errors=True)
        os.replace(tmp, output_dir)
        return output_dir
