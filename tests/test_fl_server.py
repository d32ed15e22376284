"""The server's aggregator on its own: the fp32 global model plus the sample-weighted average of the sites' updates,
from updates in memory or offloaded to disk; and the persistor (fp32 in, bf16 Hugging Face directory out).

The aggregator is driven as NVFlare's FedAvg drives it: the initial model goes into the context as GLOBAL_MODEL with
INITIAL_MODEL_LOADED fired, then each site's result is accepted and the average taken. Offloaded updates are built
with NVFlare's own `LazyTensorDict` over safetensors files, as its tensor disk offload hands them to the aggregator.
Expected values are computed by hand in float64.
"""

import contextlib
import copy
import json
import logging
import os
import threading
import time

import pytest
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.lazy_tensor_dict import LazyTensorDict
from safetensors.torch import save_file

import fl_server
import transport
from fl_server import SampleWeightedFedAvg


def site_update(
    params: dict,
    samples: float,
    site: str,
    error: str | None = None,
    params_type: ParamsType = ParamsType.DIFF,
    loss: float = 1.0,
) -> FLModel:
    """A site's result as the server receives it: its round's update (DIFF) and the metrics it is weighted by."""
    meta = {"client_name": site} | ({"ERROR": error} if error else {})
    metrics = {"samples": samples, "loss": loss}
    return FLModel(params_type=params_type, params=params, metrics=metrics, meta=meta, current_round=0)


def offloaded(params: dict[str, torch.Tensor], folder) -> dict:
    """`params` as NVFlare's disk offload delivers them: lazy references to tensors in safetensors files."""
    folder.mkdir()
    files = {}
    for i, (key, tensor) in enumerate(params.items()):
        path = str(folder / f"{i}.safetensors")
        save_file({key: tensor.contiguous()}, path)
        files[key] = (path, key)
    lazy = LazyTensorDict(files, str(folder))
    return {key: lazy.make_lazy_ref(key) for key in params}


def weights(seed: int) -> dict[str, torch.Tensor]:
    """A bf16 model of two tensors, as the base model's weights are."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g).to(torch.bfloat16) for name, shape in (("a", (64, 32)), ("b", (7,)))}


def update(seed: int, keys=("a", "b"), scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """A site's bf16 update of about `scale` per weight, for `keys` only (the others it froze)."""
    g = torch.Generator().manual_seed(1000 + seed)
    shapes = {"a": (64, 32), "b": (7,)}
    return {k: (torch.randn(shapes[k], generator=g) * scale).to(torch.bfloat16) for k in keys}


def started(initial: dict) -> SampleWeightedFedAvg:
    """An aggregator after FedAvg has loaded `initial` (the learnable's weights, row parts and all)."""
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(initial, {}), private=True, sticky=True)
    aggregator = SampleWeightedFedAvg()
    aggregator.handle_event(AppEventType.INITIAL_MODEL_LOADED, fl_ctx)
    return aggregator


def by_hand(initial: dict[str, torch.Tensor], updates: list[tuple[dict, float]]) -> dict[str, torch.Tensor]:
    """initial + sum_i(w_i * u_i) / sum_i(w_i) in float64; a tensor a site did not send is no change from it."""
    total = sum(w for _, w in updates)
    return {k: v.double() + sum(w * u[k].double() for u, w in updates if k in u) / total for k, v in initial.items()}


def assert_fp32_close(actual: dict, expected: dict) -> None:
    """Equal to the float64 expectation to fp32 precision: a bf16 rounding anywhere (2**-9 relative) fails."""
    assert actual.keys() == expected.keys()
    for key, value in actual.items():
        assert value.dtype == torch.float32, key
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-9)


def test_one_round_adds_the_sample_weighted_average_of_the_updates_to_the_fp32_global():
    initial = weights(0)
    aggregator = started(dict(initial))
    warnings = []
    aggregator.warning = warnings.append
    counted = [(update(0), 1.0, 0.5), (update(1, keys=("a",)), 2.0, 1.0), (update(2), 3.0, 2.0)]  # site-1 froze "b"
    for i, (params, samples, loss) in enumerate(counted):
        aggregator.accept_model(site_update(params, samples, f"site-{i}", loss=loss))
    aggregator.accept_model(site_update(update(3), 9.0, "site-3", error="rank 0: OutOfMemoryError"))
    aggregator.accept_model(site_update(weights(4), 5.0, "site-4", params_type=ParamsType.FULL))
    aggregator.accept_model(site_update(update(5), 0.0, "site-5"))
    result = aggregator.aggregate_model()

    assert result.params_type == ParamsType.FULL and list(result.params) == list(initial)
    assert_fp32_close(result.params, by_hand(initial, [(u, w) for u, w, _ in counted]))
    assert result.meta["nr_contributing_sites"] == 3
    assert result.metrics == {"samples": 6.0, "loss": (1 * 0.5 + 2 * 1.0 + 3 * 2.0) / 6}
    left_out = [w for w in warnings if "left out" in w]
    assert [w.split(":")[0] for w in left_out] == ["site-3", "site-4", "site-5"]
    assert "ParamsType.DIFF" in left_out[1]  # the FULL result is refused for what it is


def test_updates_below_half_a_bf16_step_add_up_in_the_fp32_global(tmp_path):
    """1.0's bf16 step is 2**-7: an update of 2**-10 is under half of it, so a bf16 global model rounds every round's
    away, while the fp32 one keeps them and moves its bf16 rounding after 8 rounds."""
    aggregator = started({"w": torch.ones(4, dtype=torch.bfloat16)})
    old = torch.ones(4, dtype=torch.bfloat16)  # the global model rounded to bf16 after each round, as before
    for round_num in range(8):
        sent = [{"w": torch.full((4,), 2**-10, dtype=torch.bfloat16)} for _ in range(2)]
        aggregator.accept_model(site_update(sent[0], 1.0, "site-0"))
        aggregator.accept_model(site_update(offloaded(sent[1], tmp_path / f"r{round_num}"), 3.0, "site-1"))
        new = aggregator.aggregate_model().params["w"]
        old = (old.float() + 2**-10).to(torch.bfloat16)
        assert torch.equal(new, torch.full((4,), 1 + (round_num + 1) * 2**-10))  # exact: sums of powers of two
    assert torch.equal(old, torch.ones(4, dtype=torch.bfloat16))  # the old way would not have moved at all
    assert torch.equal(new.to(torch.bfloat16), torch.full((4,), 1 + 2**-7, dtype=torch.bfloat16))  # one step up


def test_an_update_in_row_parts_lands_in_its_rows_and_the_result_keeps_the_learnables_keys(tmp_path):
    """The persistor hands over an fp32 model with "a" in row parts (views); sites send their updates split their
    own way, or only some rows. The result has the learnable's keys, views of the one fp32 global tensor, averaged in
    place round after round, and NVFlare's deep copy of the task data takes them as they are."""
    fp32 = {k: v.float() for k, v in weights(7).items()}
    initial = transport.split(fp32, 16 * 32 * 4)  # "a": 4 parts of 16 rows
    assert [k for k in initial if k.startswith("a#")] == [f"a#rows={r}:{r + 16}" for r in (0, 16, 32, 48)]
    aggregator = started(dict(initial))
    expected = {k: v.double() for k, v in fp32.items()}
    for round_num in range(2):
        whole, rows = update(10 + round_num), update(20 + round_num)
        some_rows = {"a#rows=20:40": rows["a"][20:40]}  # this site changed only these rows of "a", and not "b"
        aggregator.accept_model(site_update(transport.split(whole, 10 * 32 * 2), 1.0, "site-0"))  # 10 rows a part
        aggregator.accept_model(site_update(offloaded(some_rows, tmp_path / f"r{round_num}"), 3.0, "site-1"))
        result = aggregator.aggregate_model().params
        expected = {k: v + whole[k].double() / 4 for k, v in expected.items()}  # site-0: 1 of 4 samples
        expected["a"][20:40] += 3 * rows["a"][20:40].double() / 4  # site-1: 3 of 4, in its rows alone

        assert list(result) == list(initial)
        joined = transport.join(result)
        assert isinstance(joined["a"], torch.Tensor)  # the parts are views of one tensor, no copy
        assert all(joined[k].data_ptr() == fp32[k].data_ptr() for k in fp32)  # averaged into the initial model
        assert_fp32_close(joined, expected)
        assert all(copy.deepcopy(result)[k] is result[k] for k in result)


@pytest.mark.parametrize("slice_elements", [fl_server.SLICE, 100])  # 100: 64 x 32 takes 21 slices, the last short
@pytest.mark.parametrize("where", ["memory", "disk", "mixed"])
def test_updates_offloaded_to_disk_average_as_those_in_memory(where, slice_elements, tmp_path, monkeypatch):
    monkeypatch.setattr(fl_server, "SLICE", slice_elements)
    initial = weights(0)
    aggregator = started(dict(initial))
    sites = [(update(i, keys=("a", "b") if i != 1 else ("a",)), samples) for i, samples in enumerate((16.0, 8.0, 3.0))]
    for i, (params, samples) in enumerate(sites):
        on_disk = where == "disk" or (where == "mixed" and i % 2)
        sent = offloaded(params, tmp_path / f"site-{i}") if on_disk else dict(params)
        aggregator.accept_model(site_update(sent, samples, f"site-{i}"))
    result = aggregator.aggregate_model()
    assert_fp32_close(result.params, by_hand(initial, sites))
    assert result.metrics["samples"] == 27.0 and result.meta["nr_contributing_sites"] == 3


def test_averaged_updates_are_deleted_off_the_controller_thread(tmp_path, monkeypatch):
    deleted_in = []
    rmtree = fl_server.shutil.rmtree

    def recorded(path, *args, **kwargs):
        if str(path).endswith(".averaged"):  # the aggregator's own deletion, not NVFlare's of what it left
            deleted_in.append(threading.current_thread())
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(fl_server.shutil, "rmtree", recorded)
    initial = weights(0)
    aggregator = started(dict(initial))
    for i in range(2):
        aggregator.accept_model(site_update(offloaded(update(i), tmp_path / f"site-{i}"), 1.0, f"site-{i}"))
    result = aggregator.aggregate_model().params
    # Gone from where NVFlare put them as soon as the average returns, although references to them are still alive
    # (NVFlare's own deletion, when they go, finds nothing).
    assert not (tmp_path / "site-0").exists() and not (tmp_path / "site-1").exists()
    aggregator.wait_for_discard()
    assert list(tmp_path.iterdir()) == []
    assert len(deleted_in) == 2 and threading.current_thread() not in deleted_in
    assert_fp32_close(result, by_hand(initial, [(update(i), 1.0) for i in range(2)]))


class _OtherLazyRef:
    """A lazy reference that is not NVFlare's safetensors one: the aggregator falls back to `materialize()`."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def materialize(self) -> torch.Tensor:
        return self.tensor


def test_other_lazy_references_are_materialized():
    initial = weights(0)
    aggregator = started(dict(initial))
    sites = [(update(i), samples) for i, samples in enumerate((2.0, 5.0))]
    for i, (params, samples) in enumerate(sites):
        aggregator.accept_model(site_update({k: _OtherLazyRef(v) for k, v in params.items()}, samples, f"site-{i}"))
    assert_fp32_close(aggregator.aggregate_model().params, by_hand(initial, sites))


def test_an_unknown_key_a_wrong_shape_or_a_truncated_file_is_refused_and_leaves_the_global_untouched(tmp_path):
    initial = transport.split(weights(0), 16 * 32 * 2)
    aggregator = started(dict(initial))
    aggregator.accept_model(site_update(update(0), 1.0, "site-0"))
    global_model = aggregator.aggregate_model().params  # views of the fp32 global model
    kept = {k: v.clone() for k, v in global_model.items()}

    wrong = {
        "an unknown key": ({"c": torch.zeros(3, dtype=torch.bfloat16)}, "does not have"),
        "a wrong shape": (
            {"a": torch.zeros(32, 64, dtype=torch.bfloat16)},
            r"'a' in shapes \[\(32, 64\), \(64, 32\)\]",
        ),
        "rows past the end": (
            {"a#rows=60:70": torch.zeros(10, 32, dtype=torch.bfloat16)},
            r"'a#rows=60:70' in shapes \[\(10, 32\)\]; the global model's is \(4, 32\)",
        ),
    }
    for i, (what, (bad, message)) in enumerate(wrong.items()):
        for on_disk in (False, True):
            aggregator.accept_model(site_update(update(1, keys=("b",)), 1.0, "site-0"))  # good ones, in memory
            aggregator.accept_model(site_update(offloaded(update(2), tmp_path / f"good-{i}-{on_disk}"), 1.0, "site-1"))
            sent = offloaded(bad, tmp_path / f"bad-{i}-{on_disk}") if on_disk else bad
            aggregator.accept_model(site_update(sent, 1.0, "site-2"))
            with pytest.raises(ValueError, match=message):
                aggregator.aggregate_model()
            aggregator.reset_stats()
            assert all(torch.equal(v, kept[k]) for k, v in global_model.items()), what

    truncated = offloaded(update(3), tmp_path / "truncated")
    path = truncated["b"].file_path
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)
    aggregator.accept_model(site_update(update(1), 1.0, "site-0"))
    aggregator.accept_model(site_update(truncated, 1.0, "site-1"))
    with pytest.raises(ValueError, match=f"{path}.*unreadable"):
        aggregator.aggregate_model()
    aggregator.reset_stats()
    assert all(torch.equal(v, kept[k]) for k, v in global_model.items())


@pytest.mark.parametrize("shape", [(1,), (8,)], ids=["broadcasts", "does-not-fit"])
def test_in_memory_updates_of_one_tensor_in_different_shapes_are_refused(shape):
    initial = weights(0)
    before = {k: v.clone() for k, v in initial.items()}
    aggregator = started(dict(initial))
    aggregator.accept_model(site_update(update(1), 1.0, "site-0"))
    aggregator.accept_model(site_update({"b": torch.ones(shape, dtype=torch.bfloat16)}, 1.0, "site-1"))
    with pytest.raises(ValueError, match="'b' in shapes"):
        aggregator.aggregate_model()
    assert all(torch.equal(initial[k], before[k]) for k in before)


def test_no_contributing_site_gives_an_empty_diff_and_keeps_the_global_model():
    initial = weights(0)
    before = {k: v.clone() for k, v in initial.items()}
    aggregator = started(dict(initial))
    aggregator.warning = lambda message: None
    aggregator.accept_model(site_update({}, 0.0, "site-0", error="boom"))
    aggregator.accept_model(site_update(update(1), 4.0, "site-1", error="rank 1: NCCL timeout"))
    aggregator.accept_model(site_update(weights(2), 4.0, "site-2", params_type=ParamsType.FULL))
    result = aggregator.aggregate_model()
    assert result.params_type == ParamsType.DIFF and result.params == {}
    assert result.meta["nr_contributing_sites"] == 0
    assert all(torch.equal(initial[k], before[k]) for k in before)
    # the next round adds its average to the global model as it was
    aggregator.accept_model(site_update(update(3), 1.0, "site-0"))
    assert_fp32_close(aggregator.aggregate_model().params, by_hand(before, [(update(3), 1.0)]))


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


def test_the_persistor_loads_fp32_saves_the_exact_global_and_exports_its_bf16_rounding(tiny_model_dir, tmp_path):
    """A run on the tiny model: the persistor loads the base model's bf16 weights as fp32 (in row parts for the
    wire), the aggregator adds an update below half a bf16 step to them, `FL_global_model.pt` keeps the exact fp32
    global model, and the Hugging Face directory written at the run's end holds its bf16 rounding."""
    from safetensors import safe_open
    from transformers import Qwen3VLForConditionalGeneration

    from model import Qwen3VLModel

    base = Qwen3VLModel(str(tiny_model_dir)).state_dict()
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path / "app"), private=True, sticky=True)
    persistor = fl_server.QwenPersistor(str(tiny_model_dir), part_bytes=2**20)
    persistor.handle_event(EventType.START_RUN, fl_ctx)
    learnable = persistor.load_model(fl_ctx)

    sent = learnable[ModelLearnableKey.WEIGHTS]
    assert any("#rows=" in k for k in sent)  # the 39 MB fp32 embedding goes in row parts
    loaded = transport.join(sent)
    assert loaded.keys() == base.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, base[k].float()) for k, v in loaded.items())
    held = persistor.persistence_manager.var_dict
    assert all(held[k] is v for k, v in loaded.items())  # the persistor keeps the fp32 tensors, no other copy
    assert all(p.is_meta for p in persistor.model.parameters())

    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, learnable, private=True, sticky=True)
    aggregator = SampleWeightedFedAvg()
    aggregator.handle_event(AppEventType.INITIAL_MODEL_LOADED, fl_ctx)
    name = "model.language_model.norm.weight"
    assert torch.equal(base[name], torch.ones_like(base[name]))  # an RMSNorm's weight starts at 1.0
    step = {name: torch.full_like(base[name], 2**-10)}  # under half of 1.0's bf16 step (2**-7)
    for _ in range(8):
        aggregator.accept_model(site_update(step, 1.0, "site-0"))
        result = aggregator.aggregate_model()
        persistor.save_model(make_model_learnable(result.params, {}), fl_ctx)
    persistor.wait_for_save()
    expected = {k: v.float() for k, v in base.items()}
    expected[name] += 8 * 2**-10
    saved = torch.load(tmp_path / "app" / "FL_global_model.pt", weights_only=True)["model"]
    assert saved.keys() == expected.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, expected[k]) for k, v in saved.items())

    persistor.handle_event(EventType.END_RUN, fl_ctx)
    hf_dir = tmp_path / "app" / fl_server.HF_DIR_NAME
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    assert expected.keys() <= written.keys()
    for key, value in expected.items():
        assert written[key].dtype == torch.bfloat16 and torch.equal(written[key], value.to(torch.bfloat16)), key
    assert not torch.equal(written[name], base[name])  # the sub-step updates added up to a bf16 step or more
    model = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.bfloat16)
    assert torch.equal(model.state_dict()[name], expected[name].to(torch.bfloat16))


# ------------------------------------------------------------------------------------------ server optimizers


def optimizer_by_hand(name: str, lr: float, initial: dict, rounds: list[list[tuple[dict, float]]]) -> dict:
    """Reddi et al.'s server step over each round's sample-weighted average update, in float64: momentum 0.9,
    betas (0.9, 0.99), eps 1e-3, no bias correction, moments from zero; a tensor with moments that no site updated
    in a round steps with a zero update."""
    w = {k: v.double() for k, v in initial.items()}
    m, v = {}, {}
    for updates in rounds:
        total = sum(weight for _, weight in updates)
        sent = {k for u, _ in updates for k in u}
        delta = {k: sum(wt * u[k].double() for u, wt in updates if k in u) / total for k in sent}
        for k in sent | set(m):
            d = delta.get(k, torch.zeros_like(w[k]))
            if name == "fedavg":
                w[k] += lr * d
                continue
            if name == "fedavgm":
                m[k] = 0.9 * m.get(k, 0) + d
                w[k] += lr * m[k]
                continue
            m[k] = 0.9 * m.get(k, 0) + 0.1 * d
            old = v.get(k, torch.zeros_like(d))
            v[k] = 0.99 * old + 0.01 * d**2 if name == "fedadam" else old - 0.01 * d**2 * torch.sign(old - d**2)
            w[k] += lr * m[k] / (v[k].sqrt() + 1e-3)
    return w


@pytest.mark.parametrize("name,lr", [("fedavg", 0.5), ("fedavgm", 1.0), ("fedadam", 0.01), ("fedyogi", 0.01)])
def test_server_optimizers_match_the_papers_update_by_hand_over_two_rounds(name, lr, tmp_path, monkeypatch):
    """Round 0: both tensors, one site's update on disk in row parts of another split; round 1: only "a" is sent,
    so "b" moves by its momentum alone. Slices of 100 elements: a row part starts inside a slice."""
    monkeypatch.setattr(fl_server, "SLICE", 100)
    initial = weights(0)
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(transport.split(dict(initial), 3000), {}))
    aggregator = SampleWeightedFedAvg(server_optimizer=name, server_lr=lr)
    aggregator.handle_event(AppEventType.INITIAL_MODEL_LOADED, fl_ctx)
    rounds = [[(update(0), 3.0), (update(1), 1.0)], [(update(2, keys=("a",)), 2.0), (update(3, keys=("a",)), 5.0)]]
    for r, updates in enumerate(rounds):
        for i, (params, samples) in enumerate(updates):
            sent = transport.split(params, 7 * 32 * 2) if i else params  # 7 rows a part: offsets inside slices
            sent = offloaded(sent, tmp_path / f"{r}-{i}") if i else sent
            aggregator.accept_model(site_update(sent, samples, f"site-{i}"))
        result = aggregator.aggregate_model().params
    assert_fp32_close(transport.join(result), optimizer_by_hand(name, lr, initial, rounds))
    moments = {"fedavg": set(), "fedavgm": {"m"}}.get(name, {"m", "v"})
    assert all(set(aggregator.optimizer.state[k]) == moments for k in ("a", "b"))
    assert not torch.equal(result["b"], initial["b"].float())


def test_fedavg_with_server_lr_1_takes_the_plain_in_place_path(monkeypatch):
    """fedavg at server_lr 1 is today's arithmetic, bit for bit: the optimizer is never stepped."""
    monkeypatch.setattr(fl_server.ServerOptimizer, "step", lambda *a: pytest.fail("stepped"))
    initial = weights(0)
    aggregator = started(dict(initial))
    assert aggregator.optimizer.plain
    aggregator.accept_model(site_update(update(0), 2.0, "site-0"))
    assert_fp32_close(aggregator.aggregate_model().params, by_hand(initial, [(update(0), 2.0)]))
    assert aggregator.optimizer.state == {}


@pytest.mark.parametrize("bad", [{"server_optimizer": "sgd"}, {"server_lr": -1.0}, {"server_eps": 0.0}])
def test_bad_server_optimizer_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SampleWeightedFedAvg(**bad)


def pt_persistor(source, app_root, job_id: str) -> tuple[fl_server.QwenPersistor, FLContext]:
    """The persistor on a small .pt model (no Hugging Face model behind it), writing into `app_root`."""
    from nvflare.apis.fl_constant import ReservedKey

    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app_root), private=True, sticky=True)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=True)
    persistor = fl_server.QwenPersistor("unused-model-path", source_ckpt_file_full_name=str(source), part_bytes=3000)
    persistor.model = None
    persistor.log_dir = str(app_root)
    persistor._ckpt_save_path = str(app_root / "FL_global_model.pt")
    app_root.mkdir(exist_ok=True)
    return persistor, fl_ctx


def run_rounds(source, app_root, rounds, job_id: str, val_losses=None, after_round=None, **optimizer) -> dict:
    """A run as FedAvg drives it: the aggregator starts, the persistor loads `source`, and each round the sites'
    updates are accepted, averaged and the result saved (then `after_round(round)` is called, the save finished).
    Returns the final global model as saved."""
    persistor, fl_ctx = pt_persistor(source, app_root, job_id)
    aggregator = SampleWeightedFedAvg(**optimizer)
    aggregator.handle_event(EventType.START_RUN, fl_ctx)
    learnable = persistor.load_model(fl_ctx)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, learnable, private=True, sticky=True)
    aggregator.handle_event(AppEventType.INITIAL_MODEL_LOADED, fl_ctx)
    for r, updates in rounds:
        persistor.handle_event(AppEventType.BEFORE_AGGREGATION, fl_ctx)
        for i, (params, samples) in enumerate(updates):
            model = site_update(params, samples, f"site-{i}")
            model.current_round = r
            if val_losses and val_losses[r][i] is not None:
                model.metrics |= {"val_loss": val_losses[r][i], "val_samples": 10.0 * (i + 1)}
            aggregator.accept_model(model)
        result = aggregator.aggregate_model()
        persistor.save_model(make_model_learnable(result.params, result.meta | {"current_round": r}), fl_ctx)
        if after_round:
            persistor.wait_for_save()
            after_round(r)
    persistor.wait_for_save()
    return torch.load(app_root / "FL_global_model.pt", weights_only=True)["model"]


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_a_run_resumed_after_round_2_of_4_ends_where_the_uninterrupted_one_does(name, tmp_path):
    source = tmp_path / "initial.pt"
    torch.save({"model": {k: v.float() for k, v in weights(0).items()}}, source)
    rounds = [(r, [(update(2 * r), 1.0), (update(2 * r + 1, keys=("a",)), 3.0)]) for r in range(4)]
    settings = {"server_optimizer": name, "server_lr": 0.01}
    whole = run_rounds(source, tmp_path / "whole", rounds, "whole", **settings)

    run_rounds(source, tmp_path / "first", rounds[:2], "first", **settings)
    state = tmp_path / "first" / fl_server.OPTIMIZER_FILE
    saved = torch.load(state, weights_only=True)
    assert set(saved["state"]) == {"a", "b"}  # only the trained tensors have state
    resumed = run_rounds(
        tmp_path / "first" / "FL_global_model.pt", tmp_path / "second", rounds[2:], "second", **settings
    )
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)

    state.unlink()  # without its state the resumed run starts its moments at zero, and ends elsewhere
    fresh = run_rounds(tmp_path / "first" / "FL_global_model.pt", tmp_path / "third", rounds[2:], "third", **settings)
    assert not torch.equal(fresh["a"], whole["a"])


@pytest.mark.parametrize(
    "val_losses,best",
    [
        ([(1.0, 2.0), (1.0, 0.5), (2.0, None), (9.0, 9.0)], 1),  # weighted means 5/3, 2/3, 2 (site-0 alone), 9
        ([(1.0, 1.0), (2.0, 2.0), (None, None)], 0),  # the initial model scored best
        ([(None, None), (None, None)], None),  # no site reports val_loss: no best model
    ],
)
def test_the_best_model_is_the_global_model_the_sites_scored_best(val_losses, best, tmp_path):
    """Round r's val_loss scores the global model the sites received in round r (the initial one in round 0):
    FL_best_model.pt is that model, and site_metrics.json has each round's weighted mean (val_samples: site-0 10,
    site-1 20; a site without val_loss is skipped), the best one marked."""
    source = tmp_path / "initial.pt"
    torch.save({"model": {k: v.float() for k, v in weights(0).items()}}, source)
    rounds = [(r, [(update(2 * r), 1.0), (update(2 * r + 1), 3.0)]) for r in range(len(val_losses))]
    app = tmp_path / "app"
    models = [{k: v.float() for k, v in weights(0).items()}]  # the global model each round's sites received
    for r in range(len(rounds)):
        models.append(run_rounds(source, tmp_path / f"upto{r}", rounds[: r + 1], f"upto{r}"))
    run_rounds(source, app, rounds, "best", val_losses=val_losses)

    records = json.loads((app / fl_server.SITE_METRICS_FILE).read_text())
    means = [r for r in records if r["site"] == fl_server.MEAN]
    scored = [(r, losses) for r, losses in enumerate(val_losses) if any(x is not None for x in losses)]
    assert [m["round"] for m in means] == [r for r, _ in scored]
    for mean, (_, losses) in zip(means, scored, strict=True):
        pairs = [(x, 10.0 * (i + 1)) for i, x in enumerate(losses) if x is not None]
        assert mean["val_loss"] == pytest.approx(sum(x * n for x, n in pairs) / sum(n for _, n in pairs))
        assert mean["val_samples"] == sum(n for _, n in pairs)
    assert [m["round"] for m in means if m.get("best")] == ([] if best is None else [best])
    if best is None:
        assert not (app / fl_server.BEST_MODEL_FILE).exists()
        return
    kept = torch.load(app / fl_server.BEST_MODEL_FILE, weights_only=True)["model"]
    assert all(torch.equal(kept[k], models[best][k]) for k in kept)


def fill(disk) -> None:
    """Write to `disk` until it is full (ENOSPC)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, bytes(chunk)):
                    pass
    finally:
        os.close(fd)


def test_a_full_disk_keeps_the_last_files_whole_leaves_no_temporary_files_and_says_where(
    small_disk, tmp_path, caplog, capsys
):
    """The disk fills after round 0: round 1's FL_global_model.pt, FL_server_optimizer.pt and site_metrics.json
    cannot be written. The round still ends (no exception reaches NVFlare), the files hold round 0 whole, no `.tmp`
    file is left, and the log names the file and the error; job.py's summary sees the model behind the run's last
    round and exits 1."""
    import job

    source = tmp_path / "initial.pt"
    torch.save({"model": {k: v.float() for k, v in weights(0).items()}}, source)
    rounds = [(r, [(update(2 * r), 1.0), (update(2 * r + 1), 3.0)]) for r in range(2)]
    settings = {"server_optimizer": "fedavgm", "server_lr": 0.5}
    after_round_0 = run_rounds(source, tmp_path / "ok", rounds[:1], "ok", **settings)
    app = small_disk / "app"
    with caplog.at_level(logging.ERROR):
        final = run_rounds(source, app, rounds, "full", after_round=lambda r: r == 0 and fill(small_disk), **settings)
    assert all(torch.equal(final[k], after_round_0[k]) for k in after_round_0)
    assert torch.load(app / "FL_global_model.pt", weights_only=True)["meta_props"]["current_round"] == 0
    state = torch.load(app / fl_server.OPTIMIZER_FILE, weights_only=True)
    assert state["optimizer"] == "fedavgm"
    assert {r["round"] for r in json.loads((app / fl_server.SITE_METRICS_FILE).read_text())} == {0}
    assert [f.name for f in app.iterdir() if f.name.endswith(".tmp")] == []
    for name in ("FL_global_model.pt", fl_server.SITE_METRICS_FILE):
        assert any(f"could not write {app / name} (" in m and "No space left on device" in m for m in caplog.messages)
    capsys.readouterr()
    assert job.report(app, ["site-0", "site-1"], num_rounds=2) == 1
    err = capsys.readouterr().err
    assert "the loss plot was not written" in err
    saved = app / "FL_global_model.pt"
    assert (
        f"error: a save failed (the server log says why: search 'could not write'). {saved} holds the model after "
        f"round 0: continue with --resume_from {saved}"
    ) in err


def test_tensors_no_site_updated_are_left_out_for_the_sites_that_keep_what_they_receive(monkeypatch):
    """The run's first round sends every tensor to every site. Later rounds leave out, for the sites whose last result
    said they keep what they receive, the tensors no site has sent an update of; the others get the whole model."""
    from nvflare.app_common.workflows.fedavg import FedAvg

    monkeypatch.setattr(FedAvg, "_aggregate_one_result", lambda self, result: True)
    controller = fl_server.FaultTolerantFedAvg(num_clients=3, num_rounds=3)
    sites = ["site-1", "site-2", "site-3"]
    tensors = {"lm.w#rows=0:2": torch.ones(2), "lm.w#rows=2:4": torch.ones(2), "visual.w": torch.ones(3),
               "visual.b": torch.ones(1), "merger.w": torch.ones(2)}  # fmt: skip
    global_model = FLModel(params_type=ParamsType.FULL, params=tensors, current_round=0, meta={"kept": 1})

    def answer(site: str, names: list[str], keeps: bool = True, error: str | None = None) -> None:
        meta = {"client_name": site, transport.KEEPS: keeps, **({"ERROR": error} if error else {})}
        controller._aggregate_one_result(FLModel(params={k: torch.zeros(1) for k in names}, meta=meta))

    def tasks() -> dict[str, tuple[set[str], list[str] | None]]:
        return {site: (set(data.params), data.meta.get(transport.NOT_SENT)) for sites_, data in
                controller._tasks(global_model, sites) for site in sites_}  # fmt: skip

    assert tasks() == {site: (set(tensors), None) for site in sites}  # the first round: everything to everyone
    answer("site-1", ["lm.w#rows=0:2", "lm.w#rows=2:4"])
    answer("site-2", ["lm.w#rows=0:2", "lm.w#rows=2:4", "merger.w"])
    answer("site-3", [transport.NO_UPDATE], keeps=False, error="OutOfMemoryError")
    slim = ({"lm.w#rows=0:2", "lm.w#rows=2:4", "merger.w"}, ["visual.b", "visual.w"])
    assert tasks() == {"site-1": slim, "site-2": slim, "site-3": (set(tensors), None)}
    slim_task = next(data for sites_, data in controller._tasks(global_model, sites) if "site-1" in sites_)
    assert slim_task.meta["kept"] == 1 and slim_task.current_round == 0 and "kept" in global_model.meta
    assert global_model.meta.keys() == {"kept"} and len(global_model.params) == len(tensors)  # the held model whole

    answer("site-3", ["visual.w"])  # a site that trains the vision tower: it travels from now on
    answer("site-1", ["lm.w#rows=0:2"], keeps=False)  # e.g. the official code's trainer
    assert tasks() == {"site-1": (set(tensors), None), "site-2": (set(tensors) - {"visual.b"}, ["visual.b"]),
                       "site-3": (set(tensors) - {"visual.b"}, ["visual.b"])}  # fmt: skip
