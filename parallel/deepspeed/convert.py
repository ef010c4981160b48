"""A DeepSpeed checkpoint of the deepspeed engine → fp32 GPTModel weights.

DeepSpeed's own ``zero_to_fp32`` rebuilds the fp32 master weights from the ZeRO partitions of
every data-parallel rank (stages 1-3; stage 0 with bf16 keeps them the same way). Its public entry
reads every ``*_optim_states.pt`` of a directory, i.e. every tensor-parallel rank's at once; here
its steps run on the files of one TP rank. A stage-0 fp32/fp16 save holds the whole module in
``mp_rank_XX_model_states.pt``; that is read directly.

DeepSpeed's files are pickles (``torch.load(weights_only=False)``): read only checkpoints you
trust. The checkpointer checks every file's size and CRC-32 against our manifest first.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import torch

from gptforge.parallel.engine import CheckpointError

TAG = "deepspeed"
RECORD_FILE = "gptforge_deepspeed.json"


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_record(state_dir: Path) -> dict:
    """Our record of a deepspeed-engine save (stage, DP/TP size, step), written beside it."""
    path = Path(state_dir) / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{state_dir}: no {RECORD_FILE}: not saved by the deepspeed engine "
                              f"(a megatron-engine checkpoint loads with parallel.engine=megatron)"
                              ) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable: {err}") from None
    for key in ("zero_stage", "dp_size", "tp_size"):
        if not isinstance(record.get(key), int):
            raise CheckpointError(f"{path}: no {key!r}")
    return record


def write_record(state_dir: Path, record: dict) -> Path:
    path = Path(state_dir) / RECORD_FILE
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def gpt_param_name(name: str) -> str:
    """A deepspeed-engine module name → the GPTModel's own (the megatron engine's key):
    ``model.`` (LossModel) and ``module.`` (Float16Module) dropped."""
    name = re.sub(r"^model\.", "", name)
    return re.sub(r"^module\.", "", name)


def _files(ds_dir: Path, pattern: str) -> list[str]:
    return sorted((str(p) for p in ds_dir.glob(pattern)), key=_natural)


@contextlib.contextmanager
def _quiet():
    """zero_to_fp32 prints progress lines and a tqdm bar."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _zero_state_dict(ds_dir: Path, tp_rank: int, stage: int) -> dict:
    from gptforge.parallel.deepspeed.compat import import_deepspeed

    import_deepspeed()
    from deepspeed.utils import zero_to_fp32 as z

    mp = f"mp_rank_{tp_rank:02d}"
    model_files = _files(ds_dir, f"*{mp}_model_states.pt")
    optim_files = _files(ds_dir, f"*{mp}_optim_states.pt")
    if stage == 3:
        model_files = [f for f in model_files if Path(f).name.startswith("zero_pp_rank_")]
    if not model_files or not optim_files:
        raise CheckpointError(f"{ds_dir}: no DeepSpeed model/optimizer files of TP rank "
                              f"{tp_rank} (*{mp}_model_states.pt, *{mp}_optim_states.pt)")
    with _quiet():
        model_states = z.parse_model_states(model_files)
        zero_stage, world_size, flat_groups, paddings = z.parse_optim_states(optim_files, ds_dir)
        if zero_stage <= 2:
            state = z._get_fp32_state_dict_from_zero2_checkpoint(
                world_size, flat_groups, model_states, False, paddings)
        else:
            state = z._get_fp32_state_dict_from_zero3_checkpoint(
                world_size, flat_groups, model_states, False)
        return z.to_torch_tensor(state)


def _module_state_dict(ds_dir: Path, tp_rank: int) -> dict:
    path = ds_dir / f"mp_rank_{tp_rank:02d}_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}


def fp32_state_dict(state_dir: str | Path, *, tp_rank: int = 0) -> dict[str, torch.Tensor]:
    """The GPTModel state dict (fp32 weights, this TP rank's shard) of a deepspeed-engine save
    in ``state_dir`` (any ZeRO stage and data-parallel size)."""
    state_dir = Path(state_dir)
    record = read_record(state_dir)
    if tp_rank >= record["tp_size"]:
        raise CheckpointError(f"{state_dir}: has {record['tp_size']} tensor-parallel ranks, "
                              f"asked for rank {tp_rank}")
    ds_dir = state_dir / TAG
    if not ds_dir.is_dir():
        raise CheckpointError(f"{ds_dir}: missing (not a deepspeed-engine save)")
    has_partitions = bool(_files(ds_dir, f"*mp_rank_{tp_rank:02d}_optim_states.pt"))
    try:
        if record["zero_stage"] >= 1 or has_partitions:
            state = _zero_state_dict(ds_dir, tp_rank, record["zero_stage"])
        else:
            state = _module_state_dict(ds_dir, tp_rank)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (DeepSpeed raises ValueError/KeyError/... on bad files)
        raise CheckpointError(f"{ds_dir}: cannot rebuild the fp32 weights: {e}") from e
    return {gpt_param_name(k): v for k, v in state.items()}
