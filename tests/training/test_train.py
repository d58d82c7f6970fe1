"""vitrine.training.train: a tiny run learns, and its checkpoint loads through the model spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageOps

from vitrine.model import ModelSpec, load_dual_encoder
from vitrine.training.data import Product
from vitrine.training.features import load_images
from vitrine.training.train import (
    ANY,
    FACT_KEYS,
    Facts,
    Run,
    TrainSettings,
    caption_positives,
    export,
    image_query_nce,
    info_nce,
    look_alikes,
    mean_image_losses,
    multi_positive_nce,
    prepare,
    train_fusion,
    train_image_tower,
)

DATA = Path("/work/shared/data/fashion")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[Run, dict[str, float], dict[str, float], Path]:
    """A few hundred products, two image epochs and one of fusion, on the CPU, with the
    attribute heads; every stage-1 loss before and after."""
    if not (DATA / "products.csv").is_file():
        pytest.fail(f"fashion data not found under {DATA}")
    cache = tmp_path_factory.mktemp("cache")
    settings = TrainSettings(
        data_dir=DATA, cache_dir=cache, limit=300, epochs=2, fusion_epochs=1, batch_size=64,
        lr=3e-3, threads=2, device="cpu", aux_weight=1.0,
    )
    run = prepare(settings)
    before = mean_image_losses(run)
    train_image_tower(run)
    after = mean_image_losses(run)
    train_fusion(run)
    path = cache / "tiny.pt"
    export(run, path, with_fusion=True)
    return run, before, after, path


def test_training_lowers_the_contrastive_loss_and_every_head_loss(
    tiny: tuple[Run, dict[str, float], dict[str, float], Path],
) -> None:
    _, before, after, _ = tiny
    assert {"contrastive", "colour", "article_type", "gender", "pattern"} <= set(before)
    assert before.keys() == after.keys()
    assert all(after[name] < before[name] for name in before), (before, after)


def test_mirrored_pictures_are_cached_beside_the_originals(
    tiny: tuple[Run, dict[str, float], dict[str, float], Path],
) -> None:
    run, _, _, _ = tiny
    assert run.mirrored_train is not None
    assert run.mirrored_train.shape == run.frozen_train.shape
    assert not torch.equal(run.mirrored_train, run.frozen_train)
    batch = np.arange(4)
    mirror = np.array([True, False, True, False] + [False] * (len(run.train) - 4))
    picked = run.training_features(batch, mirror)
    torch.testing.assert_close(picked[0], run.mirrored_train[0].float())
    torch.testing.assert_close(picked[1], run.frozen_train[1].float())


def test_checkpoint_is_small_and_loads_with_identical_vectors(
    tiny: tuple[Run, dict[str, float], dict[str, float], Path],
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


def test_a_mirror_averaged_model_gives_a_picture_and_its_mirror_image_one_vector(
    tiny: tuple[Run, dict[str, float], dict[str, float], Path],
) -> None:
    run, _, _, path = tiny
    loaded = load_dual_encoder(ModelSpec(run.settings.architecture, str(path)), device="cpu")
    assert run.settings.mirror_average and loaded.mirror_average
    pictures = load_images([p.image for p in run.train[:4]])
    mirrored = [ImageOps.mirror(picture) for picture in pictures]
    np.testing.assert_allclose(loaded.encode_images(mirrored), loaded.encode_images(pictures),
                               atol=2e-3)
    plain = load_dual_encoder(ModelSpec(run.settings.architecture, "offline"), device="cpu")
    assert not plain.mirror_average  # weights trained without it keep their vectors
    assert not np.allclose(plain.encode_images(mirrored), plain.encode_images(pictures),
                           atol=2e-3)


def test_resuming_a_finished_stage_trains_nothing_more(
    tiny: tuple[Run, dict[str, float], dict[str, float], Path],
) -> None:
    run, _, _, _ = tiny
    weight = run.encoder.model.visual.head.proj.weight.detach().clone()
    stage = train_image_tower(run)  # the state file says epoch 2 of 2: nothing left to do
    assert stage.epoch == 2 and len(stage.history) == 2
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


def test_a_caption_is_a_positive_of_every_product_it_describes() -> None:
    products = [
        Product(1, "Roadster Men Striped Red Shirt", {"gender": "Men", "colour": "Red",
                                                      "article_type": "Shirts"}, Path("1.jpg")),
        Product(2, "Arrow Men Red Shirt", {"gender": "Men", "colour": "Red",
                                           "article_type": "Shirts"}, Path("2.jpg")),
        Product(3, "Puma Women Red Shoes", {"gender": "Women", "colour": "Red",
                                            "article_type": "Shoes"}, Path("3.jpg")),
    ]
    facts = Facts.of(products)
    required = torch.from_numpy(np.stack([
        facts.required({"colour": "Red", "article_type": "Shirts"}),  # drawn for product 1
        facts.required(None),  # product 2's own title: nobody else's
        facts.required({"colour": "Red"}),  # product 3's: every product is red
    ]))
    positives = caption_positives(required, torch.from_numpy(facts.codes),
                                  torch.from_numpy(facts.patterns), torch.tensor([0, 1, 2]))
    assert positives.tolist() == [[True, False, True], [True, True, True], [False, False, True]]
    striped = torch.from_numpy(facts.required({"pattern": "Striped"}))[None]
    assert caption_positives(striped.repeat(3, 1), torch.from_numpy(facts.codes),
                             torch.from_numpy(facts.patterns), torch.tensor([0, 1, 2])
                             )[:, 0].tolist() == [True, False, False]
    assert len(facts.required(None)) == len(FACT_KEYS) + 1
    assert facts.required({"colour": "Red"})[FACT_KEYS.index("gender")] == ANY


def test_multi_positive_nce_is_info_nce_with_one_positive_and_pulls_shared_captions() -> None:
    torch.manual_seed(0)
    left = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    right = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(2.0)
    eye = torch.eye(4, dtype=torch.bool)
    none = torch.zeros((4, 4), dtype=torch.bool)
    torch.testing.assert_close(multi_positive_nce(left, right, scale, eye),
                               info_nce(left, right, scale, none))
    captions = torch.eye(3)
    fits = torch.eye(3, dtype=torch.bool)
    fits[1, 0] = True  # caption 0 (drawn for product 0) describes product 1 too
    between = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 1]]),
                                            dim=-1)  # product 1 near both captions that fit it
    apart = torch.eye(3)  # product 1 on its own caption only
    scale = torch.tensor(3.0)
    assert multi_positive_nce(between, captions, scale, fits) < multi_positive_nce(
        apart, captions, scale, fits)
    assert info_nce(between, captions, scale, none[:3, :3]) > info_nce(
        apart, captions, scale, none[:3, :3])  # one positive each: pushed apart instead


def test_an_image_query_loss_without_a_hard_negative_is_info_nce_and_a_near_one_costs_more(
) -> None:
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    products = torch.nn.functional.normalize(images + 0.3 * torch.randn(4, 8), dim=-1)
    scale, none = torch.tensor(2.0), torch.zeros((4, 4), dtype=torch.bool)
    torch.testing.assert_close(image_query_nce(images, products, scale),
                               info_nce(images, products, scale, none))
    far, near = -images, torch.nn.functional.normalize(images + 0.1 * torch.randn(4, 8), dim=-1)
    plain = image_query_nce(images, products, scale)
    assert plain < image_query_nce(images, products, scale, far) < image_query_nce(
        images, products, scale, near)


def test_look_alikes_are_the_nearest_other_picture_never_an_identical_one() -> None:
    base = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0, 0], [1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0.2], [0, 1.0, 0]]), dim=-1)
    # rows 0 and 1 are one picture twice: each finds row 2, the next most alike
    assert look_alikes(base.numpy(), block=2).tolist() == [2, 2, 0, 4, 3]


def test_a_fusion_setting_changes_the_run_but_not_stage_one(tmp_path: Path) -> None:
    base = TrainSettings(cache_dir=tmp_path)
    other = TrainSettings(cache_dir=tmp_path, fusion_image_weight=1.0)
    assert base.stage_dir("image") == other.stage_dir("image")
    assert base.stage_dir("fusion") != other.stage_dir("fusion")
    assert base.run_dir() != other.run_dir()
    assert base.stage_dir("image") != TrainSettings(cache_dir=tmp_path, epochs=3).stage_dir("image")
