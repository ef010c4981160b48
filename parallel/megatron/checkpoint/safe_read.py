"""Reading a checkpoint without unpickling anything: ``.metadata`` through a restricted
unpickler, ``common.pt`` and every tensor item through ``torch.load(weights_only=True)`` after a
CRC-32 check of every zip record (``torch.load`` itself does not check them)."""

from __future__ import annotations

import contextlib
import io
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from gptforge.common.patching import TESTED, Patches
from gptforge.parallel.engine import CheckpointError
from gptforge.parallel.megatron.checkpoint.state import COMMON_FILE, METADATA_FILE


def _allowed_globals() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed = {}
    for module, names in (
        (metadata, ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                    "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                    "_MEM_FORMAT_ENCODING")),
        (planner, ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
        (filesystem, ("_StorageInfo", "_StoragePrefix")),
    ):
        for name in names:
            if hasattr(module, name):
                allowed[(module.__name__, name)] = getattr(module, name)
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    import collections
    import pathlib

    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath
    allowed[("pathlib", "PurePosixPath")] = pathlib.PurePosixPath
    try:  # placeholders megatron defines to read older checkpoints' metadata
        from megatron.core.dist_checkpointing.strategies import torch as mtorch

        for name in ("MCoreMetadata", "MCoreSavePlan"):
            if hasattr(mtorch, name):
                allowed[(mtorch.__name__, name)] = getattr(mtorch, name)
    except ImportError:
        pass
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata classes and a few torch/builtin values; refuses anything else."""

    _allowed: dict | None = None

    def find_class(self, module, name):
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _allowed_globals()
        try:
            return _MetadataUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def read_metadata(directory) -> Any:
    """DCP's ``.metadata`` through the restricted unpickler; CheckpointError names the file."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(directory) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete checkpoint)") from None
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or unsafe: {e}") from e
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{path}: not a torch.distributed.checkpoint index")
    return md


def _check_zip(raw: bytes, where: str) -> None:
    """Verify every record's CRC-32 of a torch.save zip (torch.load does not).

    torch.save stores records uncompressed: the CRC is computed straight over the bytes in
    place (zipfile's own testzip reads each record through Python-level buffers, ~3x slower).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            infos = zf.infolist()
            if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
                bad = zf.testzip()
            else:
                view, bad = memoryview(raw), None
                for info in infos:
                    header = info.header_offset
                    if raw[header:header + 4] != b"PK\x03\x04":
                        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
                    name_len = int.from_bytes(raw[header + 26:header + 28], "little")
                    extra_len = int.from_bytes(raw[header + 28:header + 30], "little")
                    start = header + 30 + name_len + extra_len
                    end = start + info.compress_size
                    if end > len(raw) or zlib.crc32(view[start:end]) != info.CRC:
                        bad = info.filename
                        break
    except Exception as e:
        raise CheckpointError(f"{where}: corrupted ({e})") from e
    if bad is not None:
        raise CheckpointError(f"{where}: corrupted (CRC mismatch in record {bad})")


def _reason(e: Exception) -> str:
    """The line of torch's weights-only refusal that names the global; else the first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "global" in line.split(" ", 3)[:3]:
            return line
    return lines[0][:300] if lines else type(e).__name__


def _safe_torch_load(raw: bytes, where: str):
    _check_zip(raw, where)
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{where}: refused or unreadable ({_reason(e)})") from e


def read_common(directory) -> dict:
    """``common.pt`` with ``weights_only=True`` after a CRC check; CheckpointError names it."""
    path = Path(directory) / COMMON_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete checkpoint)") from None
    common = _safe_torch_load(raw, str(path))
    if not isinstance(common, dict):
        raise CheckpointError(f"{path}: not a state dict")
    return common


def _make_safe_reader(metadata):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.futures import Future

    class SafeFileSystemReader(FileSystemReader):
        """FileSystemReader that never unpickles: restricted ``.metadata``, CRC-checked,
        weights-only items (DCP's own reader uses a bare ``pickle.load`` for the index and
        ``torch.load(weights_only=False)`` for byte items)."""

        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            from torch.distributed._shard._utils import narrow_tensor_by_index

            per_file: dict[str, list] = {}
            for item in plan.items:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path,
                                    []).append(item)
            for relative_path, items in per_file.items():
                path = Path(self.path) / relative_path
                try:
                    f = open(path, "rb")
                except OSError as e:
                    raise CheckpointError(f"{path}: missing shard file ({e.strerror})") from e
                with f:
                    for item in sorted(items, key=lambda r: self.storage_data[
                            r.storage_index].offset):
                        info = self.storage_data[item.storage_index]
                        where = f"{path} (item {item.storage_index.fqn})"
                        if info.transform_descriptors:
                            raise CheckpointError(f"{where}: unsupported storage transform "
                                                  f"{info.transform_descriptors}")
                        f.seek(info.offset)
                        raw = f.read(info.length)
                        if len(raw) != info.length:
                            raise CheckpointError(f"{where}: truncated ({len(raw)} of "
                                                  f"{info.length} bytes)")
                        value = _safe_torch_load(raw, where)
                        if item.type == LoadItemType.BYTE_IO:
                            _assign_bytes_item(planner, item, value)
                            continue
                        if not isinstance(value, torch.Tensor):
                            raise CheckpointError(f"{where}: not a tensor")
                        value = narrow_tensor_by_index(value, item.storage_offsets, item.lengths)
                        target = planner.resolve_tensor(item).detach()
                        if target.size() != value.size():
                            raise CheckpointError(f"{where}: size {tuple(value.size())}, "
                                                  f"expected {tuple(target.size())}")
                        target.copy_(value)
                        planner.commit_tensor(item, target)
            fut: Future = Future()
            fut.set_result(None)
            return fut

    return SafeFileSystemReader


def _assign_bytes_item(planner, item, value) -> None:
    """DefaultLoadPlanner.load_bytes without its ``torch.load(weights_only=False)``."""
    from torch.distributed.checkpoint._nested_dict import set_element

    fqn = item.dest_index.fqn
    if getattr(planner, "flatten_state_dict", False):
        set_element(planner.original_state_dict, planner.mappings[fqn], value)
    else:
        planner.state_dict[fqn] = value


@contextlib.contextmanager
def _swap(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


_STRATEGIES = "megatron.core.dist_checkpointing.strategies"
# What the safe reading overrides or swaps in megatron and DCP: a method renamed upstream would
# leave the unsafe original in use, so each is checked before a load (common/patching.py).
UPSTREAM = Patches("safe checkpoint reading", "megatron-core", TESTED["megatron-core"])
for _target in (f"{_STRATEGIES}.torch:_get_filesystem_reader",
                f"{_STRATEGIES}.torch:TorchDistLoadShardedStrategy.load",
                f"{_STRATEGIES}.torch:TorchDistLoadShardedStrategy.load_tensors_metadata",
                f"{_STRATEGIES}.torch:TorchDistLoadShardedStrategy.load_sharded_metadata",
                f"{_STRATEGIES}.common:TorchCommonLoadStrategy.load_common",
                f"{_STRATEGIES}.common:TorchCommonLoadStrategy.load_sharded_objects"):
    UPSTREAM.add(_target.rsplit(":", 1)[1], _target)
DCP_READER = Patches("safe checkpoint reading", "torch", TESTED["torch"])
for _method in ("read_metadata", "read_data"):
    DCP_READER.add(_method, f"torch.distributed.checkpoint:FileSystemReader.{_method}")


def safe_strategies(metadata, common):
    from megatron.core.dist_checkpointing.strategies import torch as mtorch
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    UPSTREAM.check()
    DCP_READER.check()

    reader_cls = _make_safe_reader(metadata)

    def get_reader(checkpoint_dir, cache_metadata=False):
        return reader_cls(checkpoint_dir)

    class SafeLoadStrategy(mtorch.TorchDistLoadShardedStrategy):
        """megatron's torch_dist loading through ``SafeFileSystemReader``."""

        def load(self, sharded_state_dict, checkpoint_dir):
            with _swap(mtorch, "_get_filesystem_reader", get_reader):
                return super().load(sharded_state_dict, checkpoint_dir)

        def load_tensors_metadata(self, checkpoint_dir, metadata_=None):
            return super().load_tensors_metadata(checkpoint_dir, metadata_ or metadata)

        def load_sharded_metadata(self, checkpoint_dir):
            with _swap(mtorch, "_get_filesystem_reader", get_reader):
                return super().load_sharded_metadata(checkpoint_dir)

    class SafeCommonStrategy(TorchCommonLoadStrategy):
        """The ``common.pt`` read (weights-only, CRC-checked) before the load."""

        def load_common(self, checkpoint_dir):
            return dict(common)

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            raise CheckpointError(f"{checkpoint_dir}: per-object .pt files are not supported")

    return SafeLoadStrategy(), SafeCommonStrategy()
