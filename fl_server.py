"""Server side of the federated job: fp32 sample-weighted FedAvg, and a persistor that exports the global model.

`SampleWeightedFedAvg` sums the sites' bf16 weights in fp32, each weighted by the samples it trained on; a site that
failed (weight 0 or `ERROR` in its meta) is left out, and when no site contributes the global model stays as it was.
Per round it also writes `site_metrics.json` (loss, samples, steps, seconds, weight per site) next to the global model.
With NVFlare's tensor disk offload (job.py turns it on) the sites' results arrive as files on the server's disk; the
average is then taken a slice at a time when the last result is in, from the mapped files, so the server never holds
a whole result or an fp32 copy of the model in memory. Without deltas the average is written into the tensors of the
global model it replaces, the initial one in round 0, so the server holds one global model, not two. Tensors sent in
row parts (transport.py) are averaged into their tensor's rows. The averaged results' files are deleted in a
background thread.
The aggregator also has the sites' downloads share each tensor's serialized bytes (`transport.SerializedOnce`),
compressed with `compress_weights` (`transport.pack`), and drops those bytes once the results are in. The sites'
results may come as deltas against the global model they trained from, which is the server's current one
(`transport.Reference`). With `delta_weights`, when every site of the job contributed this round and keeps the
global model it received (`KEEPS_GLOBAL_MODEL` in its meta), that model stays as it is and the next global model is
sent as a delta against it; the average is written into the tensors of the model before it (the first time, into
buffers made while the sites train), so two global models take turns with no copy between them. Such a model is
encoded for the sites before they ask (`transport.encode_ahead`) and goes without NVFlare's deep copy of the task's
data (`_sent_as_is`).

`QwenPersistor` is NVFlare's PyTorch file persistor (atomic `FL_global_model.pt` every round, written in the
background while the next round goes on and finished before the next average overwrites its tensors; optional start
from a saved `FL_global_model.pt`) that sends the global model with large tensors in row parts and, when the run ends,
also writes it as a Hugging Face directory (weights plus processor) that
`Qwen3VLForConditionalGeneration.from_pretrained` loads. It keeps no weights of its own: the global model's tensors
are the only copy on the server.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.fuel.utils.fobs import FOBSContextKey

import host_memory
import transport
from model import is_lazy, materialize

SITE_METRICS_FILE = "site_metrics.json"
HF_DIR_NAME = "hf_global_model"
NUM_SAMPLES = "NUM_SAMPLES"
SLICE = 1 << 22  # elements averaged at a time: 16 MiB fp32 buffers


def _atomic_write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


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


def share_disk_offload_with_job_cell(engine) -> None:
    """Make NVFlare 2.9's simulator offload results to disk as POC and production do.

    FedAvg turns the offload on in the engine's cell. In POC and production that is the server job's cell, on which
    the results arrive; in the simulator the engine holds the root cell and the results arrive on `server.job_cell`.
    """
    job_cell = getattr(getattr(engine, "server", None), "job_cell", None)
    cell = engine.get_cell() if engine is not None else None
    if job_cell is None or cell is None or job_cell is cell:
        return
    settings = cell.get_fobs_context()
    keys = (FOBSContextKey.TENSOR_DISK_OFFLOAD, "tensor_disk_offload_root_dir")  # NVFlare's own context keys
    job_cell.update_fobs_context({key: settings.get(key) for key in keys})


class SampleWeightedFedAvg(ModelAggregator):
    """FedAvg in fp32, weighted by `metrics["samples"]`; failed sites (weight 0, `ERROR` meta) are ignored."""

    def __init__(self, weight_key: str = "samples", compress_weights: bool = True, delta_weights: bool = True):
        super().__init__()
        host_memory.apply()  # the server's job process reuses its buffers for the sites' multi-GB results
        if not transport.serialize_once_for_all_sites(packed=compress_weights):
            self.logger.warning("another tensor decomposer was registered first: each site's download serializes")
        self.weight_key = weight_key
        self.compress_weights = compress_weights  # NVFlare's job config is written from the attributes
        self.delta_weights = delta_weights
        self._previous: dict[str, torch.Tensor] = {}  # last round's global model, which the sites hold (deltas)
        self._spare: dict[str, torch.Tensor] = {}  # buffers for the first average, their pages touched ahead
        self._spare_maker: threading.Thread | None = None
        self._sum: dict[str, torch.Tensor] = {}  # fp32 running sums of results that arrived in memory
        self._dtypes: dict[str, torch.dtype] = {}
        self._slice_sum: torch.Tensor | None = None  # the fp32 buffers of _average, made once
        self._slice_value: torch.Tensor | None = None
        self._last_output: dict[str, torch.Tensor] = {}  # the global model this aggregator made last round
        self._last_sent_as_is = False  # whether it went without NVFlare's copy (_sent_as_is): never overwrite it
        self._on_disk: list[tuple[dict, float]] = []  # results offloaded to disk (lazy refs), with their weights
        self._total = 0.0
        self._loss_sum = 0.0
        self._round_records: list[dict] = []
        self._history: list[dict] = []
        self._discarder: threading.Thread | None = None  # deletes the averaged results' files (_discard)
        self._encoding_ahead: list = []  # transport.encode_ahead's tasks for the global model being sent

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == AppEventType.ROUND_STARTED:  # after FedAvg has set the offload up for the run
            share_disk_offload_with_job_cell(fl_ctx.get_engine())
        elif event_type == AppEventType.INITIAL_MODEL_LOADED:  # the first average goes into the initial model
            learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL) or {}
            weights = transport.join(learnable.get(ModelLearnableKey.WEIGHTS) or {})
            self._last_output = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
            self._set_references(send_deltas=False)
            if self.compress_weights and self.delta_weights:
                self._spare_maker = threading.Thread(target=self._make_spare, name="spare-global-model")
                self._spare_maker.start()
        elif event_type == EventType.END_RUN:
            self.wait_for_discard()

    def reset_stats(self) -> None:
        self._sum, self._dtypes, self._on_disk = {}, {}, []
        self._total, self._loss_sum, self._round_records = 0.0, 0.0, []

    def accept_model(self, model: FLModel) -> None:
        meta, metrics = model.meta or {}, model.metrics or {}
        site = meta.get("client_name", "unknown")
        weight = float(metrics.get(self.weight_key, meta.get(NUM_SAMPLES, 0)) or 0)
        error = meta.get("ERROR")
        record = {"round": model.current_round, "site": site, "weight": 0.0, "error": error}
        record.update({k: metrics[k] for k in ("loss", "samples", "steps", "seconds") if k in metrics})
        record["keeps_global_model"] = bool(meta.get(transport.KEEPS_GLOBAL_MODEL))
        if error or not math.isfinite(weight) or weight <= 0 or not model.params:
            self.warning(f"{site}: left out of the average (weight {weight}, error: {error})")
        else:
            record["weight"] = weight
            if any(is_lazy(v) for v in model.params.values()):
                self._on_disk.append((model.params, weight))  # averaged tensor by tensor in aggregate_model
            else:
                self._add(model.params, weight)
            self._total += weight
            if "loss" in metrics:
                self._loss_sum += weight * float(metrics["loss"])
            self.info(f"{site}: accepted with weight {weight} (loss {metrics.get('loss')})")
        self._round_records.append(record)

    def _add(self, params: dict, weight: float) -> None:
        for name, value in params.items():
            value = materialize(value)
            if name not in self._sum:
                self._dtypes[name] = value.dtype
                self._sum[name] = value.to(torch.float32, copy=True).mul_(weight)
            else:
                self._sum[name].add_(value, alpha=weight)

    def aggregate_model(self) -> FLModel:
        """The new global model, written into the tensors of an earlier one (`_buffer`): with deltas the one before
        the model the sites hold (the first time, spare buffers), else the one it replaces.

        Overwriting an earlier global model is safe here: every site has downloaded it before sending its result,
        and `QwenPersistor` finishes writing it to disk on `BEFORE_AGGREGATION`. Every result is checked (shapes,
        files) before any tensor is overwritten. Row parts (transport.py) are averaged into their tensor's rows, and
        the result has the keys the sites sent: the parts are views of the one averaged tensor.
        """
        self._history.extend(self._round_records)
        self._write_history()
        transport.stop_encoding_ahead(self._encoding_ahead)
        self._encoding_ahead = []
        made, served = transport.SERIALIZED.clear()  # every site has downloaded the global model by now
        if made:
            self.info(f"the sites' downloads were served {served} tensor items from {made} serializations")
        if self._total <= 0:
            self.warning("no site contributed this round: the global model stays as it was")
            self._set_references(send_deltas=False)
            # An empty DIFF leaves the controller's global model untouched.
            return FLModel(params_type=ParamsType.DIFF, params={}, meta={"nr_contributing_sites": 0})
        start = time.perf_counter()
        keys = list(self._sum) or list(self._on_disk[0][0])
        on_disk = [({k: self._source(result[k]) for k in keys}, weight) for result, weight in self._on_disk]
        sources = {k: [result[k] for result, _ in on_disk] + ([self._sum[k]] if k in self._sum else []) for k in keys}
        self._check_shapes(sources)
        tensors, reused = {}, 0
        send_deltas = self.compress_weights and self.delta_weights and self._every_site_keeps_the_global_model()
        if self._spare_maker is not None:
            self._spare_maker.join()
            self._spare_maker = None
        for name, (shape, parts) in transport.layout({k: tuple(v[0].shape) for k, v in sources.items()}).items():
            dtype = self._dtypes.get(parts[0][0]) or sources[parts[0][0]][0].dtype
            out = self._buffer(name, shape, dtype, keep_last=send_deltas or self._last_sent_as_is)
            if out is None:
                out = torch.empty(shape, dtype=dtype)
            else:
                reused += 1
            for key, rows in parts:
                self._average(key, on_disk, out if rows is None else out[rows])
            tensors[name] = out
        params = {
            key: tensors[name] if rows is None else tensors[name][rows]
            for key in keys
            for name, rows in [transport.parse(key)]
        }
        if send_deltas:
            params = {key: _sent_as_is(value) for key, value in params.items()}
        self._last_sent_as_is = send_deltas
        from_disk = len(self._on_disk)
        files = len({v.path for result, _ in on_disk for v in result.values() if isinstance(v, OffloadedTensor)})
        self._discard(on_disk)
        # With deltas the sites hold the model just replaced: it stays as it is, as what the next one is sent as a
        # change from, and the next average goes into its tensors.
        self._previous = self._last_output if send_deltas else {}
        self._last_output, self._spare = tensors, {}
        self._set_references(send_deltas, sending=params)
        if send_deltas:
            self._encoding_ahead = transport.encode_ahead(params)  # the sites' downloads find it encoded
        contributing = sum(1 for r in self._round_records if r["weight"] > 0)
        metrics = {"loss": self._loss_sum / self._total, "samples": self._total}
        self.info(
            f"averaged {contributing} site(s) over {self._total:g} samples in fp32 ({from_disk} read from disk in "
            f"{files} files, {reused}/{len(tensors)} tensors written in place) in {time.perf_counter() - start:.1f} s; "
            f"the next global model goes {'as a delta' if send_deltas else 'whole'}"
        )
        result = FLModel(
            params_type=ParamsType.FULL, params=params, metrics=metrics, meta={"nr_contributing_sites": contributing}
        )
        self.reset_stats()
        return result

    def _every_site_keeps_the_global_model(self) -> bool:
        """Whether every site of the job contributed this round and keeps the global model it trained from: only
        then can the next one go to all of them as a delta against it (a site that failed, or whose result NVFlare
        dropped, may not hold it)."""
        engine = self.fl_ctx.get_engine() if self.fl_ctx else None
        sites = {client.name for client in engine.get_clients()} if engine else set()
        keeping = {r["site"] for r in self._round_records if r["weight"] > 0 and r["keeps_global_model"]}
        return bool(sites) and sites <= keeping

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, keep_last: bool) -> torch.Tensor | None:
        """A tensor to write the average of `name` into: the global model before the last one (which no site needs
        once this round's results are in), a spare one, or, unless `keep_last`, the last one itself; None where
        none of them fits."""
        for candidates in (self._previous, self._spare, {} if keep_last else self._last_output):
            out = candidates.get(name)
            if (
                out is not None
                and out.is_contiguous()
                and out.device.type == "cpu"
                and (tuple(out.shape), out.dtype) == (shape, dtype)
            ):
                return out
        return None

    def _make_spare(self) -> None:
        """Buffers for the first average, in a background thread while the sites train: with deltas the initial
        model stays as it is (the sites hold it). On the H200 machine round 0's average took 4.0-4.1 s against
        1.7-1.9 s later, about what 4.26 GB of fresh pages cost there (host_memory.py).

        The second average goes into the initial model, whose tensors transformers maps from the checkpoint file
        copy-on-write: the first write to each page copies it. Round 1's average took 3.7 s against 1.8-1.9 s on
        the H200 machine (session 16); every page of it is written here instead, with the bytes it holds."""
        spare = {}
        for name, tensor in self._last_output.items():
            if tensor.device.type == "cpu":
                spare[name] = torch.empty_like(tensor, memory_format=torch.contiguous_format).zero_()
                _own_pages(tensor)
        self._spare = spare

    def _set_references(self, send_deltas: bool, sending: dict | None = None) -> None:
        """The sites' results are rebuilt from the current global model; what the server sends next (`sending`) goes
        as a delta against last round's (`_previous`) when `send_deltas`, else whole."""
        send = transport.Reference(self._previous, sending) if send_deltas else None
        transport.set_references(send=send, receive=transport.Reference(self._last_output))
        if not send_deltas:
            self._previous = {}

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

    @staticmethod
    def _check_shapes(sources: dict[str, list]) -> None:
        """Refuse results whose tensors differ in shape, before anything is overwritten."""
        for key, values in sources.items():
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                files = [v.path for v in values if isinstance(v, OffloadedTensor)]
                raise ValueError(f"the sites sent {key!r} in different shapes {sorted(shapes)} (files: {files})")

    def _average(self, key: str, on_disk: list[tuple[dict, float]], out: torch.Tensor) -> None:
        """Write the weighted fp32 average of one tensor over the sites into `out` (contiguous, its dtype).

        The sites' values are summed a slice at a time in two reused fp32 buffers. A whole-tensor fp32 sum, and bf16 +
        fp32 arithmetic (torch casts the bf16 operand into a temporary first), take fresh memory several times the
        results' size every round, and each fresh page is a fault: 1.7 million against 0.24 million for three 1 GB
        results (bench/bench_aggregate.py), and none once `out` is the previous global model's tensor.
        """
        in_memory = self._sum.pop(key, None)
        values = [(result[key], weight) for result, weight in on_disk]
        if not values:
            out.copy_(in_memory.div_(self._total))
            return
        if self._slice_sum is None:
            self._slice_sum, self._slice_value = torch.empty(SLICE, dtype=torch.float32), torch.empty(SLICE)
        # Offloaded values are mapped files here, one tensor at a time (its pages count as this process's memory
        # only while it is mapped).
        flat_values = [((v.tensor() if isinstance(v, OffloadedTensor) else v).view(-1), w) for v, w in values]
        flat_out, flat_sum = out.view(-1), None if in_memory is None else in_memory.view(-1)
        for start in range(0, flat_out.numel(), SLICE):
            stop = min(start + SLICE, flat_out.numel())
            acc, value_fp32 = self._slice_sum[: stop - start], self._slice_value[: stop - start]
            if flat_sum is None:
                acc.zero_()
            else:
                acc.copy_(flat_sum[start:stop])
            for value, weight in flat_values:
                acc.add_(value_fp32.copy_(value[start:stop]), alpha=weight)
            flat_out[start:stop].copy_(acc.div_(self._total))

    def _write_history(self) -> None:
        app_root = self.fl_ctx.get_prop(FLContextKey.APP_ROOT) if self.fl_ctx else None
        if app_root:
            _atomic_write_json(Path(app_root) / SITE_METRICS_FILE, self._history)


def _itself(alias: weakref.ref, memo: dict) -> torch.Tensor:
    return alias()


def _sent_as_is(tensor: torch.Tensor) -> torch.Tensor:
    """An alias of `tensor` that deep-copies as itself.

    NVFlare deep-copies a broadcast task's data before the first site gets it (`wf_comm_server.py`, a copy "against
    concurrent in-place modifications"): for 2B, 4.26 GB of fresh memory and about a second of Python's interpreter
    each round, before any site can start its download. A global model sent as a delta stays untouched until the
    average after next (the next one goes into the model before it, and every site has downloaded this one before
    its result counts), so the copy protects nothing. Python's deep copy takes an instance's own `__deepcopy__`; the
    alias is new each round, so a model that later goes whole is copied again. `torch.save` cannot pickle the alias:
    `QwenPersistor` saves detached tensors."""
    alias = tensor.view(tensor.shape)
    alias.__deepcopy__ = functools.partial(_itself, weakref.ref(alias))
    return alias


def _own_pages(tensor: torch.Tensor) -> None:
    """Write every page of a contiguous CPU `tensor` with the bytes it holds (numpy's write leaves torch's
    version counter, which keys the encoded items being sent, as it is)."""
    if tensor.is_contiguous() and tensor.numel():
        data = tensor.detach().reshape(-1).view(torch.uint8).numpy()
        np.bitwise_or(data, 0, out=data)


class QwenPersistor(PTFileModelPersistor):
    """Atomic `FL_global_model.pt` every round; a Hugging Face directory of the global model when the run ends."""

    def __init__(
        self,
        model_name_or_path: str,
        source_ckpt_file_full_name: str | None = None,
        hf_dir_name: str = HF_DIR_NAME,
        part_bytes: int = transport.PART_BYTES,
    ):
        super().__init__(
            model={"path": "model.Qwen3VLModel", "args": {"model_name_or_path": model_name_or_path}},
            source_ckpt_file_full_name=source_ckpt_file_full_name,
            allow_numpy_conversion=False,  # bf16 has no NumPy dtype
            load_device="cpu",
        )
        self.model_name_or_path = model_name_or_path
        self.hf_dir_name = hf_dir_name
        self.part_bytes = part_bytes  # the global model goes to the sites with larger tensors in row parts
        self._saver: threading.Thread | None = None

    def save_model(self, ml, fl_ctx: FLContext) -> None:
        """Take the new global model and write `FL_global_model.pt` in the background (about 7 s for 2B), so the
        next round's send does not wait for the disk. Each save waits for the one before; the run's end for the last.
        """
        self.wait_for_save()
        # The aggregate's own tensors under their own names (row parts are views of them), not a copy: the next
        # round's average overwrites them only after BEFORE_AGGREGATION, on which this persistor waits for the file.
        weights = transport.join(ml.get(ModelLearnableKey.WEIGHTS) or {})
        weights = {k: (materialize(v) if isinstance(v, transport.Parts) else v).detach() for k, v in weights.items()}
        self._get_persistence_manager(fl_ctx).update(make_model_learnable(weights, ml.get(ModelLearnableKey.META)))
        self._saver = threading.Thread(target=self._save_file, name="global-model-save")
        self._saver.start()

    def _save_file(self) -> None:
        try:
            self.save_model_file(self._ckpt_save_path)  # NVFlare's atomic write (temp file, fsync, rename)
        except Exception:
            self.logger.exception(f"could not write {self._ckpt_save_path}; the previous round's file is intact")

    def wait_for_save(self) -> None:
        if self._saver is not None:
            self._saver.join()
            self._saver = None

    def load_model(self, fl_ctx: FLContext):
        learnable = super().load_model(fl_ctx)
        # The global model now lives in the persistence manager (and the controller); the module's own tensors would
        # be a stale 4.26 GB copy after round 1. Keep only its structure: export_hf puts the weights back.
        if self.model is not None:
            self.model = self.model.to("meta")
            self.model.model.tie_weights()  # .to() gives each module its own meta copy of a shared weight
        if learnable is not None and learnable.get(ModelLearnableKey.WEIGHTS):
            learnable[ModelLearnableKey.WEIGHTS] = transport.split(
                learnable[ModelLearnableKey.WEIGHTS], self.part_bytes
            )
        return learnable

    def handle_event(self, event: str, fl_ctx: FLContext) -> None:
        if event in (EventType.END_RUN, AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, AppEventType.BEFORE_AGGREGATION):
            self.wait_for_save()  # BEFORE_AGGREGATION: the average is about to overwrite the tensors being written
        super().handle_event(event, fl_ctx)
        if event == EventType.END_RUN and self.persistence_manager is not None:
            try:
                path = self.export_hf(Path(self.log_dir) / self.hf_dir_name)
                self.log_info(fl_ctx, f"global model exported as a Hugging Face directory: {path}")
            except Exception as e:  # the .pt checkpoint is already safe; report and let the run end
                self.log_exception(fl_ctx, f"Hugging Face export failed: {e}")

    def export_hf(self, output_dir: Path) -> Path:
        """Write the current global weights with the base model's config and processor to `output_dir`."""
        from transformers import AutoProcessor

        self.model.load_state_dict(self.persistence_manager.var_dict, assign=True)  # no copy: the global's tensors
        tmp = output_dir.with_name(output_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.model.save_pretrained(tmp)
        AutoProcessor.from_pretrained(self.model_name_or_path).save_pretrained(tmp)
        shutil.rmtree(output_dir, ignore_errors=True)
        os.replace(tmp, output_dir)
        return output_dir
