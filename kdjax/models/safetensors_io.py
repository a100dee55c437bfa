"""Minimal safetensors reading and streaming writing on NumPy memory maps.

Reading memory-maps each tensor (no copy until a slice is taken), so a loader can copy
one device shard of one tensor at a time. Writing streams tensor by tensor into
files capped at `max_shard_size` bytes, with the `model.safetensors.index.json` that
transformers expects when there is more than one file. Format:
https://github.com/huggingface/safetensors#format (8-byte little-endian header length,
JSON header, raw little-endian data). bf16 goes through ml_dtypes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _read_header(file: Path) -> tuple[dict, int]:
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} has a corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a transformers checkpoint directory (single or indexed)."""
    directory = Path(directory)
    if (directory / INDEX).exists():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        files = sorted({directory / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{INDEX} in {directory} lists shard files that do not "
                                    f"exist: {missing}")
        return files
    if (directory / SINGLE).exists():
        return [directory / SINGLE]
    found = sorted(p.name for p in directory.glob("*"))
    raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {directory} (found {found}); kdjax "
                            "reads safetensors checkpoints only (convert .bin with "
                            "transformers' save_pretrained(safe_serialization=True))")


def open_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Name → read-only memory-mapped array for every tensor in the checkpoint."""
    tensors = {}
    for file in checkpoint_files(directory):
        header, data_start = _read_header(file)
        size = file.stat().st_size
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise ValueError(f"tensor {name!r} in {file} has dtype {info['dtype']}, "
                                 f"which kdjax cannot read (supported: {sorted(DTYPES)})")
            begin, end = info["data_offsets"]
            dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
            if end - begin != dtype.itemsize * int(np.prod(shape)) or data_start + end > size:
                raise ValueError(f"tensor {name!r} in {file}: data offsets {begin}..{end} do "
                                 f"not fit shape {shape} {info['dtype']} in a {size}-byte file "
                                 "(truncated or corrupt checkpoint)")
            if int(np.prod(shape)) == 0:
                tensors[name] = np.zeros(shape, dtype)
                continue
            tensors[name] = np.memmap(file, dtype=dtype, mode="r", offset=data_start + begin,
                                      shape=shape)
    return tensors


def write_tensors(directory: str | os.PathLike,
                  specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                  produce: Callable[[str], np.ndarray], *,
                  max_shard_size: int = 4 << 30) -> list[Path]:
    """Writes tensors (name, shape, dtype) in order, asking `produce(name)` for each one
    only when it is written, so at most one tensor is in host memory."""
    directory = Path(directory)
    specs = [(n, tuple(s), np.dtype(d)) for n, s, d in specs]
    groups, size = [[]], 0
    for spec in specs:
        nbytes = spec[2].itemsize * int(np.prod(spec[1]))
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    names = ([SINGLE] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for name, group in zip(names, groups):
        _write_file(directory / name, group, produce)
    if len(groups) > 1:
        weight_map = {spec[0]: name for name, group in zip(names, groups) for spec in group}
        total = sum(s[2].itemsize * int(np.prod(s[1])) for s in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX).write_text(json.dumps(index, indent=2))
    return [directory / n for n in names]


def _write_file(file: Path, group, produce) -> None:
    header, offset = {}, 0
    for name, shape, dtype in group:
        nbytes = dtype.itemsize * int(np.prod(shape))
        header[name] = {"dtype": CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the reference writer does
    tmp = file.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in group:
            array = np.ascontiguousarray(produce(name), dtype=dtype)
            if array.shape != shape:
                raise ValueError(f"tensor {name!r}: produced shape {array.shape}, declared "
                                 f"{shape}")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
