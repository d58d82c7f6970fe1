"""What names a model: its spec (architecture + weights + seed) and the id of the vector space
it makes, and the text the product side reads.

A `ModelSpec` names an open_clip architecture (a built-in name, a config JSON path, a config
shipped in `vitrine/model/configs/`, or an `hf-hub:` name) plus weights (a pretrained tag, a
checkpoint file, "offline" or None). A bare checkpoint name is looked up in
`vitrine/model/weights/` first, where the default model ships.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from vitrine.errors import ModelSpecError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# The order in which a product's attributes follow its title in the text the product side reads.
ATTRIBUTE_ORDER = (
    "gender", "colour", "article_type", "usage", "season", "year", "sub_category",
    "master_category",
)
OFFLINE = "offline"
HF_HUB_PREFIX = "hf-hub:"
PYPI_PREFIX = "pypi:"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load: an open_clip architecture plus weights plus the init seed."""

    architecture: str
    weights: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.architecture or not isinstance(self.architecture, str):
            raise ModelSpecError("model architecture must be a non-empty string")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise ModelSpecError("model weights must be None or a non-empty string")

    @cached_property
    def model_id(self) -> str:
        """Names the vector space: equal ids promise equal vectors for equal inputs.

        Freshly initialised parts depend on the seed, so it is part of the id unless the weights
        are a fixed file; a file is named by a short content hash, never by its path.
        """
        arch = architecture_id(self.architecture)
        weights = self.weights
        if weights is None:
            return f"{arch}@random#{self.seed}"
        if weights == OFFLINE:
            return f"{arch}@{OFFLINE}#{self.seed}"
        if is_checkpoint(weights):
            path = checkpoint_path(weights)
            return f"{arch}@{path.stem}~{file_digest(path)}"
        return f"{arch}@{weights}"


def runtime_model_id(model_id: str, text_runtime: str) -> str:
    """A lossy text runtime is another vector space: its own id. Exact ones keep the spec's."""
    return f"{model_id}+{text_runtime}" if text_runtime == "onnx-int8" else model_id


def product_text(title: str, attributes: Mapping[str, str]) -> str:
    """The text the product side reads: the title, then the attribute values as one phrase.

    Shared by the encoder service and training, so both see the same text for the same event.
    """
    known = [key for key in ATTRIBUTE_ORDER if attributes.get(key)]
    extra = sorted(key for key in attributes if key not in ATTRIBUTE_ORDER and attributes[key])
    phrase = " ".join(attributes[key].strip() for key in known + extra)
    return ". ".join(part for part in (title.strip(), phrase) if part)


def config_file(architecture: str) -> Path | None:
    """The config JSON an architecture names, or None when it is one of open_clip's own names."""
    if architecture.startswith(HF_HUB_PREFIX):
        return None
    shipped = MODEL_CONFIG_DIR / f"{architecture}.json"
    if "/" not in architecture and os.sep not in architecture and shipped.is_file():
        return shipped
    if architecture.endswith(".json") or Path(architecture).expanduser().is_file():
        return existing_file(architecture, "model config")
    return None


def architecture_id(architecture: str) -> str:
    """The architecture part of a model id: shipped and open_clip names as they are, a config
    file by its stem plus a hash of its content (paths differ between machines)."""
    path = config_file(architecture)
    if path is None or path == MODEL_CONFIG_DIR / f"{architecture}.json":
        return architecture
    canonical = json.dumps(read_json(path), sort_keys=True).encode()
    return f"{path.stem}~{hashlib.sha256(canonical).hexdigest()[:12]}"


def checkpoint_path(weights: str) -> Path:
    """The file a checkpoint weights string names; a bare name may be one shipped in
    `vitrine/model/weights/` (so the default model works from any working directory)."""
    shipped = WEIGHTS_DIR / weights
    if "/" not in weights and os.sep not in weights and shipped.is_file():
        return shipped
    return existing_file(weights, "checkpoint")


def is_checkpoint(weights: str) -> bool:
    """A weights string is a file path when it looks like one; tags never contain a slash."""
    return (
        "/" in weights
        or os.sep in weights
        or weights.endswith(CHECKPOINT_SUFFIXES)
        or Path(weights).is_file()
    )


def existing_file(path: str, what: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise ModelSpecError(f"{what} file not found: {path}")
    return resolved


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"cannot read model config {path}: {exc}") from exc


def file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:12]
