"""Re-sharding 2 -> 3 -> 4 on a real broker while the router serves: every query answers in
full, and each new fleet ends with every product, at its latest version, on exactly the shard
that owns its partition. A stack of its own, so the shared one keeps its 2 shards."""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from proto.catalog import CatalogEvent
from tests.conftest import stage_image
from tests.helpers import (
    Shopper,
    assert_shards_show_latest_fields,
    content,
    eventually,
    expected_content,
    http_json,
    latest_events,
    publish,
    script,
    search_text,
    shard_vectors,
    supervised_stack,
)
from vitrine.catalog import events_from_csv
from vitrine.cli import main as cli
from vitrine.cli.stack import LocalStack, StackSettings, read_run_file
from vitrine.cli.status import probe
from vitrine.errors import VitrineError
from vitrine.kafka import partition_for

pytestmark = pytest.mark.stack

ROWS = (3200, 3500)  # rows of products.csv that no other test publishes
SIZE = ROWS[1] - ROWS[0]


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory: pytest.TempPathFactory, image_root: Path) -> Iterator[LocalStack]:
    """`vitrine up` in miniature: supervised, with the control server `vitrine reshard` uses."""
    settings = StackSettings(
        num_shards=2, router_port=0, state_dir=tmp_path_factory.mktemp("reshard"),
        image_file_root=image_root, kafka_bootstrap=None, redis_url=None,
        deadline_ms=3000,  # 2 busy cores while new shards start: about correctness, not speed
        reshard_drain_s=3.5,  # > the deadline: queries in flight finish on the old fleet
    )
    with supervised_stack(settings) as stack:
        yield stack


@pytest.fixture(scope="module")
def catalog(small_stack: LocalStack, fashion_data: Path, image_root: Path) -> list[CatalogEvent]:
    """`script`'s event stream: its first SIZE upserts are published and indexed here, its
    updates and deletes are left to publish during the re-shard."""
    rows = list(itertools.islice(events_from_csv(fashion_data / "products.csv", image_root), *ROWS))
    for event in rows:
        stage_image(fashion_data, image_root, event.product_id)
    publish(small_stack, rows)
    eventually(lambda: shard_vectors(small_stack.shard_urls) == SIZE, what="catalog indexed")
    return script(rows)




def reshard_under_load(stack: LocalStack, shards: int, during: list[CatalogEvent]) -> str:
    """`vitrine reshard N` against the running stack, with a shopper and a feeder going."""
    shopper = Shopper(stack.router_url)

    def feed() -> None:  # once the new fleet is replaying
        time.sleep(1.0)
        publish(stack, during)

    threads = [threading.Thread(target=shopper.run), threading.Thread(target=feed)]
    for thread in threads:
        thread.start()
    try:
        env = {"VITRINE_STATE_DIR": str(stack.settings.state_dir)}
        result = CliRunner().invoke(cli.app, ["reshard", str(shards)], env=env)
        time.sleep(0.5)  # a few answers from the new fleet too
    finally:
        shopper.done.set()
        for thread in threads:
            thread.join()
    assert result.exit_code == 0, result.output
    assert len(shopper.answers) >= 5, "the shopper should have been served all along"
    assert shopper.served_throughout(), shopper.answers
    totals = [a.shards_total for a in shopper.answers]
    assert totals == sorted(totals) and totals[-1] == shards, "old fleet, then the new one"
    return result.output


def assert_fleet_holds(stack: LocalStack, expected: dict[str, int]) -> None:
    shards = stack.settings.num_shards
    partitions = stack.settings.vector_partitions

    def settled() -> list[dict[str, int]] | None:
        held = [content(url) for url in stack.shard_urls]
        merged = {pid: v for part in held for pid, v in part.items()}
        return held if merged == expected else None

    held = eventually(settled, timeout_s=60, what=f"{shards} shards to hold exactly the catalog")
    assert sum(len(part) for part in held) == len(expected), "a product on two shards"
    for shard, part in enumerate(held):
        assert all(partition_for(pid, partitions) % shards == shard for pid in part)


def admin_fleet(stack: LocalStack) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{stack.router_url}/admin/fleet", headers={"Authorization": f"Bearer {stack.admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_resharding_2_to_3_to_4_keeps_every_product_on_one_shard_and_answers_throughout(
    small_stack: LocalStack, catalog: list[CatalogEvent]
) -> None:
    stack, expected = small_stack, expected_content(catalog)
    old_urls = stack.shard_urls
    output = reshard_under_load(stack, 3, during=catalog[SIZE:])  # updates and deletes
    assert "catching up" in output and "done: 3 shards" in output
    assert_fleet_holds(stack, expected)
    assert_shards_show_latest_fields(stack.shard_urls, stack.settings.vector_partitions, catalog)
    retitled = {pid for pid, e in latest_events(catalog).items()
                if e.op == "upsert" and e.title == "v2"}
    hits = search_text(stack.router_url, "v2", k=100)["results"]  # through the router too
    assert {h["product_id"] for h in hits} & retitled
    assert all(h["title"] == "v2" for h in hits if h["product_id"] in retitled)
    # the new fleet's lexical indexes were built from the log: "v2" is in exactly these titles
    status, lexical = http_json(f"{stack.router_url}/search?q=v2&mode=lexical&k=100"
                                "&collapse=false")
    assert status == 200 and {h["product_id"] for h in lexical["results"]} == retitled
    assert all(probe(f"{url}/healthz")[0] == 0 for url in old_urls), "old fleet stopped"
    assert not (stack.settings.state_dir / "snapshots" / "shard-0").exists()
    found = read_run_file(stack.settings.state_dir)
    assert found is not None and found["shard_urls"] == stack.shard_urls
    fleet = admin_fleet(stack)
    assert fleet["generation"] == 2 and fleet["shard_urls"] == stack.shard_urls

    stack.reshard(4, progress=lambda line: None)  # the same path, without the CLI
    assert_fleet_holds(stack, expected)
    assert_shards_show_latest_fields(stack.shard_urls, stack.settings.vector_partitions, catalog)
    assert sorted(name for name in stack.children if name.startswith("shard-")) == [
        f"shard-g3-{s}" for s in range(4)
    ]
    assert admin_fleet(stack)["num_shards"] == 4


def test_a_new_fleet_that_fails_is_removed_and_the_old_one_serves_on(
    small_stack: LocalStack, catalog: list[CatalogEvent]
) -> None:
    stack = small_stack
    before, children = stack.fleet, set(stack.children)
    env = {"VITRINE_STATE_DIR": str(stack.settings.state_dir)}
    too_many = CliRunner().invoke(cli.app, ["reshard", "99"], env=env)
    assert too_many.exit_code == 1 and "partitions" in too_many.output
    settings = stack.settings
    stack.settings = settings.model_copy(  # the next fleet's shards refuse to start
        update={"service_env": {**settings.service_env, "VITRINE_CONSUME_BATCH": "0"}}
    )
    try:
        with pytest.raises(VitrineError, match="exited with code"):
            stack.reshard(2, progress=lambda line: None)
    finally:
        stack.settings = settings
    assert stack.fleet is before and set(stack.children) == children
    assert admin_fleet(stack)["shard_urls"] == stack.shard_urls
    answer = search_text(stack.router_url, "red dress")
    assert not answer["partial"] and answer["coverage"]["shards_total"] == len(before.urls)
