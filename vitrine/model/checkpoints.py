"""Trained weights: `vitrine train` writes a *delta* checkpoint on top of "offline" (only the
tensors training changed, fp16, plus the fusion module); plain checkpoints load through
open_clip's own loader."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from vitrine.errors import ModelSpecError
from vitrine.model.fusion import GatedFusion
from vitrine.model.spec import OFFLINE, checkpoint_path, is_checkpoint

DELTA_FORMAT = "vitrine-delta/1"  # the marker of a checkpoint that `vitrine train` wrote


def save_delta(
    path: Path, model: torch.nn.Module, trained: Sequence[str], fusion: GatedFusion | None,
    mirror_average: bool = False,
) -> None:
    """Write what training changed (the `trained` state-dict prefixes, and the fusion module)
    as fp16 on top of "offline", and round the in-memory tensors the same way, so the model in
    hand and the one loaded back from `path` give identical vectors. `mirror_average`: the
    weights were trained for pictures encoded as the mean of them and their mirror image, so
    the flag travels with them (and, being in the file, changes the model id)."""
    parts: dict[str, Any] = {"model": _rounded_state(model, trained)}
    if mirror_average:
        parts["mirror_average"] = True
    if fusion is not None:
        parts["fusion"] = _rounded_state(fusion, ("",))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": DELTA_FORMAT, "base": OFFLINE, **parts}, path)


def _rounded_state(module: torch.nn.Module, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in module.state_dict().items():
        if key.startswith(tuple(prefixes)):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())  # the state dict shares the live storage
                state[key] = tensor.detach().half().cpu()
            else:
                state[key] = tensor.detach().cpu()
    return state


def read_delta(weights: str | None) -> dict[str, Any] | None:
    """The content of a delta checkpoint, or None for any other weights."""
    if weights is None or not is_checkpoint(weights):
        return None
    path = checkpoint_path(weights)
    if path.suffix not in (".pt", ".pth"):
        return None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises a variety of errors for a foreign file
        raise ModelSpecError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(content, dict) or content.get("format") != DELTA_FORMAT:
        return None
    return content


def apply_delta(
    model: torch.nn.Module, fusion: GatedFusion | None, delta: dict[str, Any], name: str
) -> None:
    """Overwrite the tensors the delta carries; every one must exist with the same shape."""
    targets = [(model, delta.get("model", {}), "model")]
    if "fusion" in delta:
        if fusion is None:
            raise ModelSpecError(f"checkpoint {name} has a fusion module; the architecture none")
        targets.append((fusion, delta["fusion"], "fusion"))
    for module, tensors, part in targets:
        state = module.state_dict()
        for key, value in tensors.items():
            if key not in state or state[key].shape != value.shape:
                raise ModelSpecError(f"checkpoint {name}: {part} tensor {key} does not fit")
            state[key].copy_(value.to(state[key].dtype))


def load_checkpoint(open_clip: ModuleType, model: torch.nn.Module, path: str) -> None:
    """open_clip's own loader: plain state dicts, {"state_dict": ...} and "module." prefixes."""
    try:
        open_clip.load_checkpoint(model, path, strict=True)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise ModelSpecError(f"checkpoint {path} does not fit the architecture: {exc}") from exc
