"""The server's aggregator on its own: fp32 sample-weighted average, from results in memory or offloaded to disk.

Offloaded results are built with NVFlare's own `LazyTensorDict` over safetensors files, as its tensor disk offload
hands them to the aggregator.
"""

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_opt.pt.lazy_tensor_dict import LazyTensorDict
from safetensors.torch import save_file

import fl_server
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
