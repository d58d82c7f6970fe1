"""Caches that make CPU training practical: frozen-trunk activations and frozen text vectors.

The image trunk is frozen up to `block`; its activations at the input of that block are
computed once per product (fp16, `.npy`) and training runs only the blocks after it. The text
tower is frozen entirely, so every caption is embedded once. Both live under the cache dir
(never in the repository), keyed by the architecture and by what was computed, and the trunk
cache is resumable: an interrupted extraction continues where it stopped.

Covered by tests/training/test_train.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from vitrine.model import DualEncoder
from vitrine.training.data import Product

EXTRACT_BATCH = 256
SAVE_EVERY = 16  # text batches between saves of the text cache


def _digest(items: Sequence[object]) -> str:
    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()[:12]


def weights_key(module: torch.nn.Module) -> str:
    """Names a frozen tower by its weights, so caches are shared by every config that has it."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def trunk_stem(trunk: Any, pixels: torch.Tensor, block: int) -> torch.Tensor:
    """The frozen part of the EfficientNet trunk: stem and blocks[:block]."""
    hidden = trunk.bn1(trunk.conv_stem(pixels))
    for stage in trunk.blocks[:block]:
        hidden = stage(hidden)
    return hidden


def trunk_activations(
    encoder: DualEncoder, products: Sequence[Product], block: int, cache_dir: Path,
    mirrored: bool = False,
) -> np.ndarray:
    """(n, C, H, W) fp16 activations at the input of trunk block `block`, one row per product.

    Images go through the encoder's own preprocessing, so the cache sees what serving sees;
    `mirrored`: of the horizontally mirrored pictures (an augmentation that keeps colour).
    """
    trunk = encoder.model.visual.trunk.eval()
    preprocessing = json.dumps(encoder.model.visual.preprocess_cfg, sort_keys=True, default=str)
    key = f"trunk-{weights_key(trunk)}-{_digest([preprocessing])}-block{block}-" + _digest(
        [p.id for p in products]
    ) + ("-mirrored" if mirrored else "")
    path = cache_dir / "features" / f"{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial, progress = path.with_suffix(".partial.npy"), path.with_suffix(".progress")
    shape = _activation_shape(encoder, block)
    done = int(progress.read_text()) if progress.is_file() and partial.is_file() else 0
    out = np.lib.format.open_memmap(
        partial, mode="r+" if done else "w+", dtype=np.float16, shape=(len(products), *shape)
    )
    desc = "mirrored trunk features" if mirrored else "trunk features"
    with tqdm(total=len(products), initial=done, desc=desc, unit="img") as bar:
        for start in range(done, len(products), EXTRACT_BATCH):
            chunk = products[start : start + EXTRACT_BATCH]
            images = [_open(p.image) for p in chunk]
            if mirrored:
                images = [ImageOps.mirror(image) for image in images]
            pixels = encoder.preprocess_images(images).to(encoder.device)
            with torch.inference_mode():
                hidden = trunk_stem(trunk, pixels.contiguous(memory_format=torch.channels_last),
                                    block)
            out[start : start + len(chunk)] = hidden.float().cpu().numpy().astype(np.float16)
            out.flush()
            progress.write_text(str(start + len(chunk)))
            bar.update(len(chunk))
    del out
    partial.replace(path)
    progress.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


def _activation_shape(encoder: DualEncoder, block: int) -> tuple[int, ...]:
    probe = torch.zeros((1, 3, *encoder.preprocess_images([Image.new("RGB", (8, 8))]).shape[2:]))
    with torch.inference_mode():
        return tuple(trunk_stem(encoder.model.visual.trunk, probe.to(encoder.device), block)
                     .shape[1:])


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def load_images(paths: Sequence[Path]) -> list[Image.Image]:
    """Decoded RGB images (the fashion pictures are 60x80: all of a split fits in memory)."""
    return [_open(path) for path in tqdm(paths, desc="images", unit="img", leave=False)]


class TextVectors:
    """Frozen text-tower vectors of strings, cached on disk and grown on demand."""

    def __init__(self, encoder: DualEncoder, cache_dir: Path) -> None:
        self._encoder = encoder
        base = cache_dir / "text" / f"text-{weights_key(encoder.model.text)}"
        self._texts_path, self._vectors_path = base / "texts.json", base / "vectors.npy"
        self._index: dict[str, int] = {}
        self._vectors = np.zeros((0, encoder.dim), dtype=np.float16)
        if self._texts_path.is_file() and self._vectors_path.is_file():
            texts = json.loads(self._texts_path.read_text())
            self._vectors = np.load(self._vectors_path)
            self._index = {text: row for row, text in enumerate(texts[: len(self._vectors)])}

    def ensure(self, texts: Sequence[str], batch: int = 1024) -> None:
        """Embed and store every text not cached yet (saved after each batch: resumable)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._index))
        missing.sort(key=len)  # similar lengths share a batch: less padding to compute
        if not missing:
            return
        step = batch * SAVE_EVERY
        with tqdm(total=len(missing), desc="text vectors", unit="text") as bar:
            for start in range(0, len(missing), step):
                chunk = missing[start : start + step]
                parts = []
                for offset in range(0, len(chunk), batch):
                    parts.append(self._encoder.encode_texts(chunk[offset : offset + batch]))
                    bar.update(len(parts[-1]))
                self._index.update({t: len(self._index) + i for i, t in enumerate(chunk)})
                self._vectors = np.concatenate([self._vectors, *parts]).astype(np.float16)
                self._save()

    def rows(self, texts: Sequence[str]) -> np.ndarray:
        """Row numbers of `texts` in `matrix` (call `ensure` first)."""
        return np.fromiter((self._index[t] for t in texts), dtype=np.int64, count=len(texts))

    @property
    def matrix(self) -> np.ndarray:
        return self._vectors

    def _save(self) -> None:
        self._texts_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(self._vectors_path, self._vectors)
        self._texts_path.write_text(json.dumps(list(self._index)))
