"""How a state dict travels between the server and the sites: tensors over `PART_BYTES` go as row ranges.

NVFlare sends each tensor of a state dict as one item: the sender serializes the whole tensor into one buffer, the
receiver gathers all its stream frames before it writes the tensor out. For the 2B model's 622 MB token embedding
these are 622 MB buffers, fresh memory each time (above glibc's largest mmap threshold, see host_memory), several at
once on the server while three sites download or upload. Sent as row ranges of at most 24 MiB (views, no copy), every
buffer on the way is as small as the model's ordinary matrices. The bytes sent are the same.

A part's key is the tensor's name and its rows, `name#rows=START:STOP`. `split` makes them, `join` gathers them back
under the tensor's name: the tensor they are views of when they are (the server's global model), else a `Parts` that
copies its pieces into a tensor one by one (a site loading the received weights) or materializes them.
"""

from __future__ import annotations

from typing import Any

import torch

from model import materialize, tensor_shape

PART_BYTES = 24 * 2**20  # job.py's --part_mb default (a test keeps them equal)
_ROWS = "#rows="


def split(state: dict[str, Any], part_bytes: int = PART_BYTES) -> dict[str, Any]:
    """`state` with each contiguous tensor over `part_bytes` replaced by views of its row ranges; 0: unchanged."""
    out = {}
    for name, value in state.items():
        nbytes = value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
        if part_bytes <= 0 or nbytes <= part_bytes or value.dim() == 0 or not value.is_contiguous():
            out[name] = value
            continue
        row_bytes = max(1, nbytes // value.shape[0])
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
