"""Fixtures that start the real parts on loopback: one local stack (Tansu, Redis, 2 shards,
the encoder, the router) shared by every test that can share it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import hypothesis.strategies
import pytest

from vitrine.cli.stack import LocalStack, StackSettings

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion"


@pytest.fixture(scope="session")
def fashion_data() -> Path:
    if not (DATA / "products.csv").exists():
        pytest.fail(f"fashion dataset not found at {DATA} (../shared beside the checkout)")
    return DATA


@pytest.fixture(scope="session")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The encoder's allowed file:// root; tests put the images they publish here."""
    return tmp_path_factory.mktemp("images")


def stage_image(fashion_data: Path, image_root: Path, product_id: str) -> Path:
    target = image_root / f"{product_id}.jpg"
    shutil.copyfile(fashion_data / "images" / f"{product_id}.jpg", target)
    return target


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, image_root: Path) -> Iterator[LocalStack]:
    settings = StackSettings(
        num_shards=2,
        router_port=0,
        # the suite shares 2 cores with model loads and encoding: a roomy deadline keeps
        # correctness tests about correctness; the partial test stops a shard outright
        deadline_ms=3000,
        state_dir=tmp_path_factory.mktemp("state"),
        image_file_root=image_root,
        kafka_bootstrap=None,
        redis_url=None,
        log_json=True,
        service_env={
            "VITRINE_MAX_IMAGE_BYTES": "524288",
            "VITRINE_MAX_IMAGE_PIXELS": "10000000",
            "VITRINE_LOG_LEVEL": "DEBUG",  # per-request lines, to follow a request id
            "VITRINE_SNAPSHOT_INTERVAL_S": "2",  # crash tests recover from snapshot + log
            "VITRINE_SEAL_THRESHOLD": "64",  # every test also exercises sealed segments
        },
    )
    local = LocalStack(settings)
    local.start()
    yield local
    local.stop()


# Property-based tests stay within the suite's time budget: bounded examples, no per-example
# deadline (2 shared cores), and in CI a fixed sequence so a failure reproduces.
hypothesis.settings.register_profile(
    "vitrine", max_examples=150, deadline=None, derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile("vitrine")
# Import hypothesis' lazily loaded strategy modules now, at a shallow stack: pytest rewrites
# them on import, and CPython 3.11.7's AST constructor can fail with "recursion depth
# mismatch" (gh-106905, fixed in 3.11.8) when that rewrite happens deep inside a test.
hypothesis.strategies.integers().flatmap(hypothesis.strategies.just)  # imports flatmapped
