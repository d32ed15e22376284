"""Row parts of large tensors on the wire (transport.py), and the server's average of results sent in parts."""

import pytest
import torch
from test_fl_server import expected_average, offloaded, site_result

import transport
from fl_server import SampleWeightedFedAvg

PART = 100 * 4  # bytes: 100 fp32 elements, 10 rows of a 10-column matrix


def state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(35, 10, generator=g).to(dtype), "small": torch.randn(9, generator=g).to(dtype)}


def test_split_makes_row_views_and_join_gives_back_the_same_tensor():
    params = state(0)
    parts = transport.split(params, PART)
    assert list(parts) == ["big#rows=0:10", "big#rows=10:20", "big#rows=20:30", "big#rows=30:35", "small"]
    assert all(v._base is params["big"] for k, v in parts.items() if k.startswith("big"))  # views: no copy
    assert parts["small"] is params["small"]
    joined = transport.join(parts)
    assert joined.keys() == params.keys() and all(joined[k] is params[k] for k in params)
    assert transport.split(params, 0) == params


def test_parts_that_arrived_separately_load_piece_by_piece(tmp_path):
    params = state(1, torch.bfloat16)
    received = offloaded(transport.split(params, PART // 2), tmp_path / "received")  # as a site receives them
    joined = transport.join(received)
    assert isinstance(joined["big"], transport.Parts) and joined["big"].shape == (35, 10)
    assert torch.equal(joined["big"].materialize(), params["big"])
    target = torch.zeros(35, 10)  # fp32, like a site's master weights
    transport.copy_into(target, joined["big"])
    assert torch.equal(target, params["big"].float())


@pytest.mark.parametrize("keys", [["w#rows=0:10", "w#rows=20:35"], ["w#rows=0:10", "w#rows=5:35"], ["w#rows=9:3"]])
def test_parts_that_do_not_tile_the_rows_are_refused(keys):
    with pytest.raises(ValueError, match="w"):
        transport.layout({k: (int(k.split(":")[1]) - int(k.split("=")[1].split(":")[0]), 10) for k in keys})


def test_the_server_averages_parts_into_one_tensor_and_keeps_the_sites_keys(tmp_path):
    aggregator = SampleWeightedFedAvg()
    previous = None
    for round_num in range(2):
        sites = [(state(10 * round_num + i, torch.bfloat16), samples) for i, samples in enumerate((3.0, 1.0))]
        for i, (params, samples) in enumerate(sites):
            sent = transport.split(params, PART // 2)
            sent = offloaded(sent, tmp_path / f"r{round_num}-{i}") if i else sent  # one offloaded, one in memory
            aggregator.accept_model(site_result(sent, samples, f"site-{i}"))
        result = aggregator.aggregate_model()
        assert list(result.params) == list(transport.split(sites[0][0], PART // 2))
        joined = transport.join(result.params)
        assert all(isinstance(v, torch.Tensor) for v in joined.values())  # the parts are views of one tensor
        for key, value in expected_average(sites).items():
            torch.testing.assert_close(joined[key].float(), value.float(), rtol=2**-8, atol=1e-6)
        if previous is not None:
            assert joined["big"].data_ptr() == previous  # the second round wrote into the first one's tensor
        previous = joined["big"].data_ptr()


def test_results_split_differently_are_refused(tmp_path):
    aggregator = SampleWeightedFedAvg()
    aggregator.accept_model(site_result(transport.split(state(0), PART), 1.0, "site-1"))
    aggregator.accept_model(site_result(transport.split(state(1), PART * 2), 1.0, "site-2"))
    with pytest.raises(ValueError, match="do not tile"):
        aggregator.aggregate_model()


def test_job_py_sends_in_parts_of_the_documented_size_by_default():
    from job import define_parser

    assert define_parser().get_default("part_mb") * 2**20 == transport.PART_BYTES
