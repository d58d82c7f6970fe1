"""`vitrine status` against the running stack."""

from __future__ import annotations

import pytest
from rich.console import Console

from tests.helpers import shard_vectors
from vitrine.cli.stack import LocalStack
from vitrine.cli.status import StackEndpoints, status_table

pytestmark = pytest.mark.stack


def render(stack: LocalStack) -> str:
    console = Console(record=True, width=200)
    console.print(
        status_table(
            StackEndpoints(stack.router_url, stack.encoder_url, stack.shard_urls), sample_s=0.1
        )
    )
    return console.export_text()


def test_status_shows_every_shard_ready_with_its_vectors(stack: LocalStack) -> None:
    text = render(stack)
    for shard in range(stack.settings.num_shards):
        assert f"shard-{shard}" in text
    assert "encoder" in text and "router" in text
    assert text.count("not ready") == 0 and text.count("ready") >= 4
    assert f"{shard_vectors(stack.shard_urls):,}" in text


def test_status_shows_a_stopped_shard_as_down(stack: LocalStack) -> None:
    stack.stop_child("shard-1")
    try:
        text = render(stack)
        shard_line = next(line for line in text.splitlines() if stack.shard_urls[1] in line)
        assert "down" in shard_line
    finally:
        stack.start_child("shard-1")
