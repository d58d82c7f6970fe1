"""vitrine.training.train: a tiny run learns, and its checkpoint loads through the model spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vitrine.model import ModelSpec, load_dual_encoder
from vitrine.training.features import load_images
from vitrine.training.train import (
    Run,
    TrainSettings,
    export,
    info_nce,
    mean_image_loss,
    prepare,
    train_fusion,
    train_image_tower,
)

DATA = Path("/work/shared/data/fashion")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, float, float, Path]:
    """A few hundred products, one epoch per stage, on the CPU; loss before and after."""
    if not (DATA / "products.csv").is_file():
        pytest.fail(f"fashion data not found under {DATA}")
    cache = tmp_path_factory.mktemp("cache")
    settings = TrainSettings(
        data_dir=DATA, cache_dir=cache, limit=300, epochs=1, fusion_epochs=1, batch_size=64,
        lr=3e-3, threads=2, device="cpu",
    )
    run = prepare(settings)
    before = mean_image_loss(run)
    train_image_tower(run)
    after = mean_image_loss(run)
    train_fusion(run)
    path = cache / "tiny.pt"
    export(run, path, with_fusion=True)
    return run, before, after, path


def test_one_epoch_lowers_the_contrastive_loss(tiny: tuple[Run, float, float, Path]) -> None:
    _, before, after, _ = tiny
    assert after < before


def test_checkpoint_is_small_and_loads_with_identical_vectors(
    tiny: tuple[Run, float, float, Path],
) -> None:
    run, _, _, path = tiny
    assert path.stat().st_size < 25 * 1024**2
    loaded = load_dual_encoder(ModelSpec(run.settings.architecture, str(path)), device="cpu")
    assert loaded.model_id.endswith(path.stem + "~" + loaded.model_id.split("~")[-1])
    assert loaded.model_id != ModelSpec(run.settings.architecture, "offline").model_id
    pictures = load_images([p.image for p in run.train[:4]])
    texts = [p.title for p in run.train[:4]]
    for encoder in (run.encoder, loaded):
        encoder.model.eval()
    np.testing.assert_allclose(
        loaded.encode_images(pictures), run.encoder.encode_images(pictures), atol=1e-6
    )
    np.testing.assert_allclose(
        loaded.encode_products(pictures, texts), run.encoder.encode_products(pictures, texts),
        atol=1e-6,
    )


def test_resuming_a_finished_stage_trains_nothing_more(
    tiny: tuple[Run, float, float, Path],
) -> None:
    run, _, _, _ = tiny
    weight = run.encoder.model.visual.head.proj.weight.detach().clone()
    stage = train_image_tower(run)  # the state file says epoch 1 of 1: nothing left to do
    assert stage.epoch == 1 and len(stage.history) == 1
    # the best epoch's weights again, as trained (the export had rounded them to fp16)
    torch.testing.assert_close(run.encoder.model.visual.head.proj.weight.detach(), weight,
                               atol=1e-4, rtol=1e-3)


def test_equal_captions_are_not_negatives() -> None:
    vectors = torch.nn.functional.normalize(torch.eye(3), dim=-1)
    scale = torch.tensor(0.0)
    none = torch.zeros((3, 3), dtype=torch.bool)
    duplicate = none.clone()
    duplicate[0, 1] = duplicate[1, 0] = True
    texts = torch.nn.functional.normalize(torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]]), dim=-1)
    assert info_nce(vectors, texts, scale, duplicate) < info_nce(vectors, texts, scale, none)
