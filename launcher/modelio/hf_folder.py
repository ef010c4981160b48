"""A Hugging Face model folder on disk: read (config.json + safetensors or .bin weights) and
write (safetensors, config.json, generation_config.json, tokenizer files).

Reading does not import transformers: the weights are read with safetensors (or ``torch.load``
with ``weights_only=True`` for ``pytorch_model.bin``), so no pickled code runs, and GPT-2 files
with or without the ``transformer.`` prefix and with the old attention-mask buffers
(``h.N.attn.bias``, ``attn.masked_bias``) are accepted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from gptforge.common.durable import umask_mode
from gptforge.model.config import ModelConfig
from gptforge.common.errors import ConfigError
from gptforge.model.hf_config import from_hf_config
from gptforge.parallel.engine import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class HFFolderError(CheckpointError):
    """A Hugging Face folder that cannot be read as GPT-2 or Llama; names the file or key."""


@dataclass
class HFModel:
    path: Path
    arch: str  # gpt2 | llama
    config: dict  # config.json
    model: ModelConfig  # our model section for it
    state: dict[str, torch.Tensor]  # normalised names (see _normalise)


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def read_config(path: Path) -> tuple[dict, str, ModelConfig]:
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise HFFolderError(f"{config_path}: unreadable: {err}") from None
    try:
        arch, model = from_hf_config(config, str(config_path))
    except ConfigError as err:
        raise HFFolderError(str(err)) from None
    return config, arch, model


def _weight_files(path: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        if not (path / name).is_file():
            continue
        if name.endswith(".index.json"):
            index = json.loads((path / name).read_text())
            return [path / f for f in sorted(set(index["weight_map"].values()))]
        return [path / name]
    raise HFFolderError(f"{path}: no weights ({' or '.join(WEIGHT_FILES[::2])})")


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                state.update(load_file(str(file)))
            else:
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as err:  # noqa: BLE001 (any unreadable file is named)
            raise HFFolderError(f"{file}: unreadable weights: {err}") from None
    return state


def _normalise(arch: str, state: dict, path: Path) -> dict:
    """GPT-2: ``transformer.``-prefixed names, no mask buffers, no tied ``lm_head``."""
    if arch != "gpt2":
        return state
    out = {}
    for key, value in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) and "c_attn" not in key:
            continue  # causal-mask buffers of old GPT-2 files
        if key != "lm_head.weight" and not key.startswith("transformer."):
            key = "transformer." + key
        out[key] = value
    head = out.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, out.get("transformer.wte.weight", head)):
        raise HFFolderError(f"{path}: lm_head.weight differs from wte.weight (GPT-2 ties them)")
    return out


def read_hf_folder(path: str | Path) -> HFModel:
    path = Path(path)
    if not path.is_dir():
        raise HFFolderError(f"{path}: not a directory")
    config, arch, model = read_config(path)
    state = _normalise(arch, _read_weights(_weight_files(path)), path)
    return HFModel(path, arch, config, model, state)


def check_keys(hf: HFModel, expected: dict) -> None:
    """Every tensor the conversion needs is there with the right shape, and nothing is left."""
    missing = sorted(set(expected) - set(hf.state))
    extra = sorted(set(hf.state) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise HFFolderError(f"{hf.path}: weights do not match its config.json ({what})")
    for key, shape in expected.items():
        if tuple(hf.state[key].shape) != tuple(shape):
            raise HFFolderError(f"{hf.path}: {key} has shape {tuple(hf.state[key].shape)}, "
                                f"config.json implies {tuple(shape)}")


def generation_config(token_ids: dict) -> dict:
    """generation_config.json as transformers writes it for a plain model: the special token ids
    that are set and no generation settings (a ``max_length`` there makes every
    ``generate(max_new_tokens=...)`` warn that both are set; config.json holds the context)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"_from_model_config": True, **{k: v for k, v in token_ids.items() if v is not None}}
    try:
        out["transformers_version"] = version("transformers")
    except PackageNotFoundError:
        pass
    return out


def write_hf_folder(out: Path, config: dict, state: dict, *, generation: dict) -> None:
    """Weights, config.json and generation_config.json (tokenizer files come separately), each
    with the mode the umask gives a new file."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights),
              metadata={"format": "pt"})
    umask_mode(weights)  # (save_file leaves it 0600)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """The tokenizer files of a Hugging Face folder, copied byte for byte (so that their hash,
    which shards record, stays the same); the names copied."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(src) / name, dst / name)
    return copied
