"""What crosses between the driver and the actors: tensors as NumPy arrays.

Ray serialises a NumPy array as a raw buffer beside the pickle (pickle protocol 5, out of band),
and a reader gets it without a copy. A torch tensor has no such path: it is pickled through
torch's own reducer, which writes its storage into a byte stream and reads it back, for every
tensor of every call. A step moves a rollout batch from a worker and the training batch's parts
to the learners, several tensors each, so the driver and the actors pack them as arrays
(`to_wire`) and unpack them on arrival (`from_wire`); the weights do the same
(`pack_weights`). bf16, which NumPy lacks, travels as its 16-bit pattern.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


@dataclasses.dataclass
class Packed:
    """One tensor as a NumPy array (bf16 as int16) and the name of its torch dtype."""

    array: np.ndarray
    dtype: str


def pack_tensor(tensor: torch.Tensor) -> Packed:
    """`tensor` on the host as an array; a GPU tensor is copied to the host first."""
    tensor = tensor.detach().cpu().contiguous()
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return Packed(raw.numpy(), str(tensor.dtype).removeprefix("torch."))


def unpack_tensor(packed: Packed, copy: bool = True) -> torch.Tensor:
    """`pack_tensor` undone. copy: a tensor of its own, which the reader may write to; without it,
    the tensor shares the array's memory (in Ray's object store: read-only)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(packed.array.copy() if copy else packed.array)
    return tensor.view(torch.bfloat16) if packed.dtype == "bfloat16" else tensor


@dataclasses.dataclass
class WireBatch:
    """A batch dataclass (`RolloutBatch`, `TrainBatch`) with its tensor fields packed."""

    kind: type
    fields: dict[str, Any]


def to_wire(value: Any) -> Any:
    """A tensor, or a dataclass whose fields hold tensors, with every tensor packed; other values as
    they are."""
    if isinstance(value, torch.Tensor):
        return pack_tensor(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return WireBatch(type(value), {name: pack_tensor(v) if isinstance(v, torch.Tensor) else v
                                       for name, v in fields.items()})
    return value


def from_wire(value: Any) -> Any:
    """`to_wire` undone: the tensors are the reader's own (writable) copies."""
    if isinstance(value, Packed):
        return unpack_tensor(value)
    if isinstance(value, WireBatch):
        return value.kind(**{name: from_wire(v) for name, v in value.fields.items()})
    return value


def pack_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, np.ndarray, str]]:
    """The weight contract's (name, tensor) pairs as (name, array, dtype) for Ray's object store."""
    return [(name, packed.array, packed.dtype) for name, packed in ((n, pack_tensor(t)) for n, t in weights)]


def unpack_weights(packed: list[tuple[str, np.ndarray, str]]) -> list[tuple[str, torch.Tensor]]:
    """`pack_weights` undone, without a copy: the tensors share the object store's read-only memory,
    which the engines only read (they copy into their own parameters)."""
    return [(name, unpack_tensor(Packed(array, dtype), copy=False)) for name, array, dtype in packed]
