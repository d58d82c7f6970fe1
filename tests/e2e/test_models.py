"""Model roll-forward on a real broker while the router serves: a candidate is added and
backfilled from the active model's vector log (its encoder killed and resumed half way),
canaried and promoted once it covers the catalog (neither before), rolled back and retired,
with no error, no partial answer and no answer from a model it did not name. A stack of its
own, so the shared one keeps its single model.

The candidate is the shipped model with its text tower quantised to int8 (`onnx-int8`): a
model id of its own (another vector space for product texts) that loads offline.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from proto.stats import ShardStats
from tests.conftest import stage_image
from tests.helpers import (
    Shopper,
    content,
    eventually,
    expected_content,
    http_json,
    ids_of,
    publish,
    search_image,
    supervised_stack,
)
from vitrine.catalog import events_from_csv
from vitrine.cli import main as cli
from vitrine.cli.models import ServingTarget, coverage
from vitrine.cli.stack import LocalStack, StackSettings, free_port
from vitrine.registry import read_registry, settings_entry

pytestmark = pytest.mark.stack

ROWS = (4800, 5000)  # rows of products.csv that no other test publishes
LATE = 20  # of them published only while the candidate backfills
CLUSTER_ROWS = (5000, 5040)  # the Kubernetes procedure's own products


@pytest.fixture(scope="module")
def model_stack(tmp_path_factory: pytest.TempPathFactory, image_root: Path) -> Iterator[LocalStack]:
    settings = StackSettings(
        num_shards=2, router_port=0, state_dir=tmp_path_factory.mktemp("models"),
        image_file_root=image_root, kafka_bootstrap=None, redis_url=None,
        deadline_ms=3000,  # a second model loading and encoding on 2 cores: about correctness
        service_env={"VITRINE_CANARY_SHARE": "0.5", "VITRINE_CANARY_CHECK_S": "1"},
    )
    with supervised_stack(settings) as stack:
        yield stack


def vitrine(stack: LocalStack, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, list(args),
                                env={"VITRINE_STATE_DIR": str(stack.settings.state_dir)})
    return result.exit_code, result.output


def holds(stack: LocalStack, model_id: str) -> dict[str, int]:
    """Every product the shards hold of one model ({} until they all serve it)."""
    merged: dict[str, int] = {}
    for url in stack.shard_urls:
        try:
            merged.update(content(url, model_id))
        except urllib.error.HTTPError as exc:
            if exc.code != 404:  # 404: this shard has not read the registry change yet
                raise
            return {}
    return merged


def test_a_candidate_is_backfilled_promoted_rolled_back_and_retired_while_serving(
    model_stack: LocalStack, fashion_data: Path, image_root: Path
) -> None:
    stack = model_stack
    rows = list(itertools.islice(events_from_csv(fashion_data / "products.csv", image_root),
                                 *ROWS))
    for event in rows:
        stage_image(fashion_data, image_root, event.product_id)
    early, late = rows[:-LATE], rows[-LATE:]
    retitled = [e.model_copy(update={"version": e.version + 1, "title": f"{e.title} v2"})
                for e in early[:10]]
    publish(stack, early)
    old = settings_entry(stack.kafka_settings()).model_id
    eventually(lambda: holds(stack, old) == expected_content(early), what="catalog indexed")
    candidate = f"{old}+onnx-int8"

    shopper = Shopper(stack.router_url)
    thread = threading.Thread(target=shopper.run)
    thread.start()
    try:
        code, output = vitrine(stack, "model", "add", "vitrine-fashion-v3.pt",
                               "--text-runtime", "onnx-int8")
        assert code == 0, output
        assert candidate in output and "backfilling" in output

        # kill its encoder half way through the backfill: promotion is refused meanwhile
        name = next(n for n in stack.children if n.startswith("encoder-"))
        eventually(lambda: 0 < len(holds(stack, candidate)) < len(early) or None,
                   timeout_s=120, what="the backfill under way")
        stack.stop_child(name, sig=signal.SIGKILL)
        code, output = vitrine(stack, "model", "promote", candidate)
        assert code == 1 and "does not cover the catalog" in output, output
        refused_at = len(shopper.answers)
        publish(stack, [*late, *retitled])  # new events while the candidate backfills
        stack.start_child(name)  # resumes from its committed offsets

        expected = expected_content([*early, *late, *retitled])
        eventually(lambda: holds(stack, candidate) == expected, timeout_s=300,
                   what="the candidate holding every product at its latest version")
        eventually(lambda: holds(stack, old) == expected, what="the active one too")
        registry = read_registry(stack.kafka_settings())
        eventually(lambda: all(not c.problems() for c in coverage(
            registry, ServingTarget.of_stack(stack))), what="the candidate covering")
        code, output = vitrine(stack, "model", "status")
        assert code == 0 and "candidate" in output, output
        code, output = vitrine(stack, "eval", "--router", "up", "--data", str(fashion_data),
                               "--queries", "12")  # every served model, side by side
        assert code == 0, output
        rows = [line for line in output.splitlines() if line.startswith(f"| {old}")]
        assert len(rows) == 2, output  # the active model and the candidate (old + suffix)
        eventually(lambda: any(a.model_id == candidate for a in shopper.answers),
                   timeout_s=30, what="the canary share of queries reaching the candidate")

        # side by side: the same query names either model, and is answered by it alone
        for model in (old, candidate):
            status, answer = http_json(f"{stack.router_url}/search?"
                                       + urllib.parse.urlencode({"q": "red dress", "model": model}))
            assert status == 200 and answer["model_id"] == model and not answer["partial"]
        late_pid = late[0].product_id
        for model in (old, candidate):  # a product published during the backfill, in both
            found = search_image(stack.router_url,
                                 image_root / f"{late_pid}.jpg", k=5, model=model)
            assert ids_of(found)[0] == late_pid and found["model_id"] == model

        code, output = vitrine(stack, "model", "promote", candidate)
        assert code == 0, output
        for event in [late[1], early[5], early[50]]:  # image queries, now with the new model
            found = search_image(stack.router_url, image_root / f"{event.product_id}.jpg", k=5)
            assert found["model_id"] == candidate and ids_of(found)[0] == event.product_id

        code, output = vitrine(stack, "model", "rollback")
        assert code == 0 and f"{old} is the active model again" in output, output
        code, output = vitrine(stack, "model", "retire", candidate)
        assert code == 0, output
        time.sleep(0.5)  # a few answers after the retirement too
    finally:
        shopper.done.set()
        thread.join()

    assert shopper.served_throughout(), [a for a in shopper.answers
                                         if a.status != 200 or a.partial][:5]
    assert {a.model_id for a in shopper.answers} <= {old, candidate}
    assert all(a.model_id == old for a in shopper.answers[:refused_at]), "no canary before"
    assert shopper.answers[-1].model_id == old, "rolled back"

    def dropped() -> bool:
        stats = [ShardStats.model_validate(http_json(f"{url}/stats")[1])
                 for url in stack.shard_urls]
        return all(list(s.models) == [old] for s in stats)

    eventually(dropped, what="every shard dropping the retired model's index")
    status, answer = http_json(f"{stack.router_url}/search?"
                               + urllib.parse.urlencode({"q": "red dress", "model": candidate}))
    assert status == 404 and "is served" in answer["error"], answer
    assert not any(n.startswith("encoder-") for n in stack.children), "its encoder stopped"


def vitrine_in_router_pod(stack: LocalStack, *args: str) -> tuple[int, str, str]:
    """`kubectl exec deploy/vitrine-router -- vitrine ...`: the CLI with the router's own
    settings (the broker, the shard list) and no `vitrine up` to ask. (code, stdout, stderr)"""
    env = {key: value for key, value in stack.children["router"].env.items()
           if key.startswith("VITRINE_")}
    result = CliRunner().invoke(cli.app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def parse_env_file(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_the_kubernetes_procedure_rolls_a_model_forward_from_a_router_pod(
    model_stack: LocalStack, fashion_data: Path, image_root: Path, tmp_path: Path
) -> None:
    """The README's Kubernetes steps against real services: `--cluster` writes only the
    registry and prints the candidate's model.env; an encoder started from the shared settings
    plus that file (what components/model-encoder's Deployment runs) backfills it; status,
    promote (refused first), rollback and retire work with no `vitrine up` to ask, its
    backfill read from the candidate's consumer group, while shoppers are served."""
    stack = model_stack
    rows = list(itertools.islice(events_from_csv(fashion_data / "products.csv", image_root),
                                 *CLUSTER_ROWS))
    for event in rows:
        stage_image(fashion_data, image_root, event.product_id)
    publish(stack, rows)
    old = read_registry(stack.kafka_settings()).active
    eventually(lambda: expected_content(rows).items() <= holds(stack, old).items(),
               what="the procedure's products indexed")
    shopper = Shopper(stack.router_url)
    thread = threading.Thread(target=shopper.run)
    thread.start()
    encoder: subprocess.Popen[bytes] | None = None
    router = ("--router", stack.router_url)
    try:
        code, out, err = vitrine_in_router_pod(
            stack, "model", "add", "offline", "--arch", "vitrine-minilm-efflite0", "--cluster")
        assert code == 0, err
        candidate = "vitrine-minilm-efflite0@offline#0"
        assert f"added {candidate}" in err
        model_env = parse_env_file(out)  # stdout is the model.env alone
        assert model_env["VITRINE_MODEL_ARCH"] == "vitrine-minilm-efflite0"
        assert model_env["VITRINE_BACKFILL_FROM"] == "catalog.vectors"
        assert not any(n.startswith("encoder-") for n in stack.children), "registry only"
        code, _, err = vitrine_in_router_pod(stack, "model", "promote", candidate, "--cluster",
                                             *router)
        assert code == 1 and "does not cover the catalog" in err and "backfill has" in err, err
        refused_at = len(shopper.answers)

        # its Deployment: the shared settings (vitrine-config) with the model.env on top
        port = free_port()
        encoder = subprocess.Popen(
            [sys.executable, "-m", "services.encoder"],
            env={**os.environ, **stack.children["encoder"].env, **model_env,
                 "VITRINE_ENCODER_PORT": str(port),
                 "VITRINE_ENCODER_STATE_DIR": str(tmp_path / "encoder")},
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "encoder.log").open("wb"),
        )
        eventually(lambda: holds(stack, candidate) == holds(stack, old) or None, timeout_s=300,
                   what="the candidate holding what the active model holds")
        code, out, err = vitrine_in_router_pod(stack, "model", "status", "--cluster", *router,
                                               "--sample-s", "0.5")
        assert code == 0 and candidate in out, out + err
        eventually(lambda: vitrine_in_router_pod(
            stack, "model", "promote", candidate, "--cluster", *router)[0] == 0,
            timeout_s=60, what="promotion once its backfill is committed")
        pid = rows[3].product_id
        found = search_image(stack.router_url, image_root / f"{pid}.jpg", k=5)
        assert found["model_id"] == candidate and ids_of(found)[0] == pid

        code, out, err = vitrine_in_router_pod(stack, "model", "rollback", "--cluster", *router)
        assert code == 0 and f"{old} is the active model again" in out, out + err
        code, out, err = vitrine_in_router_pod(stack, "model", "retire", candidate, "--cluster")
        assert code == 0 and "delete its encoder Deployment" in out, out + err
        time.sleep(0.5)  # a few answers after the retirement too
    finally:
        shopper.done.set()
        thread.join()
        if encoder is not None:
            encoder.terminate()
            encoder.wait(timeout=30)

    assert shopper.served_throughout(), [a for a in shopper.answers
                                         if a.status != 200 or a.partial][:5]
    assert {a.model_id for a in shopper.answers} <= {old, candidate}
    assert all(a.model_id == old for a in shopper.answers[:refused_at])
    assert shopper.answers[-1].model_id == old, "rolled back"
    eventually(lambda: all(
        list(ShardStats.model_validate(http_json(f"{url}/stats")[1]).models) == [old]
        for url in stack.shard_urls), what="every shard dropping the retired model's index")
