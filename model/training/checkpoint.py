"""Training checkpoints with no pickle anywhere: safetensors for tensors, JSON for everything else.

A checkpoint is a folder::

    state.json              format tag, step, extra (JSON), which parts are present
    hyper_config.json       the HyperConfig (when given)
    model.safetensors       the hypernetwork's state_dict
    optimizer.safetensors   optimizer state tensors, flattened;  optimizer.json: the structure and scalars
    scheduler.safetensors   (same for the LR scheduler; usually no tensors)   scheduler.json
    rng.safetensors         torch CPU / CUDA generator states (uint8), numpy's key;  rng.json: python's

Nested dicts / lists / tuples are kept exactly (int keys, tuples) by a small JSON encoding in which each
tensor is a reference into the safetensors file. Writes are atomic: everything goes to a temporary sibling
folder that is renamed into place (an existing checkpoint is moved aside first, then removed).
Loading never unpickles and never calls ``torch.load``: a ``.pt`` / ``.bin`` / pickle file is refused.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from storage.fsutil import atomic_folder

FORMAT = "doc2lora-checkpoint"
VERSION = 1
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".tar", ".zip"}


class UnsafeCheckpointError(ValueError):
    """The path holds a pickle-based checkpoint (torch.save / pickle), which we never load."""


# -- nested state <-> (JSON, flat tensors)
def _encode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalar
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (only tensors and JSON values)")


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        raise ValueError(f"malformed checkpoint structure: {sorted(obj)}")
    return obj


def _save_state(folder: Path, name: str, state: Any) -> None:
    tensors: dict[str, Tensor] = {}
    structure = _encode(state, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(structure))


def _load_state(folder: Path, name: str, device: str | torch.device = "cpu") -> Any:
    tensors = load_file(str(folder / f"{name}.safetensors"), device=str(device))
    return _decode(json.loads((folder / f"{name}.json").read_text()), tensors)


# -- RNG
def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch_cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"][: torch.cuda.device_count()])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


# -- files
def atomic_folder_write(dest: str | Path, write) -> Path:
    """Call ``write(tmp_folder)``, then move the folder to `dest` (replacing any previous one)."""
    with atomic_folder(dest) as tmp:
        write(tmp)
    return Path(dest)


def refuse_pickle(path: str | Path) -> None:
    """Raise UnsafeCheckpointError if `path` is, or (a folder) holds, a pickle / torch.save file.

    A folder is refused when any file in it looks like one (by suffix, or by a pickle / zip magic in a
    file that is not .safetensors / .json), even a complete doc2lora checkpoint with one planted in it.
    """
    path = Path(path)
    files = [path] if path.is_file() else list(path.glob("*"))
    for f in files:
        head = b""
        if f.is_file() and f.suffix.lower() not in (".safetensors", ".json"):
            with open(f, "rb") as fh:
                head = fh.read(2)
        if f.suffix.lower() in PICKLE_SUFFIXES or head[:1] == b"\x80" or head == b"PK":
            raise UnsafeCheckpointError(
                f"{f} looks like a pickle / torch.save file; doc2lora never unpickles (arbitrary code "
                "execution). Convert it to safetensors in a trusted environment first."
            )


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    config: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    save_rng: bool = True,
) -> Path:
    """Write a checkpoint folder atomically; `config` is a HyperConfig or a JSON-able dict."""

    def write(tmp: Path) -> None:
        parts = ["model"]
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        if config is not None:
            cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            (tmp / "hyper_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
            if obj is not None:
                _save_state(tmp, name, obj.state_dict())
                parts.append(name)
        if save_rng:
            _save_state(tmp, "rng", rng_state())
            parts.append("rng")
        meta = {"format": FORMAT, "version": VERSION, "step": int(step), "extra": extra or {}, "parts": parts}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))

    return atomic_folder_write(folder, write)


def load_checkpoint(
    folder: str | Path,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore what is given from a checkpoint folder; returns {"step", "extra", "config", "state_dict"}."""
    folder = Path(folder)
    refuse_pickle(folder)
    if not (folder / "state.json").exists():
        raise FileNotFoundError(f"{folder} is not a doc2lora checkpoint (no state.json)")
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}: unknown checkpoint format {meta.get('format')!r}")
    state_dict = load_file(str(folder / "model.safetensors"), device=str(map_location))
    if model is not None:
        model.load_state_dict(state_dict, strict=True)
    parts = set(meta.get("parts", []))
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None:
            if name not in parts:
                raise ValueError(f"{folder} has no {name} state")
            obj.load_state_dict(_load_state(folder, name, map_location))
    if restore_rng and "rng" in parts:
        set_rng_state(_load_state(folder, "rng"))
    cfg_path = folder / "hyper_config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    return {"step": meta["step"], "extra": meta.get("extra", {}), "config": config, "state_dict": state_dict}


def load_hypernet(folder: str | Path, map_location: str | torch.device = "cpu"):
    """A HyperNetwork rebuilt from a checkpoint's hyper_config.json and model.safetensors."""
    from model.hypernet.config import HyperConfig
    from model.hypernet.network import HyperNetwork

    folder = Path(folder)
    refuse_pickle(folder)
    net = HyperNetwork(HyperConfig.load(folder))
    net.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(map_location)), strict=True)
    return net.to(map_location)
