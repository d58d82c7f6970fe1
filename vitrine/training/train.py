"""`vitrine train`: align the image tower to the frozen MiniLM text space, then learn fusion.

Stage 1 (domain fine-tuning): the image projection, the last `trainable_blocks` stages of the
EfficientNet trunk and its head conv learn, contrastively (InfoNCE with a learnable
temperature), to put a product's picture next to the text vectors of its captions: its title,
an attribute phrase ("Navy Blue Shirts", "Striped Shirts") or both. A phrase is a positive of
every product in the batch it describes, not only of the one it was drawn for (multi-positive),
and training-only heads predict the catalog's attributes and the title's pattern/material words
from the image vector beside it, so the picture carries them when the text does not. The trunk
below `feature_block` is frozen and read from the feature cache, so an epoch over 35k products
takes about two minutes on a CPU.
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
    PATTERN,
    PATTERN_WORDS,
    Product,
    Split,
    attribute_captions,
    degraded_titles,
    in_split,
    load_products,
    pattern_words,
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
    feature_block: int = Field(default=4, ge=1, le=7, description="cached trunk input block")
    trainable_blocks: int = Field(default=2, ge=0, description="last trunk stages to fine-tune")
    epochs: int = Field(default=8, ge=1)
    batch_size: int = Field(default=512, ge=8)
    lr: float = 1e-3
    trunk_lr: float = 1e-3
    weight_decay: float = 0.05
    mirror: bool = Field(
        default=True, description="half the training pictures mirrored each stage-1 epoch "
        "(an augmentation that keeps colour, a label here)",
    )
    mirror_average: bool = Field(
        default=True, description="the model encodes a picture as the mean of it and its "
        "mirror image (twice the image tower's work per picture); validation and fusion see "
        "the same",
    )
    multi_positive: bool = Field(
        default=True, description="products that a caption describes are its positives too "
        "(False: only not negatives)",
    )
    aux_weight: float = Field(
        default=0.5, ge=0, description="weight of the attribute and pattern heads' losses "
        "(0: no heads)",
    )
    fusion_epochs: int = Field(default=60, ge=0, description="0: no fusion (plain average)")
    fusion_lr: float = 2e-3
    fusion_image_weight: float = Field(
        default=0.5, ge=0, description="weight of the image-query loss: 'more like this' "
        "queries (an image alone) must still find the product behind its fused vector",
    )
    fusion_hard_negatives: bool = Field(
        default=False, description="the image-query loss also ranks each product against the "
        "fused vector of the product whose picture is most like its own: near-identical "
        "photos (one lipstick in two shades) are what a 'more like this' query confuses",
    )
    threads: int = Field(default=2, ge=1)
    device: str | None = None

    def run_dir(self) -> Path:
        return self._digest_dir(set())

    def stage_dir(self, stage: str) -> Path:
        """Where a stage's state lives: stage 1 does not read the fusion settings, so it is
        keyed without them and a fusion experiment resumes it finished."""
        return self._digest_dir(FUSION_SETTINGS if stage == "image" else set())

    def _digest_dir(self, ignored: set[str]) -> Path:
        blob = self.model_dump_json(exclude={"out", "threads", "device", "cache_dir"} | ignored)
        return self.cache_dir / "runs" / hashlib.sha256(blob.encode()).hexdigest()[:12]

    def out_path(self) -> Path:
        return self.out or self.run_dir() / "model.pt"


FUSION_SETTINGS = {name for name in TrainSettings.model_fields if name.startswith("fusion_")}
FACT_KEYS = ("gender", "colour", "article_type", "usage", "season", "sub_category")
UNKNOWN = -100  # a product without the attribute: no caption naming it fits, the head ignores it
ANY, SELF = -1, -2  # a caption does not name the fact; a caption fits its own product only


@dataclass
class Facts:
    """The training products' attributes as codes and their title's pattern words as bits."""

    vocab: dict[str, dict[str, int]]
    codes: np.ndarray  # (products, FACT_KEYS) int64, UNKNOWN where absent
    patterns: np.ndarray  # (products,) int64, bit i: the i-th word of PATTERN_WORDS

    @classmethod
    def of(cls, products: Sequence[Product]) -> Facts:
        vocab = {key: {v: i for i, v in enumerate(sorted(
            {p.attributes[key] for p in products if p.attributes.get(key)}))} for key in FACT_KEYS}
        codes = np.array([[vocab[key].get(p.attributes.get(key, ""), UNKNOWN) for key in FACT_KEYS]
                          for p in products], dtype=np.int64).reshape(len(products), -1)
        bit = {word: 1 << i for i, word in enumerate(PATTERN_WORDS)}
        patterns = np.array([sum(bit[w] for w in pattern_words(p.title)) for p in products],
                            dtype=np.int64)
        return cls(vocab, codes, patterns)

    def required(self, named: dict[str, str] | None) -> np.ndarray:
        """What a caption asks of a product (FACT_KEYS, then the pattern bit): SELF for titles."""
        if named is None:
            return np.full(len(FACT_KEYS) + 1, SELF, dtype=np.int64)
        out = [self.vocab[k].get(named[k], UNKNOWN) if k in named else ANY for k in FACT_KEYS]
        out.append(list(PATTERN_WORDS).index(named[PATTERN]) if PATTERN in named else ANY)
        return np.array(out, dtype=np.int64)


@dataclass
class Captions:
    """Per product: rows (into the text cache) of its title, attribute phrases and both."""

    title: list[int | None]
    phrases: list[np.ndarray]
    phrase_required: list[np.ndarray]  # per phrase: what it asks of a product (Facts.required)
    both: list[int | None]
    title_ids: np.ndarray  # equal titles share an id: each is a right answer for the other
    self_only: np.ndarray  # Facts.required of a title

    def sample(self, rng: random.Random, weights: Sequence[float]
               ) -> tuple[np.ndarray, np.ndarray]:
        """One caption per product, a title, attribute phrase or both by `weights`: its text
        cache row and what it asks of a product."""
        out = np.empty(len(self.title), dtype=np.int64)
        required = np.empty((len(self.title), len(self.self_only)), dtype=np.int64)
        for i in range(len(out)):
            kinds = [(w, k) for w, k in zip(weights, ("title", "phrase", "both"), strict=True)
                     if (k == "phrase" and len(self.phrases[i])) or
                     (k != "phrase" and getattr(self, k)[i] is not None)]
            kind = rng.choices([k for _, k in kinds], weights=[w for w, _ in kinds])[0]
            if kind == "phrase":
                pick = rng.randrange(len(self.phrases[i]))
                out[i], required[i] = self.phrases[i][pick], self.phrase_required[i][pick]
            else:
                out[i], required[i] = getattr(self, kind)[i], self.self_only
        return out, required


def build_captions(products: Sequence[Product], texts: TextVectors, facts: Facts) -> Captions:
    titles = [p.title or None for p in products]
    phrases = [attribute_captions(p) for p in products]
    boths = [product_text(p.title, p.attributes) if p.title and p.attributes else None
             for p in products]
    texts.ensure([t for t in titles if t] + [x for ps in phrases for x in ps]
                 + [b for b in boths if b])
    ids: dict[str, int] = {}
    width = len(FACT_KEYS) + 1
    return Captions(
        title=[int(texts.rows([t])[0]) if t else None for t in titles],
        phrases=[texts.rows(list(ps)) for ps in phrases],
        phrase_required=[np.array([facts.required(named) for named in ps.values()],
                                  dtype=np.int64).reshape(-1, width) for ps in phrases],
        both=[int(texts.rows([b])[0]) if b else None for b in boths],
        title_ids=np.array([ids.setdefault(p.title, len(ids)) for p in products]),
        self_only=facts.required(None),
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


def multi_positive_nce(
    left: torch.Tensor, right: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE where row i may have several right answers (`positives[i, j]`): the
    mean log-probability over them, so products that fit one caption are pulled towards it
    together instead of apart. With `positives` the identity it is `info_nce`."""
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * left @ right.T
    weights = positives.float()
    forward = -(F.log_softmax(logits, dim=1) * weights).sum(1) / weights.sum(1)
    backward = -(F.log_softmax(logits, dim=0) * weights).sum(0) / weights.sum(0)
    return (forward.mean() + backward.mean()) / 2


def caption_positives(required: torch.Tensor, codes: torch.Tensor, patterns: torch.Tensor,
                      title_ids: torch.Tensor) -> torch.Tensor:
    """(products, captions) bool: caption j describes product i, as the eval grades (every fact
    it names is one of i's), or it is i's own caption, or i has the same title."""
    named, pattern = required[:, :-1], required[:, -1]
    attributes = ((named[None] == ANY) | (named[None] == codes[:, None])).all(-1)
    has_pattern = (patterns[:, None] >> pattern.clamp(min=0)[None]) & 1 == 1
    phrase = (named != SELF).all(-1)[None]
    eye = torch.eye(len(required), dtype=torch.bool, device=required.device)
    same_title = title_ids[:, None] == title_ids[None]
    return (attributes & ((pattern[None] == ANY) | has_pattern) & phrase) | eye | same_title


class AttributeHeads(torch.nn.Module):
    """Training-only classifiers of the catalog's attributes and the title's pattern words,
    read from the image vector: extra losses that make the vector carry what the picture shows
    when no text does. Not shipped: serving cost is unchanged."""

    SCALE = 16.0  # the vectors are unit length: room for confident logits

    def __init__(self, dim: int, facts: Facts) -> None:
        super().__init__()
        self.attributes = torch.nn.ModuleDict({
            key: torch.nn.Linear(dim, len(facts.vocab[key])) for key in FACT_KEYS
            if len(facts.vocab[key]) > 1
        })
        self.pattern = torch.nn.Linear(dim, len(PATTERN_WORDS))

    def losses(self, vectors: torch.Tensor, codes: torch.Tensor, patterns: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """Cross-entropy per head over the products that have the fact."""
        scaled = self.SCALE * vectors
        out = {}
        for i, key in enumerate(FACT_KEYS):
            known = codes[:, i] != UNKNOWN
            if key in self.attributes and known.any():
                out[key] = F.cross_entropy(self.attributes[key](scaled[known]), codes[known, i])
        bits = ((patterns[:, None] >> torch.arange(len(PATTERN_WORDS), device=patterns.device))
                & 1).float()
        some = bits.sum(1) > 0
        if some.any():  # a title with several words: each is a right answer
            target = bits[some] / bits[some].sum(1, keepdim=True)
            log_p = F.log_softmax(self.pattern(scaled[some]), dim=1)
            out[PATTERN] = -(log_p * target).sum(1).mean()
        return out


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


class ImageObjective(torch.nn.Module):
    """What stage 1 trains: the image tail, and the attribute heads when there are any."""

    def __init__(self, tail: ImageTail, heads: AttributeHeads | None) -> None:
        super().__init__()
        self.tail, self.heads = tail, heads


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
    facts: Facts
    captions: Captions
    tail: ImageTail
    heads: AttributeHeads | None
    frozen_train: torch.Tensor
    frozen_val: torch.Tensor
    validation: Validation
    mirrored_train: torch.Tensor | None = None  # frozen_train of the mirrored pictures
    mirrored_val: torch.Tensor | None = None  # frozen_val of the mirrored pictures

    def image_vectors(self, split: str) -> np.ndarray:
        """A split's image vectors as the exported model gives them (mirror-averaged or not)."""
        frozen, mirrored = ((self.frozen_train, self.mirrored_train) if split == "train"
                            else (self.frozen_val, self.mirrored_val))
        vectors = _image_vectors(self.tail, frozen)
        if self.settings.mirror_average:
            assert mirrored is not None
            vectors = vectors + _image_vectors(self.tail, mirrored)
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def training_features(self, batch: np.ndarray, mirror: np.ndarray | None) -> torch.Tensor:
        """The frozen features of a batch, the mirrored picture's where `mirror` says."""
        features = self.frozen_train[batch]
        if mirror is not None and self.mirrored_train is not None:
            flip = torch.from_numpy(mirror[batch]).to(features.device)
            features = torch.where(flip[:, None, None, None], self.mirrored_train[batch],
                                   features)
        return features.float()

    @functools.cached_property
    def fact_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, pattern bits) of the training products, on the device."""
        device = self.encoder.device
        return (torch.from_numpy(self.facts.codes).to(device),
                torch.from_numpy(self.facts.patterns).to(device))

    def positives(self, batch: np.ndarray, required: np.ndarray) -> torch.Tensor:
        """Which captions of a batch (drawn for its products) describe which of its products."""
        device = self.encoder.device
        codes, patterns = self.fact_tensors
        title_ids = torch.from_numpy(self.captions.title_ids[batch]).to(device)
        return caption_positives(torch.from_numpy(required[batch]).to(device), codes[batch],
                                 patterns[batch], title_ids)

    def contrastive(self, left: torch.Tensor, right: torch.Tensor, logit_scale: torch.Tensor,
                    batch: np.ndarray, caption_rows: np.ndarray, required: np.ndarray
                    ) -> torch.Tensor:
        """InfoNCE of products against the captions drawn for them: multi-positive, or with
        equal captions and titles only kept from being negatives."""
        if self.settings.multi_positive:
            return multi_positive_nce(left, right, logit_scale, self.positives(batch, required))
        device = left.device
        same = same_pairs(torch.from_numpy(caption_rows[batch]).to(device),
                          torch.from_numpy(self.captions.title_ids[batch]).to(device))
        return info_nce(left, right, logit_scale, same)

    def text_tensor(self, rows: np.ndarray) -> torch.Tensor:
        vectors = torch.from_numpy(self.texts.matrix[rows].astype(np.float32))
        return F.normalize(vectors, dim=-1).to(self.encoder.device)


def prepare(settings: TrainSettings) -> Run:
    torch.set_num_threads(settings.threads)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_dual_encoder(
        ModelSpec(settings.architecture, "offline", settings.seed), device, precision="fp32"
    )
    encoder.mirror_average = settings.mirror_average  # the model as it will be exported
    products = load_products(settings.data_dir, settings.limit)
    acts = trunk_activations(encoder, products, settings.feature_block, settings.cache_dir)
    index = {split: np.array([i for i, p in enumerate(products) if p.split == split])
             for split in ("train", "val")}
    texts = TextVectors(encoder, settings.cache_dir)
    train = in_split(products, "train")
    facts = Facts.of(train)
    captions = build_captions(train, texts, facts)
    validation = Validation(in_split(products, "val"), texts)
    tail = ImageTail(encoder.model.visual, encoder.model.logit_scale, settings.feature_block,
                     settings.trainable_blocks)
    heads = AttributeHeads(encoder.dim, facts).to(encoder.device) if settings.aux_weight else None
    mirrored: dict[str, torch.Tensor | None] = {"train": None, "val": None}
    wanted_mirrored: tuple[tuple[Split, bool], ...] = (
        ("train", settings.mirror or settings.mirror_average), ("val", settings.mirror_average))
    for split, wanted in wanted_mirrored:
        if wanted:
            chosen = in_split(products, split)
            mirrored_acts = trunk_activations(encoder, chosen, settings.feature_block,
                                              settings.cache_dir, mirrored=True)
            mirrored[split] = _frozen_features(tail, mirrored_acts, np.arange(len(chosen)),
                                               encoder.device)
    return Run(
        settings, encoder, texts, train, facts, captions, tail, heads,
        _frozen_features(tail, acts, index["train"], encoder.device),
        _frozen_features(tail, acts, index["val"], encoder.device),
        validation, mirrored["train"], mirrored["val"],
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
        self.path = run.settings.stage_dir(name) / f"{name}.pt"
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
    """Stage 1: the projection and the last trunk stages, on captions of the product, with
    the attribute heads' losses beside."""
    settings, tail = run.settings, run.tail
    trunk_params, head_params = tail.parameters_to_train()
    tail.logit_scale.requires_grad_(True)
    groups = [{"params": head_params, "lr": settings.lr},
              {"params": [tail.logit_scale], "lr": settings.lr, "weight_decay": 0.0}]
    if trunk_params:
        groups.append({"params": trunk_params, "lr": settings.trunk_lr})
    if run.heads is not None:
        groups.append({"params": list(run.heads.parameters()), "lr": settings.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    stage = Stage("image", run, ImageObjective(tail, run.heads), settings.epochs, optimizer)
    while stage.epoch < stage.epochs:
        rng = random.Random(f"{settings.seed}-{stage.epoch}")
        captions = run.captions.sample(rng, (1.0, 1.0, 1.0))
        mirror = np.array([rng.random() < 0.5 for _ in run.train]) if settings.mirror else None
        loss = _epoch(stage, functools.partial(_image_loss, run, captions, mirror))
        stage.end_epoch(loss, run.validation.ndcg(run.image_vectors("val")))
    stage.finish()
    return stage


def image_losses(run: Run, captions: tuple[np.ndarray, np.ndarray], mirror: np.ndarray | None,
                 batch: np.ndarray) -> dict[str, torch.Tensor]:
    """Stage 1's losses on one batch: "contrastive", then one per attribute head."""
    caption_rows, required = captions
    images = run.tail(run.training_features(batch, mirror))
    out = {"contrastive": run.contrastive(images, run.text_tensor(caption_rows[batch]),
                                          run.tail.logit_scale, batch, caption_rows, required)}
    if run.heads is not None:
        codes, patterns = run.fact_tensors
        out |= run.heads.losses(images, codes[batch], patterns[batch])
    return out


def _image_loss(run: Run, captions: tuple[np.ndarray, np.ndarray], mirror: np.ndarray | None,
                batch: np.ndarray) -> torch.Tensor:
    losses = image_losses(run, captions, mirror, batch)
    contrastive = losses.pop("contrastive")
    if not losses:
        return contrastive
    return contrastive + run.settings.aux_weight * torch.stack(list(losses.values())).mean()


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
    train_images = run.image_vectors("train")
    images = torch.from_numpy(train_images).to(run.encoder.device)
    val_images = run.image_vectors("val")
    variants = product_text_rows(run)
    hard = look_alikes(train_images) if settings.fusion_hard_negatives else None
    while stage.epoch < stage.epochs:
        rng = random.Random(f"{settings.seed}-fusion-{stage.epoch}")
        captions = run.captions.sample(rng, FUSION_CAPTION_WEIGHTS)
        text_rows = _sample_variants(variants, rng)
        fusion.train()
        loss = _epoch(stage, functools.partial(
            _fusion_loss, run, objective, images, text_rows, captions, hard))
        fusion.eval()
        stage.end_epoch(loss, run.validation.fused_ndcg(
            lambda texts, has_text: run.encoder.fuse(val_images, texts, has_text)))
    stage.finish()
    fusion.eval()
    return stage


def _fusion_loss(run: Run, objective: FusionObjective, images: torch.Tensor,
                 text_rows: np.ndarray, captions: tuple[np.ndarray, np.ndarray],
                 look_alikes: np.ndarray | None, batch: np.ndarray) -> torch.Tensor:
    caption_rows, required = captions
    products = _fused(run, objective, images, text_rows, batch)
    loss = run.contrastive(products, run.text_tensor(caption_rows[batch]), objective.logit_scale,
                           batch, caption_rows, required)
    weight = run.settings.fusion_image_weight
    if weight:
        hard = None if look_alikes is None else _fused(
            run, objective, images, text_rows, look_alikes[batch])
        loss = loss + weight * image_query_nce(
            images[batch], products, objective.image_logit_scale, hard)
    return loss


def _fused(run: Run, objective: FusionObjective, images: torch.Tensor, text_rows: np.ndarray,
           batch: np.ndarray) -> torch.Tensor:
    """The fused vectors of a batch, each product with the text variant drawn for it."""
    rows = text_rows[batch]
    has_text = torch.from_numpy(rows >= 0).to(images.device)
    return objective.fusion(images[batch], run.text_tensor(np.maximum(rows, 0)), has_text)


def image_query_nce(images: torch.Tensor, products: torch.Tensor, logit_scale: torch.Tensor,
                    hard: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of pictures against their products' fused vectors (an image query has
    exactly one right product); `hard[i]`, when given, is one more wrong answer for picture i
    (the fused vector of the product that looks most like it), ranked beside the batch."""
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * images @ products.T
    target = torch.arange(len(images), device=images.device)
    backward = F.cross_entropy(logits.T, target)
    if hard is not None:
        logits = torch.cat([logits, scale * (images * hard).sum(-1, keepdim=True)], dim=1)
    return (F.cross_entropy(logits, target) + backward) / 2


def look_alikes(vectors: np.ndarray, block: int = 2048) -> np.ndarray:
    """Each row's most similar other row; rows equal to it (byte-identical pictures of two
    products, which nothing can tell apart) are skipped."""
    matrix = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    out = np.empty(len(vectors), dtype=np.int64)
    for start in range(0, len(vectors), block):
        scores = matrix[start : start + block] @ matrix.T
        scores[scores > 1 - 1e-5] = -2.0  # itself and its identical twins
        out[start : start + block] = scores.argmax(dim=1).numpy()
    return out


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
    save_delta(path, run.encoder.model, run.tail.trained_prefixes(), fusion,
               run.settings.mirror_average)


def mean_image_losses(run: Run, seed: int = 0) -> dict[str, float]:
    """Stage 1's losses over all training products, one fixed caption draw (no update)."""
    captions = run.captions.sample(random.Random(seed), (1.0, 1.0, 1.0))
    order = np.arange(len(run.train))
    size = run.settings.batch_size
    sums: dict[str, list[float]] = {}
    with torch.inference_mode():
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            for name, loss in image_losses(run, captions, None, batch).items():
                sums.setdefault(name, []).append(loss.item())
    return {name: float(np.mean(values)) for name, values in sums.items()}
