"""Reading and writing checkpoint files: safetensors only, validated before anything is read, written atomically.

A safetensors file is: 8 bytes little-endian N, then N bytes of JSON header {name: {dtype, shape, data_offsets}},
then the raw tensor bytes; offsets are relative to the end of the header. We parse and check the header ourselves
(length, JSON, dtypes, shapes, offsets inside the file) so that a truncated download, a pickle renamed to
.safetensors or a corrupted header ends in one CheckpointError that names the file and what is wrong, before a
single tensor is read. Tensors are then read lazily, one at a time, through the safetensors library (memory-mapped,
read-only): a 16 GB checkpoint never sits in host memory twice, and input files are never opened for writing.

`Checkpoint` is the one read interface for a single file, a sharded set (diffusers' `*.safetensors.index.json`),
or a key-prefixed view of either (e.g. the `first_stage_model.` part of a Stability single file).
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, InputError, OutputExistsError, list_keys

# safetensors dtype names -> torch dtypes (float8 exists from torch 2.1).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
ITEMSIZE = {k: torch.tensor([], dtype=v).element_size() for k, v in DTYPES.items()}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


class SafeFile:
    """One validated .safetensors file. keys(), shape(k), dtype(k) read only the header; get(k) reads one tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise CheckpointError(f"{self.path}: is a folder, not a .safetensors file (a diffusers folder is read with "
                                  f"open_folder; pass the model root to load_mmdit / load_pipeline)")
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:  # read-only, always
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: {size} bytes is too short to be a safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    hint = " (a PyTorch .ckpt/.pt pickle? convert it to safetensors first)" if head[:2] == b"PK" else ""
                    raise CheckpointError(f"{self.path}: not a safetensors file, or truncated: its header length {n} "
                                          f"runs past the end of the {size}-byte file{hint}")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read the file ({e.strerror or e})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            what = "nested too deeply" if isinstance(e, RecursionError) else e
            raise CheckpointError(f"{self.path}: corrupted safetensors header (not valid JSON: {what}); the file is "
                                  f"damaged or not a safetensors file") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupted safetensors header (JSON is not an object)")
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise CheckpointError(f"{self.path}: corrupted safetensors header (__metadata__ must map str to str)")
        data_len = size - 8 - n
        for name, info in header.items():
            self._check_entry(name, info, data_len)
        self._check_layout(header, data_len)
        self.header: dict[str, dict] = header
        self.metadata: dict[str, str] = meta
        self._handle = None

    def _check_entry(self, name: str, info, data_len: int) -> None:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{where}: corrupted header entry {str(info)[:80]}")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {str(dt)[:40]!r} (minisd35 reads {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise CheckpointError(f"{where}: corrupted shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{where}: corrupted data_offsets {offs!r}")
        if offs[1] - offs[0] != math.prod(shape) * ITEMSIZE[dt]:
            raise CheckpointError(f"{where}: data_offsets {offs} do not match shape {shape} of {dt}")
        if offs[1] > data_len:
            raise CheckpointError(f"{where}: data runs past the end of the file ({offs[1]} > {data_len} data bytes): "
                                  f"the file is truncated; download it again")

    def _check_layout(self, header: dict, data_len: int) -> None:
        """The safetensors format stores the tensors back to back in header order of their offsets: no gap, no
        overlap, nothing after the last one. The library refuses anything else when it opens the file; checking it
        here says which tensors are at fault, before anything is read."""
        end, prev = 0, None
        for name, info in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
            start, stop = info["data_offsets"]
            if start != end:
                what = "overlaps" if start < end else f"leaves a gap of {start - end} bytes after"
                after = f"tensor {prev!r}" if prev is not None else "the start of the data"
                raise CheckpointError(f"{self.path}: corrupted header: tensor {name!r} (bytes {start}..{stop}) {what} "
                                      f"{after}; the file is damaged")
            end, prev = stop, name
        if end != data_len:
            raise CheckpointError(f"{self.path}: {data_len - end} bytes after the last tensor that no header entry "
                                  f"describes; the file is damaged (or two files were concatenated)")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.header[key]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        if key not in self.header:
            raise CheckpointError(f"{self.path}: has no tensor {key!r}")
        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            return self._handle.get_tensor(key)
        except Exception as e:  # the library found something our header check did not (overlapping offsets, ...)
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r}: {e}") from None

    def __repr__(self) -> str:
        return f"SafeFile({str(self.path)!r}, {len(self.header)} tensors)"


class Checkpoint:
    """Read-only view over one or more SafeFiles (shards), optionally restricted to keys under a prefix (stripped)."""

    def __init__(self, files: list[SafeFile], prefix: str = "", name: str | None = None):
        self.files = files
        self.prefix = prefix
        self.name = name or (str(files[0].path) if len(files) == 1 else str(files[0].path.parent))
        self._where: dict[str, SafeFile] = {}
        for f in files:
            for k in f.keys():
                if k.startswith(prefix):
                    self._where[k[len(prefix):]] = f

    @property
    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in self.files:
            out.update(f.metadata)
        return out

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(self.prefix + key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(self.prefix + key)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise CheckpointError(f"{self.name}: has no tensor {self.prefix + key!r}")
        return self._where[key].get(self.prefix + key)

    def sub(self, prefix: str) -> Checkpoint:
        """The part of this checkpoint under `prefix` (e.g. 'first_stage_model.'), with the prefix stripped."""
        return Checkpoint(self.files, self.prefix + prefix, self.name)

    def nbytes(self) -> int:
        return sum(math.prod(self.shape(k)) * self.dtype(k).itemsize for k in self._where)

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {len(self)} tensors, prefix={self.prefix!r})"


def open_file(path: str | os.PathLike) -> Checkpoint:
    return Checkpoint([SafeFile(path)])


def open_folder(folder: str | os.PathLike, stem: str) -> Checkpoint:
    """A diffusers component folder: `{stem}.safetensors`, or shards listed in `{stem}.safetensors.index.json`.
    `stem` is 'diffusion_pytorch_model' for transformer/ and vae/, 'model' for text encoders."""
    folder = Path(folder)
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: corrupted shard index ({e})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) named in {index.name} are missing: {list_keys(missing)}; "
                                  f"download them again")
        ck = Checkpoint([SafeFile(folder / s) for s in shards], name=str(folder))
        absent = [k for k, s in weight_map.items() if k not in ck]
        if absent:
            raise CheckpointError(f"{folder}: {len(absent)} tensors listed in {index.name} are not in their shards: "
                                  f"{list_keys(absent)}")
        return ck
    if single.is_file():
        return Checkpoint([SafeFile(single)], name=str(single))
    fp16 = folder / f"{stem}.fp16.safetensors"
    if fp16.is_file():
        return Checkpoint([SafeFile(fp16)], name=str(fp16))
    found = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
    raise CheckpointError(f"{folder}: expected {single.name} or {index.name}; found {list_keys(found) or 'nothing'}")


def check_finite(name: str, key: str, t: torch.Tensor, original: torch.Tensor | None = None) -> None:
    """Weights with NaN/Inf give black images many steps later; report the tensor at load time instead. `t` is the
    tensor after its cast to the compute dtype; `original`, the tensor as read from the file, tells a damaged file
    (bad values in the file) from an overflowing cast (finite in the file, too large for the dtype asked: float16)."""
    if t.dtype in FP8_DTYPES:
        if t.dtype == torch.float8_e4m3fn:
            bad = int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())  # E4M3FN has no Inf; S.1111.111 is NaN
        else:
            bad = int((~torch.isfinite(t.float())).sum())
        if bad:
            raise CheckpointError(f"{name}: tensor {key!r} has {bad} NaN codes in its {t.dtype} data; the file is "
                                  f"damaged or was quantized without clamping (re-quantize it, clamping to +-448)")
    elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
        finite = ~torch.isfinite(t)
        n, first = int(finite.sum()), [int(i) for i in finite.nonzero()[0]]
        where = f"{name}: tensor {key!r} {list(t.shape)}"
        if original is not None and original.dtype != t.dtype and original.is_floating_point() \
                and original.dtype not in FP8_DTYPES and bool(torch.isfinite(original).all()):
            raise CheckpointError(f"{where}: {n} values (first at index {first}) overflow {t.dtype} (largest "
                                  f"{torch.finfo(t.dtype).max:g}) when cast from the file's {original.dtype}; load in "
                                  f"torch.bfloat16 or torch.float32 instead")
        raise CheckpointError(f"{where} holds {n} NaN/Inf values (first at index {first}) in the file; the weights "
                              f"are damaged: download or convert them again")


def atomic_path(dest: str | os.PathLike, force: bool = False) -> Path:
    dest = Path(dest)
    if dest.is_dir():
        raise InputError(f"{dest} is a folder; give a file name to write")
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest} exists; pass force=True (--force) to overwrite it, or choose another name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def write_atomic(dest: str | os.PathLike, write, force: bool = False, suffix: str = ".tmp") -> Path:
    """Call write(tmp_path) on a temporary file in dest's folder, flush it to disk, then rename it into place. A
    failure midway (exception, Ctrl-C) leaves no partial file at dest and removes the temporary one. Without force
    the final step is a hard link, which fails if dest appeared meanwhile: even a race never overwrites a file."""
    dest = atomic_path(dest, force)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    except OSError as e:
        raise InputError(f"cannot write {dest}: {e.strerror} (is the folder writable?)") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # the data is on disk before the name points at it (no empty file after a crash)
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)
            except FileExistsError:
                raise OutputExistsError(f"{dest} was created by someone else while it was being written; nothing "
                                        f"was overwritten (pass --force to overwrite)") from None
            except OSError:  # a filesystem without hard links: rename, after one last look
                if dest.exists():
                    raise OutputExistsError(f"{dest} exists; pass --force to overwrite it") from None
                os.replace(tmp, dest)
    except OSError as e:
        if isinstance(e, OutputExistsError):
            raise
        raise InputError(f"cannot write {dest}: {e.strerror or e} (disk full? the temporary file was removed and "
                         f"nothing was written)") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def save_safetensors(tensors: dict[str, torch.Tensor], dest: str | os.PathLike, metadata: dict[str, str] | None = None,
                     force: bool = False) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_atomic(dest, lambda tmp: save_file(tensors, tmp, metadata=metadata), force=force)


# ---------------------------------------------------------------------------------------------------------------------
# What is in a file? Tell an MMDiT from a VAE, a CLIP, a T5 or an all-in-one file by a few marker keys.

MARKERS = {  # component -> (key suffix that only it has)
    "mmdit": ("x_embedder.proj.weight", "pos_embed.proj.weight"),
    "vae": ("decoder.conv_in.weight",),
    "t5": ("encoder.block.0.layer.0.SelfAttention.q.weight",),
    "clip": ("text_model.embeddings.token_embedding.weight",),
}
PREFIXES = {  # where the Stability / ComfyUI single files put each component
    "mmdit": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}


def detect_components(keys: Iterable[str]) -> dict[str, str]:
    """{component: key prefix} for every component found, e.g. {'mmdit': 'model.diffusion_model.', 'vae':
    'first_stage_model.'} for a Stability single file, {'t5': ''} for t5xxl_fp16.safetensors. CLIP files are told
    apart by width in `describe`; here they are 'clip'."""
    found: dict[str, str] = {}
    for k in keys:
        for comp, suffixes in MARKERS.items():
            for s in suffixes:
                if k.endswith(s):
                    prefix = k[: -len(s)]
                    if comp == "clip":
                        comp = {v: c for c, v in PREFIXES.items()}.get(prefix, "clip")
                    found.setdefault(comp, prefix)
    return found


def describe_component(comp: str) -> str:
    return {"mmdit": "an MMDiT (diffusion transformer)", "vae": "a VAE", "t5": "a T5-XXL text encoder",
            "clip": "a CLIP text encoder", "clip_l": "a CLIP-L text encoder", "clip_g": "a CLIP-G text encoder"}[comp]
