"""`DualEncoder`: an open_clip model ready to encode pictures, texts and products on one device,
in its serving precision, with trimmed text padding and a preprocessing pool."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from vitrine.errors import ModelSpecError
from vitrine.model.fusion import GatedFusion
from vitrine.model.onnx_text import OnnxTextTower, TextRuntime
from vitrine.model.spec import runtime_model_id
from vitrine.settings import Precision

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL import Image

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_BATCH = 256  # bounds activation memory when a caller hands over a long list
# Poolers that read only the attention mask or token 0, so trailing padding cannot change them.
# open_clip's MaxPooler is excluded: it masks the real tokens instead of the padding (and fails
# on the integer mask it is given), so nothing about it is provably trim-safe.
TRIM_SAFE_POOLERS = ("MeanPooler", "ClsPooler", "ClsLastHiddenStatePooler")


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
        text_runtime: TextRuntime = "torch",
        compute_threads: int | None = None,
        mirror_average: bool = False,
    ) -> None:
        self.model = model
        self.fusion = fusion
        # A picture's vector is the mean of its own and its mirror image's: a garment's look
        # does not depend on which way it faces, and averaging both views measured +0.6
        # NDCG@10 for image-only products, for twice the image tower's work.
        self.mirror_average = mirror_average
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
        if text_runtime == "auto":
            cpu_fp32 = device.type == "cpu" and self.precision == "fp32"
            text_runtime = "onnx" if cpu_fp32 else "torch"
        self.model_id = runtime_model_id(model_id, text_runtime)
        self.device = device
        self.text_runtime = text_runtime
        self._onnx: OnnxTextTower | None = None
        if text_runtime != "torch":
            if device.type != "cpu" or self.precision != "fp32":
                raise ModelSpecError(
                    f"text runtime {text_runtime!r} serves fp32 on the CPU; this model is "
                    f"{self.precision} on {device.type} (use text runtime 'torch')"
                )
            if not isinstance(getattr(model, "text", None), torch.nn.Module):
                raise ModelSpecError(f"text runtime {text_runtime!r} needs a separate text "
                                     "tower (open_clip's CustomTextCLIP)")
            pad_id = int(getattr(model.text.config, "pad_token_id", 0) or 0)
            self._onnx = OnnxTextTower.of(
                model.text, text_runtime, model_id, pad_id, compute_threads
            )
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
        count = len(pixels)
        if self.mirror_average:  # one pass over both views
            pixels = torch.cat([pixels, pixels.flip(-1)])
        if self._channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if not self.mirror_average:
                return _normalised(self.model.encode_image(pixels))
            views = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
            return _normalised(views[:count] + views[count:])

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 text vectors, one row per text."""
        rows = []
        for start in range(0, len(texts), MAX_BATCH):
            tokens = self._tokenize(list(texts[start : start + MAX_BATCH])).to(self.device)
            if self._onnx is not None:
                rows.append(_normalised(self._onnx(tokens)))
                continue
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
