"""Checks on an untrusted checkpoint folder, made before anything is unpickled or allocated.

- every file is looked at by content, whatever its name: a pickle (any protocol, found by walking its opcodes
  without executing them) or a zip (torch.save) is refused;
- the safetensors header is read alone (8-byte length + JSON), its offsets checked against the file size;
- the network that `hyper_config.json` describes is built on PyTorch's `meta` device (no memory), and
  its tensor shapes must equal the header's before the real network is built.
"""

from __future__ import annotations

import json
import pickletools
import struct
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".tar", ".zip"}
MAX_HEADER = 100_000_000
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is (damaged, inconsistent, or unsafe)."""


class UnsafeCheckpointError(CheckpointError):
    """The path holds a pickle-based checkpoint (torch.save / pickle), which we never load."""


def looks_like_pickle(head: bytes) -> bool:
    """True if `head` (a file's first bytes) is a pickle of any protocol or a zip archive."""
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return True
    try:
        for opcode, _arg, _pos in pickletools.genops(head):
            if opcode.name == "STOP":
                return True
    except Exception:  # noqa: BLE001 - not a well-formed opcode stream (or cut short): not a whole pickle
        return False
    return False


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def refuse_pickle(path: str | Path) -> None:
    """Raise UnsafeCheckpointError if `path` is, or (a folder) holds anywhere below it, a pickle / torch.save
    file: by suffix, or by content in any file that is not a valid JSON or safetensors file."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(1 << 20)
        suspicious = f.suffix.lower() in PICKLE_SUFFIXES or looks_like_pickle(head)
        if suspicious and not (f.suffix.lower() == ".json" and _is_json(f)) and not _safetensors_ok(f):
            raise UnsafeCheckpointError(
                f"{f} looks like a pickle / torch.save file; doc2lora never unpickles (arbitrary code "
                "execution). Convert it to safetensors in a trusted environment first.")


def _safetensors_ok(path: Path) -> bool:
    try:
        safetensors_header(path)
        return True
    except CheckpointError:
        return False


def safetensors_header(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) from a safetensors file's header alone; offsets checked against the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short).")
        n = struct.unpack("<Q", raw)[0]
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path} is not a safetensors file (header length {n} exceeds the file).")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a mapping).")
    out, data = {}, size - 8 - n
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = spec["dtype"], [int(s) for s in spec["shape"]], spec["data_offsets"]
            count = 1
            for s in shape:
                count *= s
            ok = 0 <= start <= end <= data and end - start == count * DTYPE_BYTES.get(dtype, 0)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: the entry {name!r} of its header does not fit the file.")
        out[name] = (dtype, shape)
    return out


def expected_shapes(config: Any) -> dict[str, list[int]]:
    """The state_dict shapes of the HyperNetwork `config` describes, built on the meta device (no memory)."""
    import torch

    from model.hypernet.network import HyperNetwork

    with torch.device("meta"):
        net = HyperNetwork(config)
    return {k: list(v.shape) for k, v in net.state_dict().items()}


def check_hypernet_files(folder: str | Path, config: Any) -> None:
    """Refuse a checkpoint whose hyper_config.json does not describe the tensors in model.safetensors."""
    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} holds no model.safetensors.")
    header = safetensors_header(weights)
    if int(getattr(config, "depth", 0) or 0) > len(header):
        raise CheckpointError(f"{folder}/hyper_config.json says depth {config.depth}, but model.safetensors "
                              f"holds only {len(header)} tensors.")
    try:
        want = expected_shapes(config)
    except Exception as exc:  # noqa: BLE001 - a config the network cannot even be described from
        raise CheckpointError(f"{folder}/hyper_config.json does not describe a valid network: {exc}") from None
    missing = sorted(set(want) - set(header))
    extra = sorted(set(header) - set(want))
    wrong = sorted(k for k in set(want) & set(header) if want[k] != header[k][1])
    if missing or extra or wrong:
        detail = (f"{wrong[0]}: config {want[wrong[0]]} vs file {header[wrong[0]][1]}" if wrong else
                  f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}")
        raise CheckpointError(f"{folder}: hyper_config.json does not match model.safetensors "
                              f"({len(wrong)} shape(s) differ, {len(missing)} missing, {len(extra)} unexpected; "
                              f"{detail}). Refusing to build it.")
