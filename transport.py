"""How a state dict travels between the server and the sites: tensors over `PART_BYTES` go as row ranges.

NVFlare sends each tensor of a state dict as one item: the sender serializes the whole tensor into one buffer, the
receiver gathers all its stream frames before it writes the tensor out. For the 2B model's 622 MB token embedding
these are 622 MB buffers, fresh memory each time (above glibc's largest mmap threshold, see host_memory), several at
once on the server while three sites download or upload. Sent as row ranges of at most 24 MiB (views, no copy), every
buffer on the way is as small as the model's ordinary matrices. The bytes sent are the same.

Each item also costs the sender and the receiver a fixed amount of work on top of its bytes (a request and reply per
item over 2 MiB, a file per item where it is offloaded to disk): the 2B model's 625 tensors (322 of them
under 2 MiB) and parts move 1.3-1.4x slower per byte than 24 MiB items do. `GroupedTensorDownloadable` sends
consecutive tensors together as one item (one safetensors blob, which NVFlare's receivers read as the several
tensors it holds) of at most the largest tensor's size, capped at `PART_BYTES`: 210 items in all for 2B, against
653. The state dict, its keys and the bytes sent stay the same.

Items are serialized by `serialize` (safetensors' format, byte for byte what safetensors writes for one tensor) with
torch copies, which leave Python's interpreter free to the process's other threads; safetensors' own `save` holds it.
The server serializes each item it sends once for all sites (`SerializedOnce`): NVFlare makes each site's download
of the global model a transaction of its own, and each transaction serializes every tensor again, 4.26 GB of copies
per site in the server's one process.

With packing on (job.py's `--compress_weights`), each item travels compressed (`pack`, `unpack`: lossless, about two
thirds of the bytes for bf16 weights): a bf16 number's sign and exponent sit in its second byte, which takes about 3
of its 8 bits compressed, while its mantissa byte is close to random. The item's odd and even bytes are compressed as
two zstd frames. A receiver recognizes a packed item by its prefix, so only the sender chooses.

The server holds the global model in fp32 and sends it in bf16: its downloads cast each item as they serialize it
(`serialize_once_for_all_sites(dtype=torch.bfloat16)`), so no bf16 copy of the whole model is ever made.

NVFlare's download asks for one reply at a time, so every reply costs a round trip. A reply carries as many items as
fit in `REPLY_BYTES` (24 MiB). Packed items are encoded `PACKED_AHEAD` ahead of the one sent, on a pool of their own
(`pool("encode")`), and received ones unpack item by item on another (`pool("unpack")`): each costs 20-35 ms of a
core either way. `shutdown()` stops those threads at the end of a job.

NVFlare's internals this project relies on all live here (tests/test_nvflare_internals.py checks each against the
pinned NVFlare 2.9.0 and says which one changed):
- `_TENSOR_DISK_OFFLOAD_ROOT_DIR` and FOBS context key "tensor_disk_offload_root_dir": where a receiver offloads to.
- `TensorDecomposer._download` (its parameters): replaced to put `Unpacking` in front of NVFlare's own consumers
  (`TensorConsumer`, `DiskTensorConsumer`: `result`, `error`, `cleanup()`, `release()`), as `download_object`'s
  consumer, and to build NVFlare's `LazyTensorDict(key_to_file=, temp_dir=)` from the offloaded files.
- `TensorDecomposer.to_downloadable` and `CacheableObject` (`base_obj`, `produce_item`, `get_item_count`,
  `get_item_size`, `prefetch_item`, `release`): the items a download serves.
- FOBS keeps the first decomposer registered for a type (`receive_to_disk`, `serialize_once_for_all_sites`).
- The simulator's server engine holds its job cell at `engine.server.job_cell` (`share_disk_offload_with_job_cell`).
- The server deep-copies a broadcast task's data with `copy.deepcopy` (`sent_as_is`).
- `PTFileModelPersistor`'s `_get_persistence_manager(fl_ctx)` and `_ckpt_save_path` (fl_server.QwenPersistor).
- `FedAvg`'s `_accept_train_result(client_name, result, fl_ctx, is_unknown_task)`, `_aggregate_one_result(result)`,
  `_get_aggregated_result()`, `send_model` as `run()`'s way to send a round, and `FedAvgRecipe._create_controller`
  (fl_server.FaultTolerantFedAvg, job.py's recipe: a round that goes on without the sites that do not answer), and
  `run()` sleeping `_task_check_period` between its checks for a round's last result (FaultTolerantFedAvg shortens it)
  and waiting for every task of the round (`get_num_standing_tasks`: a round may be two tasks, `NOT_SENT`).

A part's key is the tensor's name and its rows, `name#rows=START:STOP`. `split` makes them, `join` gathers them back
under the tensor's name: the tensor they are views of when they are (the server's global model), else a `Parts` that
copies its pieces into a tensor one by one (a site loading the received weights) or materializes them.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import struct
import sys
import tempfile
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import zstandard
from nvflare.app_common.utils.tensor_disk_offload_context import _TENSOR_DISK_OFFLOAD_ROOT_DIR
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.app_opt.pt.lazy_tensor_dict import LazyTensorDict
from nvflare.app_opt.pt.tensor_downloader import DiskTensorConsumer, TensorConsumer
from nvflare.fuel.f3.streaming.cacheable import CacheableObject, ItemConsumer
from nvflare.fuel.f3.streaming.download_service import Consumer, download_object
from nvflare.fuel.utils import fobs
from nvflare.fuel.utils.fobs import FOBSContextKey, dots
from safetensors.torch import save as save_tensors

from model import copy_into, materialize, tensor_shape

PART_BYTES = 24 * 2**20  # job.py's --part_mb default
# The one "tensor" of a result without weights (a failed round, an evaluation): NVFlare's FedAvg hands a result with
# no params to no aggregator, so the site's error or scores would never reach site_metrics.json.
NO_UPDATE = "no_update"
_ROWS = "#rows="
# A packed item's first 8 bytes. Read as a safetensors header's length (what an unpacked item starts with) they
# would be over 2**63 bytes, so no unpacked item starts with them.
PACKED = b"FLzstd1\xff"
# Threads that encode packed items, and threads that unpack them, in each process (each pool shared by its downloads):
# an item costs 20-35 ms of a core either way (a 24 MiB item on the development machine), and a transfer is 177 of them.
WORKERS = max(4, min(8, (os.cpu_count() or 4) // 2))
PACKED_AHEAD = 2 * WORKERS  # packed items a download encodes ahead of the one it sends (GroupedTensorDownloadable)
UNPACK_AHEAD = 2 * WORKERS  # packed items a download unpacks while it receives more (Unpacking)
REPLY_BYTES = PART_BYTES  # a download's reply carries items up to this many bytes, as many as fit
_POOLS: dict[str, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def pool(name: str) -> ThreadPoolExecutor:
    """This process's pool of `WORKERS` threads called `name` ("encode" or "unpack"), made on first use."""
    with _POOLS_LOCK:
        if name not in _POOLS:
            _POOLS[name] = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=name)
        return _POOLS[name]


def shutdown() -> None:
    """Stop the threads this module started (at the end of a job: NVFlare warns of threads still running at exit);
    a later transfer starts new ones."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for executor in pools:
        executor.shutdown(wait=True, cancel_futures=True)


# zstd's fastest match search, over a small window: the bytes are numbers, not text, so longer searches find next
# to nothing; the compression comes from coding the exponent bytes' skewed values.
_ZSTD = zstandard.ZstdCompressionParameters(
    window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7, strategy=zstandard.STRATEGY_FAST
)


def nbytes(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """The tensor's size in bytes, or what it would take in `dtype` (floating-point tensors only)."""
    cast_to = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.numel() * cast_to.itemsize


def split(state: dict[str, Any], part_bytes: int = PART_BYTES) -> dict[str, Any]:
    """`state` with each contiguous tensor over `part_bytes` replaced by views of its row ranges; 0: unchanged."""
    out = {}
    for name, value in state.items():
        size = nbytes(value) if isinstance(value, torch.Tensor) else 0
        if part_bytes <= 0 or size <= part_bytes or value.dim() == 0 or not value.is_contiguous():
            out[name] = value
            continue
        row_bytes = max(1, size // value.shape[0])
        rows = max(1, part_bytes // row_bytes)
        for start in range(0, value.shape[0], rows):
            stop = min(start + rows, value.shape[0])
            out[f"{name}{_ROWS}{start}:{stop}"] = value[start:stop]
    return out


def parse(key: str) -> tuple[str, slice | None]:
    """The tensor name and the rows of a part's key; (key, None) for a whole tensor."""
    name, sep, rows = key.partition(_ROWS)
    if not sep:
        return key, None
    start, _, stop = rows.partition(":")
    if not (start.isdigit() and stop.isdigit() and int(start) < int(stop)):
        raise ValueError(f"{key!r}: the rows of a part must read START:STOP")
    return name, slice(int(start), int(stop))


def layout(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], list[tuple[str, slice | None]]]]:
    """Per tensor name: its full shape and its keys with their rows, checked to tile the rows exactly once."""
    groups: dict[str, list[tuple[str, slice | None]]] = {}
    for key in shapes:
        name, rows = parse(key)
        groups.setdefault(name, []).append((key, rows))
    result = {}
    for name, keys in groups.items():
        if len(keys) == 1 and keys[0][1] is None:
            result[name] = (tuple(shapes[keys[0][0]]), keys)
            continue
        keys.sort(key=lambda kr: -1 if kr[1] is None else kr[1].start)
        expected, inner = 0, {tuple(shapes[k][1:]) for k, _ in keys}
        for key, rows in keys:
            if rows is None or rows.start != expected or tuple(shapes[key])[:1] != (rows.stop - rows.start,):
                raise ValueError(f"the parts of {name!r} do not tile its rows: {[k for k, _ in keys]}")
            expected = rows.stop
        if len(inner) != 1:
            raise ValueError(f"the parts of {name!r} differ in shape beyond their rows: {sorted(inner)}")
        result[name] = ((expected, *inner.pop()), keys)
    return result


class Parts:
    """A tensor that arrived as row parts: tensors, or NVFlare's lazy references to tensors offloaded to disk."""

    def __init__(self, pieces: list[tuple[slice, Any]], shape: tuple[int, ...]):
        self.pieces, self.shape = pieces, shape

    def materialize(self) -> torch.Tensor:
        return torch.cat([materialize(value) for _, value in self.pieces])

    def copy_into(self, tensor: torch.Tensor) -> None:
        """Copy the pieces into their rows of `tensor` one by one (`model.copy_into`), never the whole at once."""
        for rows, piece in self.pieces:
            copy_into(tensor[rows], piece)


def join(params: dict[str, Any]) -> dict[str, Any]:
    """`params` under the tensors' own names: parts become the tensor they are views of, or a `Parts`."""
    out = {}
    for name, (shape, keys) in layout({k: tensor_shape(v) for k, v in params.items()}).items():
        if keys[0][1] is None:
            out[name] = params[keys[0][0]]
            continue
        pieces = [(rows, params[key]) for key, rows in keys]
        base = getattr(pieces[0][1], "_base", None)
        whole = (
            isinstance(base, torch.Tensor)
            and tuple(base.shape) == shape
            and all(
                isinstance(v, torch.Tensor) and v._base is base and v.data_ptr() == base[rows].data_ptr()
                for rows, v in pieces
            )
        )
        out[name] = base if whole else Parts(pieces, shape)
    return out


_SAFETENSORS_DTYPES = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64", torch.int8: "I8",
    torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def _header(item: dict[str, torch.Tensor]) -> bytes | None:
    """The length and header that start `item`'s safetensors bytes; None for dtypes outside the common ones and for
    non-contiguous tensors (left to safetensors itself)."""
    if not all(t.dtype in _SAFETENSORS_DTYPES and t.is_contiguous() for t in item.values()):
        return None
    header, offset = {}, 0
    for name, tensor in item.items():
        size = nbytes(tensor)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(encoded)) + encoded


def serialize(item: dict[str, torch.Tensor]) -> bytes | memoryview:
    """The safetensors bytes of `item` (what NVFlare sends for tensors), copied without holding Python's GIL.

    safetensors' own `save` holds the GIL while it copies (about 3 GB/s), and on the server that copy competes with
    every site's stream for the one interpreter; torch's `copy_` into a buffer releases it. Falls back to safetensors
    for dtypes outside the common ones and for non-contiguous tensors (which it refuses, as NVFlare's own send does).
    """
    head = _header(item)
    if head is None:
        return save_tensors(item)
    start, offset = len(head), sum(map(nbytes, item.values()))
    buffer = torch.empty(start + offset, dtype=torch.uint8)
    buffer[:start].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
    for tensor in item.values():
        size = nbytes(tensor)
        if size:
            buffer[start : start + size].copy_(tensor.reshape(-1).view(torch.uint8))
        start += size
    return memoryview(buffer.numpy())


def _planes(words: np.ndarray) -> tuple[bytes, bytes]:
    """The high and the low bytes of 16-bit `words`, each compressed as one zstd frame."""
    high, low = np.empty(words.size, np.uint8), np.empty(words.size, np.uint8)
    np.right_shift(words, 8, out=high, casting="unsafe")  # 4-5x faster than copying a strided view
    np.copyto(low, words, casting="unsafe")
    compressor = zstandard.ZstdCompressor(compression_params=_ZSTD)  # one per call: not shared across threads
    return compressor.compress(high), compressor.compress(low)


def _words(high: bytes, low: bytes, what: str) -> bytearray:
    """The 16-bit words `_planes` compressed, from its two frames, written into one new buffer."""
    decompressor = zstandard.ZstdDecompressor()
    try:
        high, low = decompressor.decompress(high), decompressor.decompress(low)
    except zstandard.ZstdError as e:
        raise ValueError(f"{what} does not decompress: {e}") from e
    if len(high) != len(low):
        raise ValueError(f"{what}'s byte planes differ in size ({len(high)} and {len(low)} bytes)")
    out = bytearray(2 * len(high))
    words = np.frombuffer(out, dtype="<u2")
    np.left_shift(np.frombuffer(high, dtype=np.uint8), 8, out=words, dtype=np.uint16)  # 2x faster than strided
    np.bitwise_or(words, np.frombuffer(low, dtype=np.uint8), out=words, dtype=np.uint16)
    return out


def pack(blob: bytes | memoryview) -> bytes | memoryview:
    """`blob` compressed: `PACKED`, the length of the first frame, then its odd bytes and its even bytes as two zstd
    frames. An odd-sized blob stays as it is. zstd and numpy's copies leave Python's interpreter free."""
    view = memoryview(blob).cast("B")
    if len(view) % 2:
        return blob
    high, low = _planes(np.frombuffer(view, dtype="<u2"))  # byte pairs: the odd byte high on any machine
    return b"".join((PACKED, struct.pack("<Q", len(high)), high, low))


def is_packed(item: bytes | memoryview) -> bool:
    """Whether `item` was made by `pack` (its prefix)."""
    return memoryview(item)[: len(PACKED)] == PACKED


def unpack(item: bytes | memoryview) -> bytes | bytearray | memoryview:
    """The blob `pack` made `item` from (a bytearray, written in place: NVFlare's in-memory receiver takes only
    bytes, its disk offload any buffer); any other item as it is."""
    if not is_packed(item):
        return item
    view = memoryview(item)
    if len(view) < 16:
        raise ValueError(f"a packed item of {len(view)} bytes is cut short")
    (odd_size,) = struct.unpack_from("<Q", view, 8)
    return _words(view[16 : 16 + odd_size], view[16 + odd_size :], "a packed item")


def cast(item: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """`item` with its floating-point tensors in `dtype` (None: as they are)."""
    if dtype is None:
        return item
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in item.items()}


def encode(item: dict[str, torch.Tensor], packed: bool, dtype: torch.dtype | None = None) -> bytes | memoryview:
    """The bytes `item` travels as: its floating-point tensors in `dtype` (None: as they are), serialized, and
    packed when `packed`."""
    blob = serialize(cast(item, dtype))
    return pack(blob) if packed else blob


def group_keys(
    tensors: dict[str, torch.Tensor], cap: int = PART_BYTES, dtype: torch.dtype | None = None
) -> list[list[str]]:
    """The keys of `tensors` in order, cut into runs of at most the largest tensor's size (at most `cap`) in bytes
    (as sent: in `dtype`, if given); a tensor larger than that is a run of its own."""
    sizes = {key: nbytes(tensor, dtype) for key, tensor in tensors.items()}
    limit = min(cap, max(sizes.values(), default=0))
    groups: list[list[str]] = []
    size = 0
    for key in tensors:
        if not groups or size + sizes[key] > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += sizes[key]
    return groups


class SerializedOnce:
    """The serialized bytes of the items being sent, shared by every site's download of them.

    An entry is keyed by its tensors' item names, memory, layout and version (an in-place change makes a new key)
    and holds the tensors, so that no other tensor can take that memory while the entry lives. A site asking for
    an entry that another site is serializing waits for it. Finished entries are kept while they take at most
    `budget` bytes, oldest dropped first (a site that falls that far behind serializes the item again), and all go
    on `clear()`, which the aggregator calls once the sites' results are in.
    """

    def __init__(self, budget: int):
        self.budget, self.held, self.made, self.served = budget, 0, 0, 0
        self.entries: collections.OrderedDict[tuple, tuple[list[torch.Tensor], Future]] = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(
        self,
        item: dict[str, torch.Tensor],
        ahead: bool = False,
        packed: bool = False,
        dtype: torch.dtype | None = None,
    ) -> bytes | memoryview:
        """The item's bytes (its tensors under their names), serialized now or earlier; `ahead`: a look-ahead, not
        counted as served; `packed`: compressed (`pack`); `dtype`: floating-point tensors cast to it first."""
        key = (packed, dtype) + tuple(
            (name, t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t._version) for name, t in item.items()
        )
        with self.lock:
            self.served += not ahead
            _, entry = self.entries.get(key, (None, None))
            mine = entry is None
            if mine:
                entry = Future()
                self.entries[key] = (list(item.values()), entry)
        if not mine:
            return entry.result()
        try:
            data = encode(item, packed, dtype)
        except BaseException as e:
            with self.lock:
                self.entries.pop(key, None)
            entry.set_exception(e)
            raise
        entry.set_result(data)
        with self.lock:
            self.made += 1
            if self.entries.get(key, (None, None))[1] is entry:
                self.held += len(data)
            while self.held > self.budget and next(iter(self.entries.values()))[1].done():
                self.held -= len(self.entries.popitem(last=False)[1][1].result())
        return data

    def note_served(self) -> None:
        """Count an item served from a look-ahead (`get` with `ahead`)."""
        with self.lock:
            self.served += 1

    def clear(self) -> tuple[int, int]:
        """Drop every entry; return how many items were serialized and how many were served from them."""
        with self.lock:
            counts = (self.made, self.served)
            self.entries.clear()
            self.held = self.made = self.served = 0
        return counts


SERIALIZED = SerializedOnce(2**30)


class GroupedTensorDownloadable(CacheableObject):
    """NVFlare's download of a state dict (item name -> tensor) in items of several tensors each (`group_keys`).

    `shared`: serialize each item once for all the downloads that ask for it (the server's `SERIALIZED`); None: each
    download serializes its own (a site, sending to the server alone). `packed`: send the items compressed (`pack`).
    `dtype`: send floating-point tensors in this dtype (the server's fp32 global model goes in bf16).

    A reply carries as many items as fit in `REPLY_BYTES` (NVFlare's `produce` fills it from `get_item_size`): NVFlare's
    download asks for one reply at a time, so each reply costs a round trip. Packed items are encoded `PACKED_AHEAD`
    ahead of the one sent, on `pool("encode")`, so that a reply's items are ready when it is asked for; plain ones one
    ahead, as NVFlare's own download does.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        max_chunk_size: int,
        shared: SerializedOnce | None = None,
        packed: bool = False,
        dtype: torch.dtype | None = None,
    ):
        self.groups = group_keys(tensors, dtype=dtype)
        self.shared, self.packed, self.dtype = shared, packed, dtype
        self._ahead: dict[int, Future] = {}
        self._submitted = 0  # the items before it have been submitted or produced
        self._ahead_lock = threading.Lock()
        super().__init__(tensors, max(max_chunk_size, REPLY_BYTES))

    def get_item_count(self) -> int:
        return len(self.groups)

    def get_item_size(self, index: int) -> int | None:
        """A plain item's size; a packed one's once it is encoded (unknown before: None)."""
        tensors = self.base_obj
        if tensors is None:
            return None
        if not self.packed:
            return sum(nbytes(tensors[k], self.dtype) for k in self.groups[index])
        with self._ahead_lock:
            future = self._ahead.get(index)
        if future is None or not future.done() or future.cancelled() or future.exception() is not None:
            return None
        return len(future.result())

    def _serialize(self, index: int, ahead: bool = False) -> bytes | memoryview:
        tensors = self.base_obj
        if tensors is None:
            raise RuntimeError(f"item {index} requested after the tensors were released")
        item = {key: tensors[key] for key in self.groups[index]}
        if self.shared is not None:
            return self.shared.get(item, ahead, self.packed, self.dtype)
        return encode(item, self.packed, self.dtype)

    def _read_ahead(self, start: int) -> None:
        """Start encoding the items from `start` on, `PACKED_AHEAD` of them when packed, else one."""
        if self.base_obj is None:
            return
        stop = min(start + (PACKED_AHEAD if self.packed else 1), len(self.groups))
        with self._ahead_lock:
            for index in range(max(start, self._submitted), stop):
                self._ahead[index] = pool("encode").submit(self._serialize, index, True)
            self._submitted = max(self._submitted, stop)

    def produce_item(self, index: int) -> bytes | memoryview:
        if self.packed:
            self._read_ahead(index + 1)
        with self._ahead_lock:
            ahead = self._ahead.pop(index, None)
            self._submitted = max(self._submitted, index + 1)
        if ahead is None:
            return self._serialize(index)
        data = ahead.result()
        if self.shared is not None:
            self.shared.note_served()
        return data

    def prefetch_item(self, index: int) -> None:
        """NVFlare's look-ahead asks for the item after the reply it sends (or two)."""
        self._read_ahead(index)

    def release(self) -> None:
        with self._ahead_lock:
            ahead, self._ahead = list(self._ahead.values()), {}
        for future in ahead:
            future.cancel()
        super().release()


def _unpacked(item: bytes | memoryview, as_bytes: bool) -> bytes | bytearray | memoryview:
    item = unpack(item)
    return bytes(item) if as_bytes and isinstance(item, bytearray) else item


class Unpacking(Consumer):
    """Hands NVFlare's consumer `inner` each received item unpacked (`unpack`), in order, in the download's thread.

    NVFlare's download asks for the next reply while this one is consumed, but never for two: with the consumer
    slower than a reply, the consumer sets the pace. Packed items are unpacked on `pool("unpack")` threads, each item a
    task of its own (zstd and numpy leave Python's interpreter free), and a reply's items are handed over once more
    than `UNPACK_AHEAD` items wait after them, or at the end, so the download keeps asking while they unpack. Plain
    items go straight through when none is waiting."""

    supports_pipelining = True

    def __init__(self, inner: ItemConsumer):
        super().__init__()
        self.inner = inner
        self.waiting: collections.deque[tuple[dict, list[Future]]] = collections.deque()
        self.items_waiting = 0

    def consume(self, ref_id: str, state: dict, data: Any) -> dict:
        if not self.waiting and not any(is_packed(item) for item in data):
            self.inner.consume(ref_id, state, data)
            return state
        as_bytes = not isinstance(self.inner, DiskTensorConsumer)
        self.waiting.append((state, [pool("unpack").submit(_unpacked, item, as_bytes) for item in data]))
        self.items_waiting += len(data)
        while self.items_waiting - len(self.waiting[0][1]) >= UNPACK_AHEAD:
            self._hand_over_first(ref_id)
        return state

    def _hand_over_first(self, ref_id: str) -> None:
        state, unpacked = self.waiting.popleft()
        self.items_waiting -= len(unpacked)
        self.inner.consume(ref_id, state, [item.result() for item in unpacked])

    def download_completed(self, ref_id: str) -> None:
        while self.waiting:
            self._hand_over_first(ref_id)
        self.inner.download_completed(ref_id)

    def download_failed(self, ref_id: str, reason: str) -> None:
        for _, unpacked in self.waiting:
            for item in unpacked:
                item.cancel()
        self.waiting.clear()
        self.items_waiting = 0
        self.inner.download_failed(ref_id, reason)


class GroupedTensorDecomposer(TensorDecomposer):
    """NVFlare's tensor decomposer, sending tensors grouped into items (`GroupedTensorDownloadable`), compressed when
    `packed`, and receiving items packed or not, into memory or NVFlare's disk offload as NVFlare's own does."""

    shared: SerializedOnce | None = None

    def __init__(self, packed: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.packed, self.dtype = packed, dtype

    def to_downloadable(self, items: dict, max_chunk_size: int, fobs_ctx: dict) -> GroupedTensorDownloadable:
        return GroupedTensorDownloadable(items, max_chunk_size, self.shared, self.packed, self.dtype)

    def _download(
        self,
        from_fqcn: str,
        ref_id: str,
        per_request_timeout: float,
        cell,
        use_disk: bool,
        root_dir: str | None = None,
        secure=False,
        optional=False,
        abort_signal=None,
        progress_cb=None,
    ) -> tuple[str | None, Any]:
        # NVFlare's download_tensors and download_tensors_to_disk, with their consumer behind Unpacking
        if use_disk:
            root_dir = root_dir or cell.get_fobs_context().get(_TENSOR_DISK_OFFLOAD_ROOT_DIR)
            if not root_dir:
                raise RuntimeError(f"{_TENSOR_DISK_OFFLOAD_ROOT_DIR} is not set in FOBS context")
            temp_dir = tempfile.mkdtemp(prefix="nvflare_tensors_", dir=root_dir)
            inner = DiskTensorConsumer(temp_dir)
        else:
            inner = TensorConsumer(None, {})
        try:
            download_object(from_fqcn=from_fqcn, ref_id=ref_id, per_request_timeout=per_request_timeout, cell=cell,
                            consumer=Unpacking(inner), secure=secure, optional=optional, abort_signal=abort_signal,
                            progress_cb=progress_cb)  # fmt: skip
        except Exception as e:
            if use_disk:
                inner.cleanup()  # no part-written files are left behind
                if isinstance(e, OSError):  # else only NVFlare's traceback would say it, deep in the log
                    print(f"could not store the received weights in {root_dir} ({e}); free space there (a site's "
                          "--work_dir, the server's $TMPDIR)", file=sys.stderr, flush=True)  # fmt: skip
            raise
        if not use_disk:
            return inner.error, inner.result
        if inner.error:
            inner.cleanup()
            return inner.error, None
        inner.release()
        return None, LazyTensorDict(key_to_file=inner.result or {}, temp_dir=temp_dir)


class _SharedTensorDecomposer(GroupedTensorDecomposer):
    shared = SERIALIZED


def serialize_once_for_all_sites(packed: bool = False, dtype: torch.dtype | None = None) -> bool:
    """Have this process's tensor downloads send grouped items, floating-point tensors in `dtype` (None: as they
    are), compressed when `packed`, and share their serialized bytes (`SERIALIZED`); call it before NVFlare registers
    its own tensor decomposer (FOBS keeps the first). False where another one was registered first."""
    fobs.register(_SharedTensorDecomposer(packed, dtype))
    return isinstance(fobs.get_dot_handler(dots.TENSOR_DOWNLOAD), _SharedTensorDecomposer)


class DiskTensorDecomposer(GroupedTensorDecomposer):
    """A site's tensor decomposer: every received tensor downloads into `folder` (NVFlare's tensor disk offload), and
    what the site sends goes in grouped items, compressed when `packed`."""

    def __init__(self, folder: str, packed: bool = False):
        super().__init__(packed)
        self.folder = folder

    def download(self, *args, fobs_ctx: dict | None = None, **kwargs):
        offload = {FOBSContextKey.TENSOR_DISK_OFFLOAD: True, _TENSOR_DISK_OFFLOAD_ROOT_DIR: self.folder}
        return super().download(*args, fobs_ctx={**(fobs_ctx or {}), **offload}, **kwargs)


def receive_to_disk(folder: str | os.PathLike, packed: bool = True) -> bool:
    """A site's side of the wire: NVFlare writes the global weights it receives into `folder`, not host memory, from
    the first task on, and what the site sends goes in grouped items, compressed when `packed`.

    The trainer then reads the weights back one tensor at a time as it copies them into its model, so the site never
    holds the whole received state (4.26 GB for the 2B model) in host memory; NVFlare deletes the files once the
    trainer lets go of them. A folder beside the checkpoints, not /tmp, which may be memory (tmpfs). Call it before
    `flare.init`: the Client API starts receiving inside `init`, and FOBS keeps the first decomposer registered for a
    type. False where another one was registered first (then the weights arrive in memory).
    """
    os.makedirs(folder, exist_ok=True)
    fobs.register(DiskTensorDecomposer(str(folder), packed))
    return isinstance(fobs.get_dot_handler(dots.TENSOR_DOWNLOAD), DiskTensorDecomposer)


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


# A task's meta: the names of the global model's tensors the server left out, because this site holds them as they
# were sent in the run's first round (no site has sent an update of them since, so they have not changed).
NOT_SENT = "not_sent_site_holds"
# A result's meta: this site keeps the global tensors it received from one round to the next (`HeldWeights`).
KEEPS = "keeps_received_tensors"


def tensor_names(keys) -> set[str]:
    """The tensor names of state-dict keys (row parts under their tensor's name)."""
    return {parse(key)[0] for key in keys}


def leave_out(params: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """`params` (keys as sent: row parts too) without the tensors called `names`."""
    return {key: value for key, value in params.items() if parse(key)[0] not in names}


class HeldWeights:
    """A site's record of the global tensors its trainer holds exactly as the server sent them this run.

    The server leaves a tensor out of a task only when no site has sent an update of it this run and the site said
    it keeps what it receives: the vision tower while no site trains it, about 14% of the 2B model's bytes, every
    round after the first. Tensors the site trains are no longer held as sent; a new trainer holds none.
    """

    def __init__(self) -> None:
        self.names: set[str] = set()

    def left_out(self, meta: dict | None) -> set[str]:
        """The tensors a task left out (`NOT_SENT`); ValueError if this site does not hold them all as sent (the
        site's result then says it keeps nothing, and the server sends it the whole model next round)."""
        names = set((meta or {}).get(NOT_SENT) or ())
        missing = sorted(names - self.names)
        if missing:
            raise ValueError(f"the server left out {len(missing)} tensors this site does not hold as sent (e.g. "
                             f"{missing[0]}): it sends the whole model next round")  # fmt: skip
        return names

    def after_round(self, received: set[str], trained: set[str]) -> None:
        """The trainer loaded `received` and then trained (changed) `trained`."""
        self.names = (self.names | received) - trained

    def forget(self) -> None:
        """A new trainer holds nothing as sent."""
        self.names.clear()


def _itself(alias: weakref.ref, memo: dict) -> torch.Tensor:
    return alias()


def sent_as_is(tensor: torch.Tensor) -> torch.Tensor:
    """An alias of `tensor` that deep-copies as itself.

    NVFlare deep-copies a broadcast task's data before the first site gets it (`wf_comm_server.py`, a copy "against
    concurrent in-place modifications"): for the 2B model's fp32 global, 8.5 GB of fresh memory and seconds of
    Python's interpreter each round, before any site can start its download. The global model changes only in the
    next average, after every site's update is in (so after every site's download), so the copy protects nothing.
    Python's deep copy takes an instance's own `__deepcopy__`. `torch.save` cannot pickle the alias: `QwenPersistor`
    saves detached tensors."""
    alias = tensor.view(tensor.shape)
    alias.__deepcopy__ = functools.partial(_itself, weakref.ref(alias))
    return alias
