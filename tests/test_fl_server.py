"""The server's aggregator on its own: fp32 sample-weighted average, from results in memory or offloaded to disk.

Offloaded results are built with NVFlare's own `LazyTensorDict` over safetensors files, as its tensor disk offload
hands them to the aggregator.
"""

import copy
import threading
import time

import pytest
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.lazy_tensor_dict import LazyTensorDict
from safetensors.torch import save_file

import fl_server
import transport
from fl_server import SampleWeightedFedAvg


def site_result(params: dict, samples: float, site: str, error: str | None = None) -> FLModel:
    meta = {"client_name": site} | ({"ERROR": error} if error else {})
    return FLModel(params=params, metrics={"samples": samples, "loss": 1.0}, meta=meta, current_round=0)


def offloaded(params: dict[str, torch.Tensor], folder) -> dict:
    """`params` as NVFlare's disk offload delivers them: lazy references to tensors in safetensors files."""
    folder.mkdir()
    files = {}
    for i, (key, tensor) in enumerate(params.items()):
        path = str(folder / f"{i}.safetensors")
        save_file({key: tensor}, path)
        files[key] = (path, key)
    lazy = LazyTensorDict(files, str(folder))
    return {key: lazy.make_lazy_ref(key) for key in params}


def random_params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g).to(torch.bfloat16) for name, shape in (("a", (64, 32)), ("b", (7,)))}


def expected_average(results: list[tuple[dict, float]]) -> dict[str, torch.Tensor]:
    total = sum(w for _, w in results)
    return {k: (sum(w * p[k].double() for p, w in results) / total).to(torch.bfloat16) for k in results[0][0]}


@pytest.mark.parametrize("slice_elements", [fl_server.SLICE, 100])  # 100: 64 x 32 takes 21 slices, the last short
@pytest.mark.parametrize("where", ["memory", "disk", "mixed"])
def test_sample_weighted_fp32_average(where, slice_elements, tmp_path, monkeypatch):
    monkeypatch.setattr(fl_server, "SLICE", slice_elements)
    sites = [(random_params(i), samples) for i, samples in enumerate((16.0, 8.0, 3.0))]
    aggregator = SampleWeightedFedAvg()
    for i, (params, samples) in enumerate(sites):
        on_disk = where == "disk" or (where == "mixed" and i % 2)
        sent = offloaded(params, tmp_path / f"site-{i}") if on_disk else dict(params)
        aggregator.accept_model(site_result(sent, samples, f"site-{i}"))
    result = aggregator.aggregate_model()

    expected = expected_average(sites)
    assert result.params.keys() == expected.keys()
    for key, value in result.params.items():
        assert value.dtype == torch.bfloat16
        # One rounding of the fp32 average to bf16: at most one bf16 step from the exact average.
        torch.testing.assert_close(value.float(), expected[key].float(), rtol=2**-8, atol=1e-6)
    assert result.metrics["samples"] == 27.0
    assert result.meta["nr_contributing_sites"] == 3


def test_averaged_results_are_deleted_off_the_controller_thread(tmp_path, monkeypatch):
    deleted_in = []
    rmtree = fl_server.shutil.rmtree
    monkeypatch.setattr(
        fl_server.shutil, "rmtree", lambda path: deleted_in.append(threading.current_thread()) or rmtree(path)
    )
    aggregator = SampleWeightedFedAvg()
    results = [offloaded(random_params(i), tmp_path / f"site-{i}") for i in range(2)]
    for i, params in enumerate(results):
        aggregator.accept_model(site_result(params, 1.0, f"site-{i}"))
    average = aggregator.aggregate_model().params
    # Gone from where NVFlare put them as soon as the average returns, although references to them are still alive
    # (NVFlare's own deletion, when they go, finds nothing).
    assert not (tmp_path / "site-0").exists() and not (tmp_path / "site-1").exists()
    aggregator.wait_for_discard()
    assert list(tmp_path.iterdir()) == []
    assert len(deleted_in) == 2 and threading.current_thread() not in deleted_in
    expected = expected_average([(random_params(i), 1.0) for i in range(2)])
    for key, value in average.items():
        torch.testing.assert_close(value.float(), expected[key].float(), rtol=2**-8, atol=1e-6)


def test_failed_and_weightless_sites_are_left_out(tmp_path):
    good = random_params(0)
    aggregator = SampleWeightedFedAvg()
    aggregator.accept_model(site_result(offloaded(good, tmp_path / "good"), 5.0, "site-1"))
    aggregator.accept_model(site_result(random_params(1), 0.0, "site-2"))
    aggregator.accept_model(site_result(random_params(2), 9.0, "site-3", error="rank 0: OutOfMemoryError"))
    result = aggregator.aggregate_model()
    for key, value in result.params.items():
        assert torch.equal(value, good[key])
    assert result.meta["nr_contributing_sites"] == 1


def test_no_contributing_site_keeps_the_global_model():
    aggregator = SampleWeightedFedAvg()
    aggregator.accept_model(site_result({}, 0.0, "site-1", error="boom"))
    result = aggregator.aggregate_model()
    assert result.params == {} and result.meta["nr_contributing_sites"] == 0


def test_later_rounds_write_the_average_into_the_previous_global_model(tmp_path):
    aggregator = SampleWeightedFedAvg()
    outputs = []
    for round_num in range(3):
        sites = [(random_params(10 * round_num + i), samples) for i, samples in enumerate((4.0, 1.0))]
        for i, (params, samples) in enumerate(sites):
            sent = offloaded(params, tmp_path / f"r{round_num}-site-{i}") if i else dict(params)  # one on disk
            aggregator.accept_model(site_result(sent, samples, f"site-{i}"))
        result = aggregator.aggregate_model()
        for key, value in expected_average(sites).items():
            torch.testing.assert_close(result.params[key].float(), value.float(), rtol=2**-8, atol=1e-6)
        outputs.append({k: v.data_ptr() for k, v in result.params.items()})
    assert outputs[1] == outputs[2]  # the same storage from the second round on: one global model on the server


def test_a_mismatched_or_truncated_result_leaves_the_global_model_intact(tmp_path):
    aggregator = SampleWeightedFedAvg()
    aggregator.accept_model(site_result(offloaded(random_params(0), tmp_path / "r0"), 1.0, "site-1"))
    global_model = aggregator.aggregate_model().params
    kept = {k: v.clone() for k, v in global_model.items()}

    wrong_shape = random_params(1) | {"a": torch.zeros(32, 64, dtype=torch.bfloat16)}
    aggregator.accept_model(site_result(offloaded(random_params(2), tmp_path / "r1-good"), 1.0, "site-1"))
    aggregator.accept_model(site_result(offloaded(wrong_shape, tmp_path / "r1-bad"), 1.0, "site-2"))
    with pytest.raises(ValueError, match="different shapes"):
        aggregator.aggregate_model()
    aggregator.reset_stats()

    truncated = offloaded(random_params(3), tmp_path / "r2")
    path = truncated["b"].file_path
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)
    aggregator.accept_model(site_result(truncated, 1.0, "site-1"))
    with pytest.raises(ValueError, match=f"{path}.*unreadable"):
        aggregator.aggregate_model()
    for key, value in global_model.items():
        assert torch.equal(value, kept[key])


class _OtherLazyRef:
    """A lazy reference that is not NVFlare's safetensors one: the aggregator falls back to `materialize()`."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def materialize(self) -> torch.Tensor:
        return self.tensor


def test_other_lazy_references_are_materialized():
    sites = [(random_params(i), samples) for i, samples in enumerate((2.0, 5.0))]
    aggregator = SampleWeightedFedAvg()
    for i, (params, samples) in enumerate(sites):
        aggregator.accept_model(site_result({k: _OtherLazyRef(v) for k, v in params.items()}, samples, f"site-{i}"))
    result = aggregator.aggregate_model()
    for key, value in expected_average(sites).items():
        torch.testing.assert_close(result.params[key].float(), value.float(), rtol=2**-8, atol=1e-6)


def test_the_persistor_finishes_its_file_before_the_average_overwrites_the_global_model():
    persistor = fl_server.QwenPersistor("unused-model-path")
    saving = threading.Event()

    def slow_save():
        saving.set()
        time.sleep(0.5)

    persistor._saver = threading.Thread(target=slow_save)
    persistor._saver.start()
    saving.wait()
    persistor.handle_event(AppEventType.BEFORE_AGGREGATION, FLContext())
    assert persistor._saver is None


def test_the_first_average_is_written_into_the_initial_global_model(tmp_path):
    """FedAvg puts the initial model in the context as GLOBAL_MODEL and fires INITIAL_MODEL_LOADED."""
    initial = transport.split(random_params(7), 64 * 2)  # "a" (64 x 32 bf16) in row parts, as the persistor sends it
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(initial, {}), private=True, sticky=True)
    aggregator = SampleWeightedFedAvg(delta_weights=False)  # with deltas the sites hold it: it stays as it is
    aggregator.handle_event(AppEventType.INITIAL_MODEL_LOADED, fl_ctx)
    sites = [(random_params(i), samples) for i, samples in enumerate((2.0, 1.0))]
    for i, (params, samples) in enumerate(sites):
        sent = transport.split(params, 64 * 2)
        aggregator.accept_model(site_result(offloaded(sent, tmp_path / f"site-{i}"), samples, f"site-{i}"))
    result = transport.join(aggregator.aggregate_model().params)
    assert result["a"].data_ptr() == initial["a#rows=0:2"].data_ptr() and result["b"] is initial["b"]
    for key, value in expected_average(sites).items():
        torch.testing.assert_close(result[key].float(), value.float(), rtol=2**-8, atol=1e-6)


class Sites:
    """The server engine's one call the aggregator makes to learn the job's sites."""

    def __init__(self, *names: str):
        self.clients = [type("Client", (), {"name": n})() for n in names]

    def get_clients(self):
        return self.clients


def test_the_next_global_model_goes_as_a_delta_only_when_every_site_keeps_the_last_one(tmp_path):
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import ReservedKey

    initial = random_params(7)
    before = {k: v.clone() for k, v in initial.items()}
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, Sites("site-0", "site-1"), private=True, sticky=False)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(initial, {}), private=True, sticky=True)
    aggregator = SampleWeightedFedAvg()
    aggregator.handle_event(EventType.START_RUN, fl_ctx)
    aggregator.handle_event(AppEventType.INITIAL_MODEL_LOADED, fl_ctx)
    assert transport.SEND_REFERENCE is None  # round 0 goes whole: no site holds anything yet
    assert transport.RECEIVE_REFERENCE.tensors["a"] is initial["a"]  # results are rebuilt from the model sent

    def round_of(seed: int, keeps: dict[str, bool], aggregator=aggregator) -> dict:
        for i, (site, kept) in enumerate(keeps.items()):
            result = site_result(random_params(seed + i), 1.0, site)
            result.meta[transport.KEEPS_GLOBAL_MODEL] = kept
            aggregator.accept_model(result)
        return aggregator.aggregate_model().params

    spare = aggregator._spare_maker  # buffers for the first average, made while the sites train
    new = round_of(1, {"site-0": True, "site-1": True})
    assert spare is not None and aggregator._spare_maker is None
    assert new["a"].data_ptr() != initial["a"].data_ptr()  # the initial model stays: the sites hold it
    assert transport.SEND_REFERENCE.tensors["a"] is initial["a"]  # as it was, no copy
    assert all(transport.SEND_REFERENCE.tensors[k].equal(before[k]) for k in before)
    assert transport.RECEIVE_REFERENCE.tensors["a"].data_ptr() == new["a"].data_ptr()
    # NVFlare deep-copies a broadcast task's data: a model sent as a delta copies as itself (aliases of the tensors)
    assert all(copy.deepcopy(new)[k] is new[k] for k in new)
    sent = {k: v.clone() for k, v in new.items()}
    newer = round_of(11, {"site-0": True, "site-1": True})
    assert newer["a"].data_ptr() == initial["a"].data_ptr()  # two global models take turns: no copy, no new memory
    assert all(new[k].equal(sent[k]) for k in sent)  # the one sent last round is left as it was
    assert transport.SEND_REFERENCE.tensors["a"].data_ptr() == new["a"].data_ptr()
    whole = round_of(3, {"site-0": True, "site-1": False})  # one site does not keep it: the next one goes whole
    assert transport.SEND_REFERENCE is None
    assert all(copy.deepcopy(whole)[k] is not whole[k] for k in whole)  # and NVFlare's copy of it is a copy
    held = round_of(5, {"site-0": True})  # a site NVFlare dropped (no result) may not hold it either
    assert transport.SEND_REFERENCE is None
    held = {k: v.clone() for k, v in held.items()}
    round_of(7, {"site-0": True, "site-1": True})  # no spare tensors now: the average goes into new ones
    assert transport.SEND_REFERENCE is not None and all(
        transport.SEND_REFERENCE.tensors[k].equal(held[k]) for k in held
    )
    # A model sent without NVFlare's copy is never overwritten, not even by a round that goes whole
    sent_as_is = round_of(13, {"site-0": True, "site-1": True})
    kept = {k: v.clone() for k, v in sent_as_is.items()}
    aggregator._previous = {}  # say the model before it fits no tensor
    after = round_of(15, {"site-0": True, "site-1": False})
    assert after["a"].data_ptr() != sent_as_is["a"].data_ptr() and all(sent_as_is[k].equal(kept[k]) for k in kept)
    whole = SampleWeightedFedAvg(delta_weights=False)  # job.py's --no-delta_weights
    whole.handle_event(EventType.START_RUN, fl_ctx)
    round_of(9, {"site-0": True, "site-1": True}, whole)
    assert transport.SEND_REFERENCE is None


def test_owning_a_tensors_pages_leaves_its_bytes_and_version_as_they_were(tmp_path):
    """The initial model's tensors are mapped from the checkpoint copy-on-write; writing each page ahead of round 1's
    average into them must change no byte, and not the version that keys the items being sent meanwhile."""
    from safetensors.torch import load_file, save_file
    from transformers.modeling_utils import load_state_dict

    save_file({"w": torch.randn(4096, 64).bfloat16()}, tmp_path / "model.safetensors")
    mapped = load_state_dict(str(tmp_path / "model.safetensors"))["w"]
    before, version = mapped.clone(), mapped._version
    fl_server._own_pages(mapped)
    assert mapped.equal(before) and mapped._version == version
    assert load_file(tmp_path / "model.safetensors")["w"].equal(before)  # the file is untouched
