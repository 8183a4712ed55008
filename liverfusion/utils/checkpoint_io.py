"""Checkpoints written atomically in their own folder (the trainer's ``plugins`` in conf/trainer/default.yaml).

Why not Lightning's own ``TorchCheckpointIO``: it writes through an fsspec transaction whose temporary file lies in
the system temp folder (``tempfile.mkstemp()`` without ``dir``) and is then *moved* onto the checkpoint. When /tmp is
another file system (usual on clusters: local /tmp, shared checkpoints) the move is a copy that truncates the old
checkpoint first, so a full disk or a kill mid-copy destroys it; a full /tmp fails a save that had room, and the
error names the temporary file. Here the temporary file sits next to the checkpoint and is renamed over it (and
fsynced): the previous checkpoint stays intact until the new one is complete, and a failed write raises the OSError
with the checkpoint's name (``error: <ckpt>: No space left on device; ...``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

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
