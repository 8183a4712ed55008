"""Checkpoint files as data: written atomically in their own folder, read with ``weights_only`` and checked plain.

Writing (:func:`save_atomic`, and :class:`AtomicCheckpointIO`, the trainer's ``plugins`` in
conf/trainer/default.yaml). Why not Lightning's own ``TorchCheckpointIO``: it writes through an fsspec transaction whose temporary file lies in
the system temp folder (``tempfile.mkstemp()`` without ``dir``) and is then *moved* onto the checkpoint. When /tmp is
another file system (usual on clusters: local /tmp, shared checkpoints) the move is a copy that truncates the old
checkpoint first, so a full disk or a kill mid-copy destroys it; a full /tmp fails a save that had room, and the
error names the temporary file. Here the temporary file sits next to the checkpoint and is renamed over it (and
fsynced): the previous checkpoint stays intact until the new one is complete, and a failed write raises the OSError
with the checkpoint's name (``error: <ckpt>: No space left on device; ...``).

Reading (:func:`safe_load`): ``torch.load(weights_only=True)``, then every value checked to be plain data. Lightning
checkpoints written with OmegaConf objects in their hyper-parameters are read with exactly those OmegaConf container
classes allow-listed (still no arbitrary code).
"""

from __future__ import annotations

import collections
import io
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from liverfusion.errors import CheckpointError
from liverfusion.utils.atomic import atomic_write_bytes


def _is_local(path: _PATH) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` via a temporary file in the same folder, renamed into place and fsynced."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getbuffer(), durable=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are same-folder temp + rename; remote URLs keep Lightning's way."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        text = str(path)
        save_atomic(checkpoint, text.removeprefix("file://"))


def _omegaconf_globals() -> list[Any]:
    """The classes a pickled OmegaConf container needs; nothing that executes code on load."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    # the builtin types appear as type references (a node's ref_type / key_type), not as calls
    return [
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        typing.Any,
        collections.defaultdict,
        dict,
        list,
        int,
        float,
        str,
        bool,
    ]


def _unsafe_payload(exc: BaseException) -> bool:
    text = str(exc)
    return "Unsupported global" in text or "Unsupported class" in text


def safe_load(path: str | Path) -> Any:
    """Read a checkpoint or encoder file as data: ``torch.load(weights_only=True)`` on CPU, then every metadata
    value checked to be plain (see ``checkpoint_data``). A missing, corrupt, pickled-object or interpolating file is
    one CheckpointError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # torch raises UnpicklingError, RuntimeError, ... for unsafe or corrupt files
        if "omegaconf" not in str(first):
            raise _load_error(path, first) from None
        try:  # Lightning checkpoints of older runs hold OmegaConf containers: exactly those classes allowed
            with torch.serialization.safe_globals(_omegaconf_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _load_error(path, exc) from None
    return checkpoint_data(obj, path)


def _load_error(path: Path, exc: BaseException) -> CheckpointError:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    first = next((ln.strip() for ln in lines if "Unsupported" in ln), lines[0])[:200]
    if _unsafe_payload(exc):
        return CheckpointError(
            f"{path}: holds pickled Python objects that only an unsafe load would build ({first}); refused: "
            "checkpoints are read as data (weights and plain values), never as code",
            fix="use a checkpoint written by liverfusion, or re-save its state_dict with torch.save",
        )
    return CheckpointError(
        f"{path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: {first}); is it "
        "truncated or another kind of file?"
    )


_PLAIN = (torch.Tensor, int, float, bool, bytes, type(None), torch.dtype, torch.device)


def checkpoint_data(obj: Any, path: str | Path, key: str = "") -> Any:
    """``obj`` as plain data: OmegaConf containers become dicts/lists *without* resolving them, and any string
    holding an interpolation (``${...}``) is refused, so no value read from a file is ever resolved as config (a
    ``${oc.env:...}`` or a custom resolver would run at that point)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, str):
        if "${" in obj:
            raise CheckpointError(
                f"{path}: {key or 'a value'} holds an interpolation ({obj[:60]!r}): checkpoint metadata is data, "
                "never config; refused",
                fix="use a checkpoint written by liverfusion, unedited",
            )
        return obj
    if isinstance(obj, DictConfig | ListConfig):
        obj = OmegaConf.to_container(obj, resolve=False)
    if isinstance(obj, Mapping):
        out = type(obj)() if isinstance(obj, dict) else {}
        for k, v in obj.items():
            name = f"{key}.{k}" if key else str(k)
            out[checkpoint_data(k, path, name) if isinstance(k, str) else k] = checkpoint_data(v, path, name)
        return out
    if isinstance(obj, list | tuple):
        items = [checkpoint_data(v, path, f"{key}[{i}]") for i, v in enumerate(obj)]
        return (
            tuple(items)
            if isinstance(obj, tuple) and not isinstance(obj, torch.Size)
            else (torch.Size(items) if isinstance(obj, torch.Size) else items)
        )
    if isinstance(obj, set | frozenset):
        return type(obj)(checkpoint_data(v, path, key) for v in obj)
    raise CheckpointError(f"{path}: {key or 'a value'} is a {type(obj).__name__}, not plain data; refused")
