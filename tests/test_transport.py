"""Row parts of large tensors on the wire (transport.py), and the server's average of results sent in parts."""

import concurrent.futures
import threading
import time

import pytest
import torch
from test_fl_server import expected_average, offloaded, site_result

import transport
from fl_server import SampleWeightedFedAvg


def load(data) -> dict[str, torch.Tensor]:
    """An item's tensors, from the bytes (or buffer) it is sent as."""
    from safetensors.torch import load as load_bytes

    return load_bytes(bytes(data))


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


def test_serialized_once_shares_bytes_until_the_tensor_changes_and_drops_the_oldest_over_budget():
    shared = transport.SerializedOnce(budget=2 * 4096 + 400)  # two entries and their headers
    a, b, c = (torch.full((1024,), float(i)) for i in range(3))  # 4 KiB each
    first = shared.get({"T0": a})
    assert load(first)["T0"].equal(a)
    assert shared.get({"T0": a}) is first  # a second site's download: the same bytes, no new serialization
    a.add_(1)  # the average writes into the global model's tensors: a new version, serialized anew
    changed = shared.get({"T0": a})
    assert changed is not first and load(changed)["T0"].equal(a)
    shared.get({"T1": b}), shared.get({"T2": c})  # over the budget: the oldest finished entries go first
    assert len(shared.entries) == 2 and shared.held <= shared.budget
    assert shared.get({"T2": c}) is shared.get({"T2": c})
    assert shared.clear() == (4, 7)  # 4 serializations served 7 times
    assert not shared.entries and shared.held == 0 and shared.clear() == (0, 0)


def test_serialized_once_serializes_a_tensor_wanted_by_two_sites_at_once_only_once(monkeypatch):
    import threading

    started, release, calls = threading.Event(), threading.Event(), []

    def slow_save(tensors):
        calls.append(list(tensors))
        started.set()
        release.wait(10)
        return b"bytes of " + ",".join(tensors).encode()

    monkeypatch.setattr(transport, "serialize", slow_save)
    shared, results = transport.SerializedOnce(budget=1 << 20), []
    tensor = torch.zeros(4)
    first = threading.Thread(target=lambda: results.append(shared.get({"T0": tensor})))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: results.append(shared.get({"T0": tensor})))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # waiting for the first site's serialization, not making its own
    release.set()
    first.join(10), second.join(10)
    assert results == [b"bytes of T0", b"bytes of T0"] and calls == [["T0"]]


def test_serialize_writes_what_safetensors_reads_back_for_every_dtype_and_shape(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    item = {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f32": torch.randn(7, generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(5, dtype=torch.int64),
        "row_view": torch.randn(6, 4, generator=g)[2:4],  # a contiguous view at an offset, as row parts are
    }
    data = bytes(transport.serialize(item))
    loaded = load(data)
    assert sorted(loaded) == sorted(item)
    assert all(loaded[k].equal(v) and loaded[k].dtype == v.dtype for k, v in item.items())
    (tmp_path / "item.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "item.safetensors"), framework="pt") as f:  # how offloaded items are read
        assert f.get_tensor("row_view").equal(item["row_view"])
    one = {"T0": item["bf16"]}
    assert bytes(transport.serialize(one)) == save(one)  # a single tensor: byte for byte what NVFlare would send
    odd = {"u16": torch.zeros(3, dtype=torch.uint16), "t": torch.zeros(4, 4).t()}  # left to safetensors itself
    with pytest.raises(ValueError):
        transport.serialize(odd)  # safetensors refuses the non-contiguous one, as NVFlare's own send does
    assert load(bytes(transport.serialize({"u16": odd["u16"]})))["u16"].equal(odd["u16"])


def test_pack_gives_back_every_byte_and_compresses_bf16_weights_to_about_two_thirds():
    g = torch.Generator().manual_seed(0)
    weights = {"w": (torch.randn(512, 512, generator=g) * 0.02).bfloat16(), "norm": torch.ones(512).bfloat16()}
    blob = transport.serialize(weights)
    packed = transport.pack(blob)
    assert packed[: len(transport.PACKED)] == transport.PACKED
    assert 0.55 < len(packed) / len(blob) < 0.75  # the exponent bytes shrink, the mantissa bytes do not
    assert transport.unpack(packed) == bytes(blob)
    assert all(load(transport.unpack(packed))[k].equal(v) for k, v in weights.items())
    fp32 = transport.serialize({"w": torch.randn(1000, generator=g)})
    assert transport.unpack(transport.pack(fp32)) == bytes(fp32)  # lossless whatever the dtype
    odd = b"\x01\x02\x03"
    assert transport.pack(odd) is odd and transport.unpack(odd) is odd  # sent as it is, received as it is
    assert transport.unpack(blob) is blob  # an unpacked item passes through


@pytest.mark.parametrize("shared", [False, True], ids=["site", "server"])
def test_packed_items_are_prepared_further_ahead_than_plain_ones(monkeypatch, shared):
    monkeypatch.setattr(transport, "SERIALIZED", transport.SerializedOnce(budget=1 << 30))
    params = {f"w{i}": torch.randn(64, 64).bfloat16() for i in range(transport.PACKED_AHEAD + 3)}  # one per item
    made = {}
    for packed in (False, True):
        transport.SERIALIZED.clear()
        download = transport.GroupedTensorDownloadable(
            dict(params), 2 * 2**20, transport.SERIALIZED if shared else None, packed=packed
        )
        download.prefetch_item(1)  # what NVFlare asks for after sending item 0
        deadline = time.monotonic() + 10
        expected = transport.PACKED_AHEAD if packed else 1
        while (transport.SERIALIZED.made if shared else len(download._ahead)) < expected:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)
        made[packed] = transport.SERIALIZED.made if shared else len(download._ahead)
        items = [download.produce_item(i) for i in range(download.get_item_count())]
        assert all(load(transport.unpack(item))[f"w{i}"].equal(params[f"w{i}"]) for i, item in enumerate(items))
        download.release()
    assert made == {False: 1, True: transport.PACKED_AHEAD}


@pytest.mark.parametrize("cut", [8, 20, -5], ids=["no-length", "odd-frame-cut", "even-frame-cut"])
def test_a_damaged_packed_item_is_a_clear_error(cut):
    packed = transport.pack(transport.serialize({"w": torch.randn(4096).bfloat16()}))
    with pytest.raises(ValueError, match="packed item"):
        transport.unpack(packed[:cut])


def test_group_keys_cuts_runs_of_at_most_the_largest_tensor_capped():
    sizes = {"a": 10, "b": 30, "c": 50, "d": 20, "e": 25, "f": 5, "g": 100}  # bytes
    tensors = {k: torch.zeros(n, dtype=torch.uint8) for k, n in sizes.items()}
    assert transport.group_keys(tensors) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]  # runs up to 100 bytes
    assert transport.group_keys(tensors, cap=50) == [["a", "b"], ["c"], ["d", "e", "f"], ["g"]]
    assert transport.group_keys({}) == []


def test_two_sites_downloads_of_one_state_dict_share_each_items_bytes(monkeypatch):
    monkeypatch.setattr(transport, "SERIALIZED", transport.SerializedOnce(budget=1 << 20))
    params = transport.split(state(3, torch.bfloat16) | {"norm": torch.ones(3, dtype=torch.bfloat16)}, PART // 2)
    groups = transport.group_keys(params)
    assert len(groups) < len(params)  # the small tensors travel together
    site_1 = transport.GroupedTensorDownloadable(dict(params), 2 * 2**20, transport.SERIALIZED)  # one per download
    site_2 = transport.GroupedTensorDownloadable(dict(params), 2 * 2**20, transport.SERIALIZED)
    assert site_1.get_item_count() == len(groups)
    site_1.prefetch_item(1)  # NVFlare's look-ahead: serialized into the shared bytes in its stream thread pool
    deadline = time.monotonic() + 10
    while transport.SERIALIZED.made < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert transport.SERIALIZED.made == 1
    items_1 = [site_1.produce_item(i) for i in range(site_1.get_item_count())]
    items_2 = [site_2.produce_item(i) for i in range(site_2.get_item_count())]
    assert all(x is y for x, y in zip(items_1, items_2, strict=True))
    received = {}
    for keys, item in zip(groups, items_1, strict=True):
        loaded = load(item)
        assert sorted(loaded) == sorted(keys)
        received.update(loaded)
    assert received.keys() == params.keys() and all(received[k].equal(v) for k, v in params.items())
    assert transport.SERIALIZED.clear() == (len(groups), 2 * len(groups))  # the look-ahead is not served
    site_1.release()
    with pytest.raises(RuntimeError, match="after the tensors were released"):
        site_1.produce_item(0)


def test_the_global_model_is_encoded_ahead_as_the_sites_downloads_ask_for_it(monkeypatch):
    """encode_ahead names the tensors as NVFlare does (T0, T1, ... in order), so the downloads find every item
    encoded already, as deltas against the model before, and encode nothing themselves."""
    monkeypatch.setattr(transport, "SERIALIZED", transport.SerializedOnce(budget=1 << 30))
    g = torch.Generator().manual_seed(3)
    before = transport.split(state(3, torch.bfloat16) | {"norm": torch.ones(3, dtype=torch.bfloat16)}, PART // 2)
    after = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in before.items()}
    monkeypatch.setattr(transport, "SEND_REFERENCE", transport.Reference(before, after))
    tasks = transport.encode_ahead(after)
    transport.stop_encoding_ahead([])  # nothing to stop
    for task in tasks:
        task.result(timeout=30)
    groups = transport.group_keys(after)
    assert transport.SERIALIZED.made == len(groups) > 1
    as_nvflare_names_them = {f"T{i}": tensor for i, tensor in enumerate(after.values())}
    download = transport.GroupedTensorDownloadable(as_nvflare_names_them, 2 * 2**20, transport.SERIALIZED, True)
    items = [download.produce_item(i) for i in range(download.get_item_count())]
    assert transport.SERIALIZED.made == len(groups)  # none encoded again
    assert all(transport.delta_names(item) for item in items)
    received = {}
    for item in items:
        received.update(load(transport.unpack(item, transport.Reference(before))))
    assert all(received[f"T{i}"].equal(v) for i, v in enumerate(after.values()))
    download.release()


def test_encoding_ahead_stops_at_three_quarters_of_the_budget_and_can_be_stopped(monkeypatch):
    params = {f"w{i}": torch.randn(256, 256, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(8)}
    one_item = len(transport.encode({"T0": params["w0"]}, packed=True))
    monkeypatch.setattr(transport, "SERIALIZED", transport.SerializedOnce(budget=4 * one_item))
    monkeypatch.setattr(transport, "SEND_REFERENCE", None)  # packed whole
    monkeypatch.setattr(transport, "AHEAD", concurrent.futures.ThreadPoolExecutor(max_workers=1))
    for task in transport.encode_ahead(params):
        task.result(timeout=30)
    assert 3 <= transport.SERIALIZED.made < len(params)
    transport.SERIALIZED.clear()
    gate = threading.Event()
    transport.AHEAD.submit(gate.wait)  # the one worker is busy: the items wait in the queue
    tasks = transport.encode_ahead(params)
    transport.stop_encoding_ahead(tasks)  # before their tensors change: none has started, none will
    gate.set()
    transport.AHEAD.shutdown(wait=True)
    assert all(task.cancelled() for task in tasks) and transport.SERIALIZED.made == 0


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "disk"])
def test_nvflares_receivers_read_a_grouped_item_as_its_tensors(tmp_path, to_disk, packed):
    """A site's grouped upload as the server's offload (disk) or an in-memory receiver takes it, via NVFlare's own
    consumers behind `Unpacking`: every tensor under its item name, whatever item it came in, packed or not."""
    from nvflare.app_opt.pt.tensor_downloader import DiskTensorConsumer, TensorConsumer
    from safetensors.torch import load_file

    params = transport.split(state(4, torch.bfloat16) | {"norm": torch.ones(3, dtype=torch.bfloat16)}, PART // 2)
    ids = {f"T{i}": v for i, v in enumerate(params.values())}  # FOBS sends tensors under item ids
    sender = transport.GroupedTensorDownloadable(ids, 2 * 2**20, packed=packed)
    items = [bytes(sender.produce_item(i)) for i in range(sender.get_item_count())]  # as they arrive
    assert all(item.startswith(transport.PACKED) == packed for item in items)
    inner = DiskTensorConsumer(str(tmp_path)) if to_disk else TensorConsumer(None, {})
    consumer = transport.Unpacking(inner)
    for index, item in enumerate(items):
        state_sent = {"start": index, "count": 1}
        assert consumer.consume("ref", state_sent, [item]) is state_sent  # unchanged: NVFlare pipelines requests
    consumer.download_completed("ref")
    assert not consumer.waiting
    result = inner.result
    if to_disk:
        assert len(list(tmp_path.iterdir())) == len(items)  # one file per item, not per tensor
        result = {k: load_file(path)[key] for k, (path, key) in result.items()}
    assert result.keys() == ids.keys() and all(result[k].equal(v) for k, v in ids.items())


def test_unpacking_hands_items_over_in_order_while_more_arrive():
    """Packed items wait while they unpack (up to UNPACK_AHEAD of them), then reach the inner consumer in the order
    they came; a damaged one fails the download when its turn comes, and a failed download drops what waits."""
    from nvflare.fuel.f3.streaming.cacheable import ItemConsumer

    class Received(ItemConsumer):
        def consume_items(self, items, result):
            return (result or []) + items

    blobs = [bytes([i]) * 2**16 for i in range(8)]
    inner = Received()
    consumer = transport.Unpacking(inner)
    for index, blob in enumerate(blobs):
        consumer.consume("ref", {"start": index, "count": 1}, [transport.pack(blob)])
        assert len(inner.result or []) == max(0, index + 1 - transport.UNPACK_AHEAD)
    consumer.download_completed("ref")
    assert inner.result == blobs

    consumer = transport.Unpacking(Received())
    consumer.consume("ref", {"start": 0, "count": 1}, [transport.pack(blobs[0])[:-9]])
    with pytest.raises(ValueError, match="does not decompress"):
        consumer.download_completed("ref")
    inner = Received()
    consumer = transport.Unpacking(inner)
    consumer.consume("ref", {"start": 0, "count": 1}, [transport.pack(blobs[0])])
    consumer.download_failed("ref", "the producer went away")
    assert not consumer.waiting and inner.error == "the producer went away" and inner.result is None


def test_the_server_registers_the_shared_serialization_before_nvflare_does(tmp_path):
    import subprocess
    import sys

    script = (
        "import transport\n"
        "from nvflare.app_opt.pt.decomposers import TensorDecomposer\n"
        "from nvflare.fuel.utils import fobs\n"
        "from fl_server import SampleWeightedFedAvg\n"
        "SampleWeightedFedAvg()\n"
        "fobs.register(TensorDecomposer)  # what NVFlare's persistor does at the start of the run\n"
        "print(transport.serialize_once_for_all_sites())\n"
    )
    root = transport.__file__.rsplit("/", 1)[0]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True"]


def test_serialized_once_never_serves_a_freed_tensors_bytes_for_the_tensor_now_at_its_address():
    shared = transport.SerializedOnce(budget=1 << 30)
    for value in range(10):
        old = torch.full((65536,), float(value))  # a size glibc hands out again at the same address once freed
        shared.get({"T0": old})
        del old  # the entry keeps the tensor, so the allocator cannot give its memory to the next one
        new = torch.full((65536,), value + 0.5)
        assert load(shared.get({"T0": new}))["T0"].equal(new)


def fine_tuned(weights: dict[str, torch.Tensor], step: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """`weights` after a fine-tuning-like change: fp32 steps of about `step`, rounded back to bf16."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + torch.randn(v.shape, generator=g) * step).bfloat16() for k, v in weights.items()}


def test_a_delta_item_is_rebuilt_bit_for_bit_from_the_weights_it_was_made_against():
    g = torch.Generator().manual_seed(1)
    last = {"w": (torch.randn(256, 512, generator=g) * 0.02).bfloat16(), "norm": torch.ones(512).bfloat16()}
    new = fine_tuned(last, 3e-5)
    moved = sum(int((new[k].view(torch.int16) != last[k].view(torch.int16)).sum()) for k in new) / (256 * 512 + 512)
    assert 0.1 < moved < 0.9  # a real change: a good part of the weights moved, most by a step or two
    held = transport.Reference(last)
    delta = transport.encode(new, True, held, list(new))
    assert delta[: len(transport.DELTA)] == transport.DELTA and transport.delta_names(delta) == ["w", "norm"]
    assert len(delta) < 0.5 * len(transport.encode(new, True))  # against 0.67 of the bytes packed whole
    assert transport.unpack(delta, held) == bytes(transport.serialize(new))
    unchanged = transport.encode(last, True, held, list(last))
    assert len(unchanged) < 0.01 * len(transport.serialize(last))  # nothing moved: next to no bytes
    # row parts are found as rows of the held tensor under its name (the server holds whole tensors)
    parts = transport.split(new, 64 * 512 * 2)
    part_item = {k: v for k, v in parts.items() if k.startswith("w#")}
    part_delta = transport.encode(part_item, True, held, list(part_item))
    assert transport.unpack(part_delta, held) == bytes(transport.serialize(part_item))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: a site's trained weights stay on it")
def test_trained_weights_on_the_gpu_go_as_a_delta_against_held_host_weights():
    g = torch.Generator().manual_seed(3)
    last = {"w": (torch.randn(128, 256, generator=g) * 0.02).bfloat16()}
    new = {k: v.cuda() for k, v in fine_tuned(last, 3e-5).items()}
    held = transport.Reference(last)
    delta = transport.encode(new, True, held, list(new))
    assert delta[: len(transport.DELTA)] == transport.DELTA  # not packed whole
    assert transport.unpack(delta, held) == bytes(transport.serialize({k: v.cpu() for k, v in new.items()}))


def test_a_delta_item_against_other_or_no_weights_is_refused_and_unheld_tensors_go_whole():
    last = {"w": torch.randn(64, 64).bfloat16()}
    new = fine_tuned(last, 1e-2)
    delta = transport.encode(new, True, transport.Reference(last), list(new))
    with pytest.raises(ValueError, match="made against other weights"):
        transport.unpack(delta, transport.Reference(fine_tuned(last, 1e-2, seed=5)))
    with pytest.raises(ValueError, match="holds none for it"):
        transport.unpack(delta, None)
    with pytest.raises(ValueError, match="differ from it in shape or dtype"):
        transport.unpack(delta, transport.Reference({"w": last["w"].float()}))
    with pytest.raises(ValueError, match="cut short|does not decompress"):
        transport.unpack(delta[:-7], transport.Reference(last))
    # tensors the reference does not hold, or holds in another shape, go packed whole
    for held in ({}, {"w": last["w"][:10]}):
        packed = transport.encode(new, True, transport.Reference(held), list(new))
        assert packed[: len(transport.PACKED)] == transport.PACKED
        assert transport.unpack(packed) == bytes(transport.serialize(new))


def test_downloads_send_deltas_against_the_send_reference_and_receivers_rebuild_them(monkeypatch):
    """What a download serves as deltas (`SEND_REFERENCE` when it was made, shared or not), `Unpacking` gives
    NVFlare's consumer whole again from `RECEIVE_REFERENCE`."""
    from nvflare.app_opt.pt.tensor_downloader import TensorConsumer

    monkeypatch.setattr(transport, "SERIALIZED", transport.SerializedOnce(budget=1 << 30))
    last = transport.split(state(6, torch.bfloat16) | {"norm": torch.ones(3, dtype=torch.bfloat16)}, PART // 2)
    new = fine_tuned(last, 1e-3)
    ids = {f"T{i}": v for i, v in enumerate(new.values())}  # FOBS hands the downloads tensors under item names
    transport.set_references(send=transport.Reference(last, sending=new), receive=None)
    for shared in (None, transport.SERIALIZED):
        sender = transport.GroupedTensorDownloadable(dict(ids), 2 * 2**20, shared, packed=True)
        transport.set_references(send=None, receive=transport.Reference(last))  # later changes do not matter
        items = [bytes(sender.produce_item(i)) for i in range(sender.get_item_count())]
        assert all(item.startswith(transport.DELTA) for item in items)
        inner = TensorConsumer(None, {})
        consumer = transport.Unpacking(inner)
        for index, item in enumerate(items):
            consumer.consume("ref", {"start": index, "count": 1}, [item])
        consumer.download_completed("ref")
        assert inner.result.keys() == ids.keys() and all(inner.result[k].equal(v) for k, v in ids.items())
        transport.set_references(send=transport.Reference(last, sending=new), receive=None)
    plain = transport.GroupedTensorDownloadable(dict(ids), 2 * 2**20, transport.SERIALIZED, packed=False)
    assert not bytes(plain.produce_item(0)).startswith(transport.DELTA)  # only packed items go as deltas
    transport.set_references(send=transport.Reference(last, sending={"w": last["small"]}), receive=None)
    unnamed = transport.GroupedTensorDownloadable(dict(ids), 2 * 2**20, None, packed=True)
    assert bytes(unnamed.produce_item(0)).startswith(transport.PACKED)


def test_a_delta_of_several_tensors_rebuilds_every_byte():
    """An item of several tensors, an empty one and an fp32 one among them, goes as a delta and comes back whole."""
    g = torch.Generator().manual_seed(2)
    last = {"a": torch.randn(33, 7, generator=g).bfloat16(), "e": torch.zeros(0).bfloat16(),
            "f": torch.randn(5, generator=g), "b": torch.randn(64, generator=g).bfloat16()}  # fmt: skip
    new = fine_tuned({k: v for k, v in last.items() if v.dtype == torch.bfloat16}, 1e-2) | {"f": last["f"] * 1.5}
    new = {k: new[k] for k in last}
    held = transport.Reference(last)
    delta = transport.encode(new, True, held, list(last))
    assert delta.startswith(transport.DELTA)
    assert transport.unpack(delta, held) == bytes(transport.serialize(new))


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_a_reply_carries_as_many_items_as_fit_and_every_tensor_arrives(monkeypatch, packed):
    """Through NVFlare's own `produce`, as its download asks for replies: small delta items share a reply (one round
    trip for several), an item larger than what is left goes in the next, and the receiver gets every tensor."""
    from nvflare.app_opt.pt.tensor_downloader import TensorConsumer
    from nvflare.fuel.f3.streaming.download_service import ProduceRC

    monkeypatch.setattr(transport, "REPLY_BYTES", 0)  # the reply budget is the one passed below
    g = torch.Generator().manual_seed(7)
    last = {f"w{i}": (torch.randn(128, 256, generator=g) * 0.02).bfloat16() for i in range(12)}  # 64 KiB each
    new = fine_tuned(last, 1e-4)  # a few KiB each as deltas
    ids = {f"T{i}": v for i, v in enumerate(new.values())}
    transport.set_references(send=transport.Reference(last, sending=new), receive=transport.Reference(last))
    try:
        sender = transport.GroupedTensorDownloadable(dict(ids), 96 * 2**10, packed=packed)
        consumer = transport.Unpacking(inner := TensorConsumer(None, {}))
        state, replies = {}, []
        while True:
            rc, data, state = sender.produce(state, "site-1")
            if rc == ProduceRC.EOF:
                break
            replies.append(len(data))
            assert len(data) == 1 or sum(map(len, data)) < 96 * 2**10  # several only where they fit
            consumer.consume("ref", state, [bytes(item) for item in data])  # as they arrive
        consumer.download_completed("ref")
        sender.release()
    finally:
        transport.set_references(send=None, receive=None)
    assert sum(replies) == len(ids)
    assert (len(replies) < len(ids) / 3) if packed else replies == [1] * len(ids)
    assert inner.result.keys() == ids.keys() and all(inner.result[k].equal(v) for k, v in ids.items())
