"""Chaos on a supervised stack, as `vitrine up` runs it: kill -9 the encoder in the middle of
a batch and the router under load, and hang the encoder on one event. Nothing is lost or
duplicated, the supervisor heals every process, and the event that hangs the encoder each time
is quarantined to the dead-letter topic instead of killing it forever."""

from __future__ import annotations

import base64
import http.server
import itertools
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from proto.catalog import CatalogEvent
from services.router.settings import RouterSettings
from tests.conftest import stage_image
from tests.helpers import (
    DeadLetterReader,
    content,
    eventually,
    expected_content,
    http_json,
    script,
)
from vitrine.catalog import events_from_csv
from vitrine.cli.ingest import EventPublisher
from vitrine.cli.stack import LocalStack, StackSettings
from vitrine.cli.status import probe

pytestmark = pytest.mark.stack

STALL_S = 5  # the encoder's stall timeout here: a batch longer than this fails /healthz
DEFAULT_DEADLINE_MS = RouterSettings.model_fields["deadline_ms"].default  # what `vitrine up` has


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory: pytest.TempPathFactory, image_root: Path) -> Iterator[LocalStack]:
    settings = StackSettings(
        num_shards=1, router_port=0, state_dir=tmp_path_factory.mktemp("chaos"),
        image_file_root=image_root, kafka_bootstrap=None, redis_url=None,
        deadline_ms=3000, allow_private_networks=True,  # the hanging image server is local
        service_env={
            "VITRINE_BATCH_SIZE": "8",
            "VITRINE_STALL_TIMEOUT_S": str(STALL_S),
            "VITRINE_FETCH_TIMEOUT_S": "120",  # longer than the stall: the hang is not cut off
            "VITRINE_MAX_ATTEMPTS": "2",
            "VITRINE_SNAPSHOT_INTERVAL_S": "2",
        },
    )
    stack = LocalStack(settings)
    stack.start()
    stack.supervise(base_delay_s=0.2, probe_period_s=0.5, probe_failures=2)
    yield stack
    stack.stop()


def _rows(fashion_data: Path, image_root: Path, start: int, stop: int) -> list[CatalogEvent]:
    rows = list(itertools.islice(events_from_csv(fashion_data / "products.csv", image_root),
                                 start, stop))
    for event in rows:
        stage_image(fashion_data, image_root, event.product_id)
    return rows


def _restarted(stack: LocalStack, name: str, old: object) -> bool:
    child = stack.children[name]
    return child.process is not old and probe(child.health_url or "")[0] == 200


def test_the_first_image_query_after_start_is_complete_within_the_default_deadline(
    chaos_stack: LocalStack, fashion_data: Path
) -> None:
    """The first "shop the look" of a fresh router: every tower was warmed before ready, so it
    spends a few ms, not the whole deadline (this module's stack starts first in the suite)."""
    picture = base64.b64encode((fashion_data / "images" / "1163.jpg").read_bytes()).decode()
    request = urllib.request.Request(
        f"{chaos_stack.router_url}/search", data=json.dumps({"image_b64": picture}).encode(),
        headers={"Content-Type": "application/json",
                 "X-Vitrine-Budget-Ms": str(DEFAULT_DEADLINE_MS)},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    assert answer["partial"] is False, answer
    assert answer["coverage"]["shards_answered"] == 1


def test_kill_9_of_the_encoder_mid_batch_loses_and_duplicates_nothing(
    chaos_stack: LocalStack, fashion_data: Path, image_root: Path
) -> None:
    stack, s = chaos_stack, chaos_stack.settings
    stream = script(_rows(fashion_data, image_root, 4000, 4400))
    publisher = EventPublisher(stack.kafka_bootstrap, s.events_topic, s.event_partitions)
    for event in stream:
        publisher.publish(event)
    publisher.flush()
    encoder = stack.children["encoder"]
    old = encoder.process
    assert old is not None
    eventually(
        lambda: http_json(f"{stack.encoder_url}/stats")[1]["events"].get("indexed", 0) > 0,
        timeout_s=120, what="the encoder under way",
    )
    os.kill(old.pid, signal.SIGKILL)  # somewhere between consuming and committing a batch
    eventually(lambda: _restarted(stack, "encoder", old), timeout_s=180,
               what="the encoder restarted by the supervisor")
    expected = expected_content(stream)
    eventually(lambda: content(stack.shard_urls[0]) == expected, timeout_s=180,
               what="the shard to hold exactly the products the events say")
    assert http_json(f"{stack.shard_urls[0]}/stats")[1]["vectors"] == len(expected)


def test_the_router_killed_under_load_is_healed_and_never_answers_5xx(
    chaos_stack: LocalStack,
) -> None:
    stack = chaos_stack
    statuses: Counter[int | str] = Counter()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"{stack.router_url}/search?q=shirt&k=5",
                                            timeout=10) as response:
                    statuses[response.status] += 1
            except urllib.error.HTTPError as exc:
                statuses[exc.code] += 1
            except OSError:
                statuses["unreachable"] += 1  # the router is down: no answer, not a wrong one
                time.sleep(0.1)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        eventually(lambda: statuses[200] >= 10, what="queries answered before the kill")
        old = stack.children["router"].process
        assert old is not None
        os.kill(old.pid, signal.SIGKILL)
        eventually(lambda: _restarted(stack, "router", old), timeout_s=180,
                   what="the router restarted by the supervisor")
        answered = statuses[200]
        eventually(lambda: statuses[200] >= answered + 10, what="queries answered again")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not [status for status in statuses if isinstance(status, int) and status >= 500]
    status, answer = http_json(f"{stack.router_url}/search?q=shirt&k=5")
    assert status == 200 and not answer["partial"] and len(answer["results"]) == 5


@pytest.fixture
def hanging_image_server() -> Iterator[str]:
    """An image host that accepts the request and then never answers."""

    class Hang(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            time.sleep(600)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hang)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_event_that_hangs_the_encoder_every_time_is_quarantined(
    chaos_stack: LocalStack, fashion_data: Path, image_root: Path, hanging_image_server: str
) -> None:
    stack, s = chaos_stack, chaos_stack.settings
    good = _rows(fashion_data, image_root, 4500, 4520)
    poison = CatalogEvent(op="upsert", product_id="hangs-forever", version=1,
                          image_uri=f"{hanging_image_server}/slow.jpg")
    baseline = http_json(f"{stack.shard_urls[0]}/stats")[1]["vectors"]
    reader = DeadLetterReader(stack.kafka_bootstrap, s.dlq_topic)
    publisher = EventPublisher(stack.kafka_bootstrap, s.events_topic, s.event_partitions)
    for event in [*good[:10], poison, *good[10:]]:
        publisher.publish(event)
    publisher.flush()

    letter = reader.wait_for({b"hangs-forever"}, timeout_s=300)[b"hangs-forever"]
    reader.close()
    assert letter.stage == "quarantine" and letter.attempts == 2  # max_attempts, each one died
    assert "died on it" in letter.reason
    assert stack._supervisor is not None
    assert stack._supervisor.liveness_kills.get("encoder", 0) >= 2  # /healthz said: stalled
    eventually(
        lambda: http_json(f"{stack.shard_urls[0]}/stats")[1]["vectors"] == baseline + len(good),
        timeout_s=180, what="every good product indexed around the one that hangs",
    )
    eventually(lambda: probe(f"{stack.encoder_url}/healthz")[0] == 200, timeout_s=180,
               what="a healthy encoder again")
