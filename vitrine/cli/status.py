"""`vitrine status`: one look at the running fleet, from the services' own /stats and /readyz."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from rich.table import Table

from proto.stats import EncoderStats, ShardStats

S = TypeVar("S", bound=BaseModel)


@dataclass(frozen=True)
class StackEndpoints:
    router_url: str
    encoder_url: str
    shard_urls: list[str]


def probe(url: str, timeout_s: float = 2.0) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body); (0, {"error": ...}) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (OSError, ValueError) as exc:
        return 0, {"error": str(exc)}


def status_table(fleet: StackEndpoints, sample_s: float = 1.0) -> Table:
    """Readiness, vectors and lag per shard; readiness, lag and events/s of the encoder."""
    before = _read(f"{fleet.encoder_url}/stats", EncoderStats)
    time.sleep(sample_s)
    table = Table(title="Vitrine fleet")
    for column in ("service", "url", "ready", "vectors", "lag", "throughput", "detail"):
        table.add_column(column, justify="right" if column in ("vectors", "lag") else "left")
    total_vectors = 0
    for url in fleet.shard_urls:
        stats = _read(f"{url}/stats", ShardStats)
        ready_status, ready = probe(f"{url}/readyz")
        if stats is None:
            table.add_row("shard-?", url, _ready(ready_status), "-", "-", "",
                          str(ready.get("error", "")))
            continue
        total_vectors += stats.vectors
        table.add_row(
            f"shard-{stats.shard_id}", url, _ready(ready_status), f"{stats.vectors:,}",
            _lag(stats.lag), "", f"partitions {stats.partitions}",
        )
    after = _read(f"{fleet.encoder_url}/stats", EncoderStats)
    rate = "-"
    if before is not None and after is not None:
        rate = f"{max(0, after.handled - before.handled) / sample_s:.1f} events/s"
    events = after.events if after is not None else {}
    table.add_row(
        "encoder", fleet.encoder_url, _ready(probe(f"{fleet.encoder_url}/readyz")[0]), "",
        _lag(after.lag) if after is not None else "-", rate,
        ", ".join(f"{k} {v:,}" for k, v in sorted(events.items())),
    )
    table.add_row(
        "router", fleet.router_url, _ready(probe(f"{fleet.router_url}/readyz")[0]),
        f"{total_vectors:,}", "", "", "vectors: all shards",
    )
    return table


def _read(url: str, contract: type[S]) -> S | None:
    """A service's /stats as its typed contract, or None if it did not answer with one."""
    status, answer = probe(url)
    if status != 200:
        return None
    try:
        return contract.model_validate(answer)
    except ValidationError:
        return None


def _ready(status: int) -> str:
    return {200: "[green]ready[/]", 0: "[red]down[/]"}.get(status, "[yellow]not ready[/]")


def _lag(lags: dict[int, int]) -> str:
    return f"{sum(lags.values()):,}" if lags else "-"
