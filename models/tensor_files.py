"""Weight files opened for their shapes, read tensor by tensor: nothing is read until a tensor is asked for.

A release file is large (a 10 GB LLM shard, the 2 GB ViT, the 2.75 GB Lynx checkpoint). Opening one reads only its
index (a .safetensors header; the pickle of a .pt/.pth/.bin zip file, loaded on the meta device, which gives each
tensor's offset in the file); each tensor is then read by itself with positioned reads, so a load holds at most one
tensor in host memory besides the model. A memory map of a whole file would instead count every page read in the
process's resident memory until the last tensor taken from that file is released. The exception is a file whose
tensors are used as they are (a converted folder in the run's dtype, on the CPU): those are mapped, and the model's
tensors are the file's pages.

Reading allocates as few host buffers as it can, and reuses them: glibc serves an allocation under its mmap
threshold (which rises to 32 MiB once such a buffer is freed) from its heap, and the hole a freed buffer leaves
there is not reused by the next aligned allocation of the same size, so a fresh buffer per chunk stayed resident,
hole after hole, between the model's tensors (up to 0.86 GB besides a 3.3 GB model and the imports in
benchmarks/load_benchmark.py).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
from dataclasses import dataclass
from typing import Callable

import torch

from errors import InputError, described
from models.weight_files import WEIGHT_SOURCES

CHUNK = 32 << 20  # bytes read at once when a tensor changes dtype or device on its way from the file
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor's shape and dtype, and how to produce it on a device in a dtype (`make(device, dtype)`); a tensor
    read from a file can also be read into a given tensor (`fill`), which then is the only copy."""

    shape: torch.Size
    dtype: torch.dtype
    make: Callable[[torch.device, torch.dtype], torch.Tensor]
    fill: Callable[[torch.Tensor], None] | None = None

    def load(self, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.make(torch.device(device), dtype or self.dtype)

    def into(self, out: torch.Tensor) -> None:
        """Write the tensor's values into `out` (its shape; any device and dtype)."""
        if self.fill is not None:
            self.fill(out)
        else:
            out.copy_(self.make(out.device, out.dtype))

    @staticmethod
    def of(tensor: torch.Tensor) -> "LazyTensor":
        return LazyTensor(tensor.shape, tensor.dtype, lambda device, dtype: tensor.to(device=device, dtype=dtype))

    @staticmethod
    def cat(parts: list["LazyTensor"]) -> "LazyTensor":
        """Parts concatenated along the first dimension (EVA's fused qkv from q, k and v)."""
        shape = torch.Size([sum(p.shape[0] for p in parts), *parts[0].shape[1:]])
        return LazyTensor(shape, parts[0].dtype, lambda device, dtype: torch.cat([p.make(device, dtype) for p in parts]))


def open_weight_file(path: str, what: str, mapped: bool = False):
    """The file's content with a LazyTensor for every tensor (a .pt may wrap its state dict in other dicts).
    `mapped`: tensors of a .safetensors file are views of a memory map of the file (see the module's docstring)."""
    if not os.path.isfile(path):
        raise InputError(f"weight file not found: {path} — get {WEIGHT_SOURCES[what]}")
    try:
        content = _safetensors_entries(path, mapped) if path.endswith(".safetensors") else _torch_entries(path)
    except InputError:
        raise
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found is None:  # not a pickle of tensors at all (torch words this as a weights_only failure too)
            raise InputError(f"{path}: cannot read this weight file ({_unpickler_detail(err)})") from None
        raise InputError(
            f"{path}: refused: it holds the Python object {found.group(1)}, and loading that would execute pickled "
            f"code, which is not allowed (weights_only=True). Re-save the file as a plain dict of tensors or as "
            f".safetensors."
        ) from None
    except Exception as err:  # truncated or not a weight file at all
        raise InputError(f"{path}: cannot read this weight file ({described(err)})") from None
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(content).__name__}")
    return content


def _unpickler_detail(err: Exception) -> str:
    """The one informative line of torch's long weights_only message (e.g. 'Unsupported operand 110')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Please file an issue",
                                                              "Check the documentation"))]
    return useful[-1] if useful else (lines[0] if lines else type(err).__name__)


# ---- .safetensors: an 8-byte header length, a JSON header (dtype, shape, byte range of each tensor), the bytes


def safetensors_header(path: str) -> tuple[dict, int]:
    """(header, offset of the first tensor's bytes) of a .safetensors file; header['__metadata__'] holds its notes."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > os.path.getsize(path):
            raise ValueError("header length beyond the end of the file")
        header = json.loads(f.read(length))
    return header, 8 + length


def safetensors_metadata(path: str) -> dict:
    return safetensors_header(path)[0].get("__metadata__", {})


def _safetensors_entries(path: str, mapped: bool) -> dict:
    header, start = safetensors_header(path)
    size = os.path.getsize(path)
    storage = [None]  # the file's memory map, made on the first mapped read

    def entry(info: dict) -> LazyTensor:
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], torch.Size(info["shape"])
        begin, end = (start + o for o in info["data_offsets"])
        if end > size:
            raise InputError(f"{path}: the file ends before its tensors do (truncated?)")

        def fill(out):
            _read_into(out, path, begin, dtype)

        def make(device, out_dtype):
            if mapped and device.type == "cpu" and out_dtype == dtype and begin % dtype.itemsize == 0:
                if storage[0] is None:
                    storage[0] = torch.UntypedStorage.from_file(path, False, size)
                flat = torch.empty(0, dtype=torch.uint8).set_(storage[0], begin, (end - begin,), (1,))
                return flat.view(dtype).view(shape)
            out = torch.empty(shape, device=device, dtype=out_dtype)
            fill(out)
            return out

        return LazyTensor(shape, dtype, make, fill)

    return {key: entry(info) for key, info in header.items() if key != "__metadata__"}


# ---- torch's zip format (.pt, .pth, .bin): the pickle loaded on the meta device gives each storage's offset


def _torch_entries(path: str):
    with open(path, "rb") as f:
        is_zip = torch.serialization._is_zipfile(f)
    if not is_zip:  # the legacy format has no index of offsets: read whole, once
        return _wrap(torch.load(path, map_location="cpu", weights_only=True), LazyTensor.of)
    content = torch.load(path, map_location="meta", weights_only=True)
    size = os.path.getsize(path)

    def entry(meta: torch.Tensor) -> LazyTensor:
        item = meta.dtype.itemsize
        begin = meta.untyped_storage()._checkpoint_offset + meta.storage_offset() * item
        span = 1 + sum((n - 1) * s for n, s in zip(meta.shape, meta.stride())) if meta.numel() else 0
        if begin + span * item > size:
            raise InputError(f"{path}: the file ends before its tensors do (truncated?)")
        shape, stride, dtype = meta.shape, meta.stride(), meta.dtype

        def fill(out):
            if meta.is_contiguous():
                _read_into(out, path, begin, dtype)
            else:  # a view saved with its whole storage (rare): read the span, then pick the view's values
                out.copy_(_read(path, begin, span * item).view(dtype).as_strided(shape, stride))

        def make(device, out_dtype):
            out = torch.empty(shape, device=device, dtype=out_dtype)
            fill(out)
            return out

        return LazyTensor(shape, dtype, make, fill)

    return _wrap(content, entry)


def _wrap(content, entry):
    if isinstance(content, torch.Tensor):
        return entry(content)
    if isinstance(content, dict):
        return {key: _wrap(value, entry) for key, value in content.items()}
    return content


# ---- reading


def _read(path: str, offset: int, nbytes: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """`nbytes` bytes of the file from `offset`, into `out` (uint8, contiguous) or a fresh host tensor."""
    out = torch.empty(nbytes, dtype=torch.uint8) if out is None else out
    view, done = memoryview(out.numpy()), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise InputError(f"{path}: the file ends before its tensors do (truncated?)")
            done += got
    return out


def _read_into(out: torch.Tensor, path: str, offset: int, dtype: torch.dtype) -> None:
    """Read a contiguous tensor stored as `dtype` at `offset` into `out` (any device and dtype). On the CPU, when the
    two dtypes are as wide (float16 to bfloat16), the bytes land in `out` and are converted there; otherwise CHUNK
    bytes at a time pass through one buffer (not one per chunk: see the module's docstring). So reading a tensor
    never holds a second copy of it."""
    flat = out.view(-1)
    if out.device.type == "cpu" and out.is_contiguous() and out.dtype.itemsize == dtype.itemsize:
        _read(path, offset, flat.numel() * dtype.itemsize, flat.view(torch.uint8))
        if out.dtype != dtype:
            flat.copy_(flat.view(dtype))  # in place: every value is read before its own bytes are written
        return
    item = dtype.itemsize
    step = max(1, CHUNK // item)
    buffer = torch.empty(min(step, flat.numel()) * item, dtype=torch.uint8)
    for start in range(0, flat.numel(), step):
        count = min(step, flat.numel() - start)
        flat[start:start + count].copy_(_read(path, offset + start * item, count * item,
                                              buffer[:count * item]).view(dtype))


# ---- writing


def write_safetensors(path: str, tensors: dict, dtype: torch.dtype | None = None, metadata: dict | None = None) -> int:
    """Write LazyTensors as one .safetensors file, each made on the CPU (in `dtype` if given) and written before the
    next is made: the host never holds more than one. Written to `path`.partial, then renamed. Returns its size."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    dtypes = {key: dtype or value.dtype for key, value in tensors.items()}
    order = sorted(tensors, key=lambda key: -dtypes[key].itemsize)  # wider types first: every tensor aligned
    header, offset = {}, 0
    for key in order:
        nbytes = tensors[key].shape.numel() * dtypes[key].itemsize
        header[key] = {"dtype": names[dtypes[key]], "shape": list(tensors[key].shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key in order:
            tensor = tensors[key].load("cpu", dtypes[key])
            if tensor.shape != tensors[key].shape:
                raise AssertionError(f"{key}: made {tuple(tensor.shape)}, planned {tuple(tensors[key].shape)}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    os.replace(partial, path)
    return os.path.getsize(path)
