"""`vitrine train`: align the image tower to the frozen MiniLM text space, then learn fusion.

Stage 1 (domain fine-tuning): the image projection, the last `trainable_blocks` stages of the
EfficientNet trunk and its head conv learn, contrastively (InfoNCE with a learnable
temperature), to put a product's picture next to the text vectors of its captions: its title,
an attribute phrase ("Navy Blue Shirts") or both. The trunk below `feature_block` is frozen
and read from the feature cache, so an epoch over 31k products takes seconds on a CPU.
Stage 2 (fusion): the gated product-side module learns to combine the image vector with
whatever text the product has: the full text, the title, a degraded title (words dropped,
truncated, brand only, colour or type removed) or none. The query side is the text tower
alone throughout. Both stages keep the epoch with the best validation NDCG@10.

The output is a delta checkpoint (`vitrine.model.save_delta`) that loads through the same
model spec as the services use. Every epoch is checkpointed; a rerun with the same settings
resumes where it stopped.

Covered by tests/training/test_train.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from tqdm import tqdm

from vitrine.model import DualEncoder, ModelSpec, load_dual_encoder, product_text, save_delta
from vitrine.training.data import (
    Product,
    attribute_captions,
    degraded_titles,
    in_split,
    load_products,
)
from vitrine.training.features import TextVectors, trunk_activations

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "vitrine"
MAX_LOGIT_SCALE = math.log(100)
DEGRADED_PER_PRODUCT = 2


class TrainSettings(BaseSettings):
    """Everything a training run depends on; its digest names the run (and what resumes)."""

    model_config = SettingsConfigDict(env_prefix="VITRINE_TRAIN_", extra="ignore")

    data_dir: Path = Field(default=Path("../shared/data/fashion"), description="fashion dataset")
    cache_dir: Path = Field(default=DEFAULT_CACHE, description="feature caches and run state")
    out: Path | None = Field(default=None, description="checkpoint path (default: in cache_dir)")
    architecture: str = "vitrine-minilm-efflite0-fused"
    seed: int = 0
    limit: int | None = Field(default=None, ge=1, description="first N products (tests)")
    feature_block: int = Field(default=5, ge=1, le=7, description="cached trunk input block")
    trainable_blocks: int = Field(default=1, ge=0, description="last trunk stages to fine-tune")
    epochs: int = Field(default=6, ge=1)
    batch_size: int = Field(default=512, ge=8)
    lr: float = 1e-3
    trunk_lr: float = 2e-4
    weight_decay: float = 0.05
    fusion_epochs: int = Field(default=10, ge=0, description="0: no fusion (plain average)")
    fusion_lr: float = 1e-3
    fusion_image_weight: float = Field(
        default=0.5, ge=0, description="weight of the image-query loss: 'more like this' "
        "queries (an image alone) must still find the product behind its fused vector",
    )
    threads: int = Field(default=2, ge=1)
    device: str | None = None

    def run_dir(self) -> Path:
        blob = self.model_dump_json(exclude={"out", "threads", "device", "cache_dir"})
        return self.cache_dir / "runs" / hashlib.sha256(blob.encode()).hexdigest()[:12]

    def out_path(self) -> Path:
        return self.out or self.run_dir() / "model.pt"


@dataclass
class Captions:
    """Per product: rows (into the text cache) of its title, attribute phrases and both."""

    title: list[int | None]
    phrases: list[np.ndarray]
    both: list[int | None]
    title_ids: np.ndarray  # equal titles share an id: never negatives of each other

    def sample(self, rng: random.Random, weights: Sequence[float]) -> np.ndarray:
        """One caption row per product: title, attribute phrase or both, by `weights`."""
        out = np.empty(len(self.title), dtype=np.int64)
        for i in range(len(out)):
            kinds = [(w, k) for w, k in zip(weights, ("title", "phrase", "both"), strict=True)
                     if (k == "phrase" and len(self.phrases[i])) or
                     (k != "phrase" and getattr(self, k)[i] is not None)]
            kind = rng.choices([k for _, k in kinds], weights=[w for w, _ in kinds])[0]
            out[i] = (rng.choice(self.phrases[i].tolist()) if kind == "phrase"
                      else getattr(self, kind)[i])
        return out


def build_captions(products: Sequence[Product], texts: TextVectors) -> Captions:
    titles = [p.title or None for p in products]
    phrases = [attribute_captions(p) for p in products]
    boths = [product_text(p.title, p.attributes) if p.title and p.attributes else None
             for p in products]
    texts.ensure([t for t in titles if t] + [x for ps in phrases for x in ps]
                 + [b for b in boths if b])
    ids: dict[str, int] = {}
    return Captions(
        title=[int(texts.rows([t])[0]) if t else None for t in titles],
        phrases=[texts.rows(ps) for ps in phrases],
        both=[int(texts.rows([b])[0]) if b else None for b in boths],
        title_ids=np.array([ids.setdefault(p.title, len(ids)) for p in products]),
    )


def info_nce(
    left: torch.Tensor, right: torch.Tensor, logit_scale: torch.Tensor, same: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over normalised rows; `same[i, j]` pairs (i != j) are not negatives."""
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * left @ right.T
    eye = torch.eye(len(left), dtype=torch.bool, device=left.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    target = torch.arange(len(left), device=left.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def same_pairs(caption_rows: torch.Tensor, title_ids: torch.Tensor) -> torch.Tensor:
    """Pairs with equal captions or equal titles: one is a right answer for the other too."""
    return (caption_rows[:, None] == caption_rows[None, :]) | (
        title_ids[:, None] == title_ids[None, :]
    )


# --- the image tower above the cache ----------------------------------------------------------


class ImageTail(torch.nn.Module):
    """The image tower from the cached trunk block to the projected vector.

    `frozen` runs the stages that stay fixed (once, outside the training loop); `forward` the
    trainable rest. BatchNorm stays in eval mode: the ImageNet statistics are kept.
    """

    visual: Any  # open_clip's TimmModel: untyped

    def __init__(self, visual: Any, logit_scale: torch.nn.Parameter,
                 feature_block: int, trainable_blocks: int) -> None:
        super().__init__()
        self.visual = visual
        self.logit_scale = logit_scale  # the model's own temperature, trained with the tail
        self.first = feature_block
        self.split = len(visual.trunk.blocks) - trainable_blocks
        if self.split < feature_block:
            raise ValueError(
                f"trainable_blocks={trainable_blocks} reaches below the cached block "
                f"{feature_block}: lower feature_block"
            )

    def trained_prefixes(self) -> list[str]:
        """State-dict keys (of the open_clip model) this tail trains: what the delta carries."""
        blocks = [f"visual.trunk.blocks.{i}." for i in range(self.split, self.total)]
        head = ["visual.trunk.conv_head.", "visual.trunk.bn2."] if blocks else []
        return [*blocks, *head, "visual.head.", "logit_scale"]

    @property
    def total(self) -> int:
        return len(self.visual.trunk.blocks)

    def parameters_to_train(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """(trunk parameters, projection parameters), with requires_grad set accordingly."""
        trunk = self.visual.trunk
        trunk_params = [p for stage in trunk.blocks[self.split :] for p in stage.parameters()]
        if trunk_params:
            trunk_params += [*trunk.conv_head.parameters(), *trunk.bn2.parameters()]
        self.visual.requires_grad_(False)
        for param in [*trunk_params, *self.visual.head.parameters()]:
            param.requires_grad_(True)
        return trunk_params, list(self.visual.head.parameters())

    def frozen(self, hidden: torch.Tensor) -> torch.Tensor:
        trunk = self.visual.trunk
        for stage in trunk.blocks[self.first : self.split]:
            hidden = stage(hidden)
        if self.split == self.total:  # nothing of the trunk trains: pool here, once
            hidden = trunk.forward_head(trunk.bn2(trunk.conv_head(hidden)))
        return hidden

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        trunk = self.visual.trunk
        if self.split < self.total:
            for stage in trunk.blocks[self.split :]:
                hidden = stage(hidden)
            hidden = trunk.forward_head(trunk.bn2(trunk.conv_head(hidden)))
        return F.normalize(self.visual.head(hidden), dim=-1)


def _batches(n: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    for start in range(0, n - size // 2, size):  # the last short batch joins only if >= half
        yield order[start : start + size]


def _frozen_features(tail: ImageTail, acts: np.ndarray, rows: np.ndarray, device: torch.device
                     ) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(rows), 1024), desc="frozen blocks", leave=False):
            chunk = torch.from_numpy(np.asarray(acts[rows[start : start + 1024]], np.float32))
            out.append(tail.frozen(chunk.to(device)).half())
    return torch.cat(out)


def _image_vectors(tail: ImageTail, frozen: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([tail(frozen[s : s + 1024].float()) for s in range(0, len(frozen), 1024)]
                         ).cpu().numpy()


# --- validation: the eval's metrics on the validation split, from cached vectors -------------


class Validation:
    """NDCG@10 on the validation split for choosing epochs (the test split is never read)."""

    def __init__(self, products: Sequence[Product], texts: TextVectors) -> None:
        from vitrine.training.eval import CONDITIONS, build_queries, condition_texts, grades

        queries = build_queries(products)
        self._grades = grades(queries, products)
        query_texts = [query.text for query in queries]
        conditions = {c: condition_texts(products, c) for c in CONDITIONS}
        texts.ensure(query_texts + [t for ts in conditions.values() for t in ts if t.strip()])
        self._queries = _rows(texts, query_texts)
        self._conditions = {}
        for condition, product_texts in conditions.items():
            has_text = np.array([bool(t.strip()) for t in product_texts])
            vectors = np.zeros((len(product_texts), texts.matrix.shape[1]), dtype=np.float32)
            vectors[has_text] = _rows(texts, [t for t in product_texts if t.strip()])
            self._conditions[condition] = (vectors, has_text)

    def ndcg(self, product_vectors: np.ndarray) -> float:
        from vitrine.training.eval import retrieval_metrics

        scores = self._queries @ product_vectors.T
        return float(100 * retrieval_metrics(scores, self._grades)["ndcg@10"].mean())

    def fused_ndcg(self, fuse: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> float:
        """Mean NDCG@10 over the three conditions of `fuse(text_vectors, has_text)`."""
        return float(np.mean([self.ndcg(fuse(v, h)) for v, h in self._conditions.values()]))


def _rows(texts: TextVectors, strings: Sequence[str]) -> np.ndarray:
    vectors = texts.matrix[texts.rows(strings)].astype(np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Run:
    """What both stages share, prepared once (features, captions, the model to train)."""

    settings: TrainSettings
    encoder: DualEncoder
    texts: TextVectors
    train: list[Product]
    captions: Captions
    tail: ImageTail
    frozen_train: torch.Tensor
    frozen_val: torch.Tensor
    validation: Validation

    def text_tensor(self, rows: np.ndarray) -> torch.Tensor:
        vectors = torch.from_numpy(self.texts.matrix[rows].astype(np.float32))
        return F.normalize(vectors, dim=-1).to(self.encoder.device)


def prepare(settings: TrainSettings) -> Run:
    torch.set_num_threads(settings.threads)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_dual_encoder(
        ModelSpec(settings.architecture, "offline", settings.seed), device, precision="fp32"
    )
    products = load_products(settings.data_dir, settings.limit)
    acts = trunk_activations(encoder, products, settings.feature_block, settings.cache_dir)
    index = {split: np.array([i for i, p in enumerate(products) if p.split == split])
             for split in ("train", "val")}
    texts = TextVectors(encoder, settings.cache_dir)
    train = in_split(products, "train")
    captions = build_captions(train, texts)
    validation = Validation(in_split(products, "val"), texts)
    tail = ImageTail(encoder.model.visual, encoder.model.logit_scale, settings.feature_block,
                     settings.trainable_blocks)
    return Run(
        settings, encoder, texts, train, captions, tail,
        _frozen_features(tail, acts, index["train"], encoder.device),
        _frozen_features(tail, acts, index["val"], encoder.device),
        validation,
    )


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Stage:
    """One resumable training stage: epochs, a state file per epoch, the best epoch kept."""

    def __init__(self, name: str, run: Run, module: torch.nn.Module, epochs: int,
                 optimizer: torch.optim.Optimizer) -> None:
        self.name, self.run, self.module, self.epochs = name, run, module, epochs
        self.optimizer = optimizer
        steps = epochs * max(1, len(run.train) // run.settings.batch_size)
        self.scheduler = _schedule(optimizer, steps)
        self.path = run.settings.run_dir() / f"{name}.pt"
        self.epoch, self.best, self.best_state = 0, -1.0, _copy_state(module)
        self.history: list[dict[str, float]] = []
        if self.path.is_file():
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            module.load_state_dict(state["module"])
            optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
            self.best_state = state["best_state"]
            log.info("resumed %s at epoch %d", name, self.epoch)

    def end_epoch(self, loss: float, score: float) -> None:
        self.epoch += 1
        self.history.append({"epoch": self.epoch, "loss": loss, "val_ndcg@10": score})
        if score > self.best:
            self.best, self.best_state = score, _copy_state(self.module)
        tqdm.write(f"{self.name} epoch {self.epoch}/{self.epochs}: loss {loss:.4f}, "
                   f"val NDCG@10 {score:.2f} (best {self.best:.2f})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
                    "best": self.best, "best_state": self.best_state, "history": self.history},
                   self.path)

    def finish(self) -> None:
        self.module.load_state_dict(self.best_state)


def _copy_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}


def _epoch(stage: Stage, loss_of: Callable[[np.ndarray], torch.Tensor]) -> float:
    """One pass over the training products in shuffled batches; the mean loss."""
    settings = stage.run.settings
    rng = np.random.default_rng([settings.seed, stage.epoch])
    losses = []
    batches = list(_batches(len(stage.run.train), settings.batch_size, rng))
    for batch in tqdm(batches, desc=f"{stage.name} {stage.epoch + 1}", leave=False):
        loss = loss_of(batch)
        stage.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stage.optimizer.step()
        stage.scheduler.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def train_image_tower(run: Run) -> Stage:
    """Stage 1: the projection and the last trunk stages, on captions of the product."""
    settings, tail = run.settings, run.tail
    trunk_params, head_params = tail.parameters_to_train()
    tail.logit_scale.requires_grad_(True)
    groups = [{"params": head_params, "lr": settings.lr},
              {"params": [tail.logit_scale], "lr": settings.lr, "weight_decay": 0.0}]
    if trunk_params:
        groups.append({"params": trunk_params, "lr": settings.trunk_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    stage = Stage("image", run, tail, settings.epochs, optimizer)
    title_ids = torch.from_numpy(run.captions.title_ids).to(run.encoder.device)
    while stage.epoch < stage.epochs:
        caption_rows = run.captions.sample(random.Random(f"{settings.seed}-{stage.epoch}"),
                                           (1.0, 1.0, 1.0))
        loss = _epoch(stage, functools.partial(_image_loss, run, caption_rows, title_ids))
        stage.end_epoch(loss, run.validation.ndcg(_image_vectors(tail, run.frozen_val)))
    stage.finish()
    return stage


def _image_loss(run: Run, caption_rows: np.ndarray, title_ids: torch.Tensor, batch: np.ndarray
                ) -> torch.Tensor:
    images = run.tail(run.frozen_train[batch].float())
    same = same_pairs(torch.from_numpy(caption_rows[batch]).to(images.device), title_ids[batch])
    return info_nce(images, run.text_tensor(caption_rows[batch]), run.tail.logit_scale, same)


class FusionObjective(torch.nn.Module):
    """The fusion module plus the temperature of its own contrastive loss (not shipped)."""

    def __init__(self, fusion: torch.nn.Module, logit_scale: float) -> None:
        super().__init__()
        self.fusion = fusion
        self.logit_scale = torch.nn.Parameter(torch.tensor(logit_scale))
        self.image_logit_scale = torch.nn.Parameter(torch.tensor(logit_scale))


# Product text seen in fusion training, by chance: full text, title, degraded title, none.
TEXT_VARIANT_WEIGHTS = (0.25, 0.25, 0.35, 0.15)
FUSION_CAPTION_WEIGHTS = (0.25, 0.5, 0.25)  # title, attribute phrase, both: query-like


def product_text_rows(run: Run) -> np.ndarray:
    """(products, 2 + DEGRADED_PER_PRODUCT) text rows: full, title, degraded...; -1 = none."""
    rng = random.Random(f"{run.settings.seed}-degrade")
    variants = [[product_text(p.title, p.attributes), p.title,
                 *degraded_titles(p, DEGRADED_PER_PRODUCT, rng)] for p in run.train]
    run.texts.ensure([t for vs in variants for t in vs if t.strip()])
    return np.array([[int(run.texts.rows([t])[0]) if t.strip() else -1 for t in vs]
                     for vs in variants])


def train_fusion(run: Run) -> Stage:
    """Stage 2: the gated fusion on top of the (now fixed) image tower."""
    settings, fusion = run.settings, run.encoder.fusion
    assert fusion is not None
    scale = float(run.tail.logit_scale.detach())
    objective = FusionObjective(fusion, scale).to(run.encoder.device)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=settings.fusion_lr,
                                  weight_decay=settings.weight_decay)
    stage = Stage("fusion", run, objective, settings.fusion_epochs, optimizer)
    images = torch.from_numpy(_image_vectors(run.tail, run.frozen_train)).to(run.encoder.device)
    val_images = _image_vectors(run.tail, run.frozen_val)
    variants = product_text_rows(run)
    title_ids = torch.from_numpy(run.captions.title_ids).to(run.encoder.device)
    while stage.epoch < stage.epochs:
        rng = random.Random(f"{settings.seed}-fusion-{stage.epoch}")
        caption_rows = run.captions.sample(rng, FUSION_CAPTION_WEIGHTS)
        text_rows = _sample_variants(variants, rng)
        fusion.train()
        loss = _epoch(stage, functools.partial(
            _fusion_loss, run, objective, images, text_rows, caption_rows, title_ids))
        fusion.eval()
        stage.end_epoch(loss, run.validation.fused_ndcg(
            lambda texts, has_text: run.encoder.fuse(val_images, texts, has_text)))
    stage.finish()
    fusion.eval()
    return stage


def _fusion_loss(run: Run, objective: FusionObjective, images: torch.Tensor,
                 text_rows: np.ndarray, caption_rows: np.ndarray, title_ids: torch.Tensor,
                 batch: np.ndarray) -> torch.Tensor:
    rows = text_rows[batch]
    has_text = torch.from_numpy(rows >= 0).to(images.device)
    products = objective.fusion(images[batch], run.text_tensor(np.maximum(rows, 0)), has_text)
    same = same_pairs(torch.from_numpy(caption_rows[batch]).to(images.device), title_ids[batch])
    loss = info_nce(products, run.text_tensor(caption_rows[batch]), objective.logit_scale, same)
    weight = run.settings.fusion_image_weight
    if weight:
        distinct = torch.zeros_like(same)  # an image query has exactly one right product
        loss = loss + weight * info_nce(
            images[batch], products, objective.image_logit_scale, distinct
        )
    return loss


def _sample_variants(variants: np.ndarray, rng: random.Random) -> np.ndarray:
    kinds = rng.choices(range(4), weights=TEXT_VARIANT_WEIGHTS, k=len(variants))
    out = np.empty(len(variants), dtype=np.int64)
    for i, kind in enumerate(kinds):
        if kind == 3:
            out[i] = -1
        elif kind == 2:
            out[i] = variants[i, 2 + rng.randrange(DEGRADED_PER_PRODUCT)]
        else:
            out[i] = variants[i, kind]
    return out


@dataclass
class TrainResult:
    checkpoint: Path
    seconds: float
    history: dict[str, list[dict[str, float]]]


def train(settings: TrainSettings) -> TrainResult:
    """Both stages, then the delta checkpoint at `settings.out_path()` (and a JSON report)."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    run = prepare(settings)
    stages = [train_image_tower(run)]
    fusion = run.encoder.fusion if settings.fusion_epochs else None
    if fusion is not None:
        stages.append(train_fusion(run))
    out = settings.out_path()
    export(run, out, with_fusion=fusion is not None)
    seconds = time.perf_counter() - started
    history = {stage.name: stage.history for stage in stages}
    report = {"settings": json.loads(settings.model_dump_json()), "seconds": seconds,
              "history": history}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    return TrainResult(out, seconds, history)


def export(run: Run, path: Path, with_fusion: bool) -> None:
    """The delta checkpoint of what this run trained (the in-memory model is rounded to match)."""
    fusion = run.encoder.fusion if with_fusion else None
    save_delta(path, run.encoder.model, run.tail.trained_prefixes(), fusion)


def mean_image_loss(run: Run, seed: int = 0) -> float:
    """The stage-1 loss over all training products with one fixed caption draw (no update)."""
    captions = run.captions.sample(random.Random(seed), (1.0, 1.0, 1.0))
    title_ids = torch.from_numpy(run.captions.title_ids).to(run.encoder.device)
    order = np.arange(len(run.train))
    size = run.settings.batch_size
    with torch.inference_mode():
        losses = [_image_loss(run, captions, title_ids, order[s : s + size]).item()
                  for s in range(0, len(order), size)]
    return float(np.mean(losses))
