"""How a state dict travels between the server and the sites: tensors over `PART_BYTES` go as row ranges.

NVFlare sends each tensor of a state dict as one item: the sender serializes the whole tensor into one buffer, the
receiver gathers all its stream frames before it writes the tensor out. For the 2B model's 622 MB token embedding
these are 622 MB buffers, fresh memory each time (above glibc's largest mmap threshold, see host_memory), several at
once on the server while three sites download or upload. Sent as row ranges of at most 24 MiB (views, no copy), every
buffer on the way is as small as the model's ordinary matrices. The bytes sent are the same.

Each item also costs the sender and the receiver a fixed amount of work on top of its bytes (a reply of at most 2
MiB of items per request, a file per item where it is offloaded to disk): the 2B model's 625 tensors (322 of them
under 2 MiB) and parts move 1.3-1.4x slower per byte than 24 MiB items do. `GroupedTensorDownloadable` sends
consecutive tensors together as one item (one safetensors blob, which NVFlare's receivers read as the several
tensors it holds) of at most the largest tensor's size, capped at `PART_BYTES`: 210 items in all for 2B, against
653. The state dict, its keys and the bytes sent stay the same.

Items are serialized by `serialize` (safetensors' format, byte for byte what safetensors writes for one tensor) with
torch copies, which leave Python's interpreter free to the process's other threads; safetensors' own `save` holds it.
The server serializes each item it sends once for all sites (`SerializedOnce`): NVFlare makes each site's download
of the global model a transaction of its own, and each transaction serializes every tensor again, 4.26 GB of copies
per site in the server's one process.

A part's key is the tensor's name and its rows, `name#rows=START:STOP`. `split` makes them, `join` gathers them back
under the tensor's name: the tensor they are views of when they are (the server's global model), else a `Parts` that
copies its pieces into a tensor one by one (a site loading the received weights) or materializes them.
"""

from __future__ import annotations

import collections
import json
import struct
import threading
from concurrent.futures import Future
from typing import Any

import torch
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.f3.streaming.cacheable import CacheableObject
from nvflare.fuel.f3.streaming.stream_utils import stream_thread_pool
from nvflare.fuel.utils import fobs
from nvflare.fuel.utils.fobs import dots
from safetensors.torch import save as save_tensors

from model import materialize, tensor_shape

PART_BYTES = 24 * 2**20  # job.py's --part_mb default (a test keeps them equal)
_ROWS = "#rows="


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


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


def copy_into(tensor: torch.Tensor, value: Any) -> None:
    """Copy a received value (tensor, lazy reference or `Parts`) into `tensor`, onto its device before any cast.

    A blocking CPU-to-GPU `copy_` that also changes the dtype first makes a full copy in the new dtype in host memory
    (8.5 GB of fresh pages a round for 2B in fp32); moving first, the cast happens on the GPU.
    """
    if isinstance(value, Parts):
        for rows, piece in value.pieces:
            copy_into(tensor[rows], piece)
    else:
        tensor.copy_(materialize(value).to(tensor.device))


_SAFETENSORS_DTYPES = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64", torch.int8: "I8",
    torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def serialize(item: dict[str, torch.Tensor]) -> bytes | memoryview:
    """The safetensors bytes of `item` (what NVFlare sends for tensors), copied without holding Python's GIL.

    safetensors' own `save` holds the GIL while it copies (about 3 GB/s), and on the server that copy competes with
    every site's stream for the one interpreter; torch's `copy_` into a buffer releases it. Falls back to safetensors
    for dtypes outside the common ones and for non-contiguous tensors (which it refuses, as NVFlare's own send does).
    """
    if not all(t.dtype in _SAFETENSORS_DTYPES and t.is_contiguous() for t in item.values()):
        return save_tensors(item)
    header, offset = {}, 0
    for name, tensor in item.items():
        size = nbytes(tensor)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    start = 8 + len(encoded)
    buffer = torch.empty(start + offset, dtype=torch.uint8)
    buffer[:start].copy_(torch.frombuffer(bytearray(struct.pack("<Q", len(encoded)) + encoded), dtype=torch.uint8))
    for tensor in item.values():
        size = nbytes(tensor)
        if size:
            buffer[start : start + size].copy_(tensor.reshape(-1).view(torch.uint8))
        start += size
    return memoryview(buffer.numpy())


def group_keys(tensors: dict[str, torch.Tensor], cap: int = PART_BYTES) -> list[list[str]]:
    """The keys of `tensors` in order, cut into runs of at most the largest tensor's size (at most `cap`) in bytes;
    a tensor larger than that is a run of its own."""
    limit = min(cap, max(map(nbytes, tensors.values()), default=0))
    groups: list[list[str]] = []
    size = 0
    for key, tensor in tensors.items():
        if not groups or size + nbytes(tensor) > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes(tensor)
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

    def get(self, item: dict[str, torch.Tensor], ahead: bool = False) -> bytes | memoryview:
        """The item's bytes (its tensors under their names), serialized now or earlier; `ahead`: a look-ahead, not
        counted as served."""
        key = tuple((name, t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t._version) for name, t in item.items())
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
            data = serialize(item)
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

    def clear(self) -> tuple[int, int]:
        """Drop every entry; return how many items were serialized and how many were served from them."""
        with self.lock:
            counts = (self.made, self.served)
            self.entries.clear()
            self.held = self.made = self.served = 0
        return counts


SERIALIZED = SerializedOnce(512 * 2**20)


class GroupedTensorDownloadable(CacheableObject):
    """NVFlare's download of a state dict (item name -> tensor) in items of several tensors each (`group_keys`).

    `shared`: serialize each item once for all the downloads that ask for it (the server's `SERIALIZED`); None: each
    download serializes its own (a site, sending to the server alone). Like NVFlare's own, it serializes the next
    item ahead (`prefetch_item`) while the current one travels.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], max_chunk_size: int, shared: SerializedOnce | None = None):
        self.groups, self.shared = group_keys(tensors), shared
        self._ahead: dict[int, Future] = {}
        self._ahead_lock = threading.Lock()
        super().__init__(tensors, max_chunk_size)

    def get_item_count(self) -> int:
        return len(self.groups)

    def get_item_size(self, index: int) -> int | None:
        tensors = self.base_obj
        return None if tensors is None else sum(nbytes(tensors[k]) for k in self.groups[index])

    def _serialize(self, index: int, ahead: bool = False) -> bytes | memoryview:
        tensors = self.base_obj
        if tensors is None:
            raise RuntimeError(f"item {index} requested after the tensors were released")
        item = {key: tensors[key] for key in self.groups[index]}
        return serialize(item) if self.shared is None else self.shared.get(item, ahead)

    def produce_item(self, index: int) -> bytes | memoryview:
        with self._ahead_lock:
            ahead = self._ahead.pop(index, None)
        return ahead.result() if ahead is not None else self._serialize(index)

    def prefetch_item(self, index: int) -> None:
        if self.base_obj is None:
            return
        if self.shared is not None:  # into the shared bytes, where every download finds it
            stream_thread_pool.submit(self._serialize, index, True)
            return
        with self._ahead_lock:
            if index not in self._ahead:
                self._ahead[index] = stream_thread_pool.submit(self._serialize, index)

    def release(self) -> None:
        with self._ahead_lock:
            ahead, self._ahead = list(self._ahead.values()), {}
        for future in ahead:
            future.cancel()
        super().release()


class GroupedTensorDecomposer(TensorDecomposer):
    """NVFlare's tensor decomposer, sending tensors grouped into items (`GroupedTensorDownloadable`)."""

    shared: SerializedOnce | None = None

    def to_downloadable(self, items: dict, max_chunk_size: int, fobs_ctx: dict) -> GroupedTensorDownloadable:
        return GroupedTensorDownloadable(items, max_chunk_size, self.shared)


class _SharedTensorDecomposer(GroupedTensorDecomposer):
    shared = SERIALIZED


def serialize_once_for_all_sites() -> bool:
    """Have this process's tensor downloads send grouped items and share their serialized bytes (`SERIALIZED`); call
    it before NVFlare registers its own tensor decomposer (FOBS keeps the first). False where another one was
    registered first."""
    fobs.register(_SharedTensorDecomposer())
    return isinstance(fobs.get_dot_handler(dots.TENSOR_DOWNLOAD), _SharedTensorDecomposer)
