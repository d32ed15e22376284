"""How state dicts travel (transport.py): row parts of large tensors, grouped items, packing, the cast of the server's
fp32 global model to bf16 on the wire, and the server's average of updates sent in parts."""

import struct
import time

import pytest
import torch
from test_fl_server import assert_fp32_close, offloaded, site_update, started

import transport
from model import copy_into


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
    copy_into(target, joined["big"])
    assert torch.equal(target, params["big"].float())


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"w#rows=0:10": (10, 10), "w#rows=20:35": (15, 10)}, "do not tile"),  # a gap
        ({"w#rows=0:10": (10, 10), "w#rows=5:35": (30, 10)}, "do not tile"),  # an overlap
        ({"w#rows=0:10": (10, 10), "w#rows=10:20": (9, 10)}, "do not tile"),  # a part's shape is not its rows
        ({"w": (35, 10), "w#rows=0:10": (10, 10)}, "do not tile"),  # the whole tensor and a part of it
        ({"w#rows=0:10": (10, 10), "w#rows=10:35": (25, 8)}, "differ in shape beyond their rows"),
        ({"w#rows=9:3": (6, 10)}, "must read START:STOP"),
    ],
)
def test_parts_that_do_not_tile_the_rows_are_refused(shapes, message):
    assert transport.layout({"w#rows=0:10": (10, 10), "w#rows=10:35": (25, 10)}) == {
        "w": ((35, 10), [("w#rows=0:10", slice(0, 10)), ("w#rows=10:35", slice(10, 35))])
    }
    with pytest.raises(ValueError, match=message):
        transport.layout(shapes)


def test_updates_split_their_own_way_land_in_their_rows_of_the_global_model(tmp_path):
    """The server sends the global model in its parts; each site may split its update differently (its own
    `--part_mb`), or send it whole: every part is added to its rows of the one fp32 tensor."""
    initial = {k: v.float() for k, v in state(0).items()}
    before = {k: v.double() for k, v in initial.items()}  # the average goes into the initial model's tensors
    aggregator = started(transport.split(initial, PART))  # "big" in parts of 10 rows
    updates = [{k: (v * 1e-3).bfloat16() for k, v in state(1 + i).items()} for i in range(3)]  # a round's changes
    sites = list(zip(updates, (3.0, 1.0, 2.0), strict=True))
    for i, ((update, samples), part) in enumerate(zip(sites, (PART // 4, 3 * PART // 4, 0), strict=True)):
        sent = transport.split(update, part)  # bf16 rows of 20 bytes: parts of 5 rows, of 15, or whole
        sent = offloaded(sent, tmp_path / f"site-{i}") if i == 1 else sent
        aggregator.accept_model(site_update(sent, samples, f"site-{i}"))
    result = aggregator.aggregate_model().params
    assert list(result) == list(transport.split(initial, PART))
    expected = {k: v + sum(w * u[k].double() for u, w in sites) / 6 for k, v in before.items()}
    assert_fp32_close(transport.join(result), expected)


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


def test_group_keys_sizes_tensors_as_they_are_sent():
    """The server's fp32 tensors go in bf16: runs are cut by their bf16 sizes; other dtypes keep their own."""
    tensors = {
        "a": torch.zeros(10),
        "b": torch.zeros(10),
        "c": torch.zeros(20),
        "ids": torch.zeros(5, dtype=torch.int64),
    }
    assert transport.group_keys(tensors, cap=40) == [["a"], ["b"], ["c"], ["ids"]]  # 40, 40, 80 and 40 bytes
    assert transport.group_keys(tensors, cap=40, dtype=torch.bfloat16) == [["a", "b"], ["c"], ["ids"]]  # 20, 20, 40
    assert transport.nbytes(tensors["c"], torch.bfloat16) == 40 and transport.nbytes(tensors["c"]) == 80
    assert transport.nbytes(tensors["ids"], torch.bfloat16) == 40


@pytest.mark.parametrize("shared", [False, True], ids=["site", "server"])
def test_a_bf16_download_of_fp32_tensors_sends_their_bf16_rounding(monkeypatch, shared):
    """The server's fp32 global model as its downloads send it: every floating-point tensor cast to bf16 item by
    item (integer ones as they are), items sized and grouped as sent, packed items unpacking to the same bytes; the
    server's shared bytes keep the bf16 items apart from plain ones of the same tensors."""
    monkeypatch.setattr(transport, "SERIALIZED", transport.SerializedOnce(budget=1 << 30))
    g = torch.Generator().manual_seed(5)
    held = {"big": torch.randn(35, 10, generator=g), "norm": torch.randn(9, generator=g) + 1,
            "bf16": torch.randn(4, generator=g).bfloat16(), "ids": torch.arange(6)}  # fmt: skip
    held = transport.split(held, PART)  # "big" in fp32 parts of 10 rows
    cache = transport.SERIALIZED if shared else None
    plain = transport.GroupedTensorDownloadable(dict(held), 2 * 2**20, cache, dtype=torch.bfloat16)
    packed = transport.GroupedTensorDownloadable(dict(held), 2 * 2**20, cache, packed=True, dtype=torch.bfloat16)
    groups = [["big#rows=0:10"], ["big#rows=10:20"], ["big#rows=20:30"], ["big#rows=30:35", "norm", "bf16", "ids"]]
    assert plain.get_item_count() == packed.get_item_count() == len(groups)
    received = {}
    for index, keys in enumerate(groups):
        item = bytes(plain.produce_item(index))
        (header,) = struct.unpack_from("<Q", item)
        sizes = [v.numel() * (8 if v.dtype == torch.int64 else 2) for v in (held[k] for k in keys)]
        assert plain.get_item_size(index) == sum(sizes) == len(item) - 8 - header  # the bf16 bytes, no more
        loaded = load(item)
        assert sorted(loaded) == sorted(keys)
        received.update(loaded)
        assert transport.unpack(packed.produce_item(index)) == item
    for key, value in held.items():
        sent = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert received[key].dtype == sent.dtype and received[key].equal(sent), key
    assert received["big#rows=0:10"].dtype == torch.bfloat16 and received["ids"].dtype == torch.int64
    as_held = transport.GroupedTensorDownloadable(dict(held), 2 * 2**20, cache)  # no dtype: sent as they are
    assert load(as_held.produce_item(0))["big#rows=0:10"].equal(held["big#rows=0:10"])
    if shared:
        assert transport.SERIALIZED.made == 2 * len(groups) + 1  # bf16, bf16 packed, and the first as it is
    for download in (plain, packed, as_held):
        download.release()


def test_two_sites_downloads_of_one_state_dict_share_each_items_bytes(monkeypatch):
    monkeypatch.setattr(transport, "SERIALIZED", transport.SerializedOnce(budget=1 << 20))
    params = transport.split(state(3, torch.bfloat16) | {"norm": torch.ones(3, dtype=torch.bfloat16)}, PART // 2)
    # runs of at most the largest tensor's 200 bytes: the last part and the small tensors travel together
    groups = [["big#rows=0:10"], ["big#rows=10:20"], ["big#rows=20:30"], ["big#rows=30:35", "small", "norm"]]
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
        "from nvflare.fuel.utils.fobs import dots\n"
        "fobs.register(TensorDecomposer)  # what NVFlare's persistor does at the start of the run\n"
        "handler = fobs.get_dot_handler(dots.TENSOR_DOWNLOAD)\n"
        "print(type(handler).__name__, handler.dtype, handler.packed)\n"
        "print(transport.serialize_once_for_all_sites())\n"
    )
    root = transport.__file__.rsplit("/", 1)[0]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # the server's downloads send its fp32 global model in bf16, compressed (job.py's default)
    assert out.stdout.split() == ["_SharedTensorDecomposer", "torch.bfloat16", "True", "True"]


def test_serialized_once_never_serves_a_freed_tensors_bytes_for_the_tensor_now_at_its_address():
    shared = transport.SerializedOnce(budget=1 << 30)
    for value in range(10):
        old = torch.full((65536,), float(value))  # a size glibc hands out again at the same address once freed
        shared.get({"T0": old})
        del old  # the entry keeps the tensor, so the allocator cannot give its memory to the next one
        new = torch.full((65536,), value + 0.5)
        assert load(shared.get({"T0": new}))["T0"].equal(new)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_a_reply_carries_as_many_bf16_items_as_fit_and_every_tensor_arrives(monkeypatch, packed):
    """Through NVFlare's own `produce`, as its download asks for replies: the server's fp32 tensors go cast to bf16,
    a reply takes as many items as fit by their bf16 sizes (one round trip for several; sized as fp32, only one of
    these would), an item larger than what is left goes in the next, and the receiver gets every tensor in bf16."""
    from nvflare.app_opt.pt.tensor_downloader import TensorConsumer
    from nvflare.fuel.f3.streaming.download_service import ProduceRC

    monkeypatch.setattr(transport, "REPLY_BYTES", 0)  # the reply budget is the one passed below
    g = torch.Generator().manual_seed(7)
    held = {f"T{i}": torch.randn(64, 128, generator=g) * 0.02 for i in range(12)}  # 32 KiB in fp32, 16 KiB in bf16
    sender = transport.GroupedTensorDownloadable(dict(held), 40 * 2**10, packed=packed, dtype=torch.bfloat16)
    consumer = transport.Unpacking(inner := TensorConsumer(None, {}))
    progress, replies = {}, []
    while True:
        rc, data, progress = sender.produce(progress, "site-1")
        if rc == ProduceRC.EOF:
            break
        replies.append(len(data))
        assert len(data) == 1 or sum(map(len, data)) < 40 * 2**10  # several only where they fit
        consumer.consume("ref", progress, [bytes(item) for item in data])  # as they arrive
    consumer.download_completed("ref")
    sender.release()
    assert replies == ([3] * 4 if packed else [2] * 6)  # packed: about 11 KiB an item
    assert inner.result.keys() == held.keys()
    assert all(v.dtype == torch.bfloat16 and v.equal(held[k].to(torch.bfloat16)) for k, v in inner.result.items())
