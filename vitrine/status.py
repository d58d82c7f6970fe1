"""`vitrine status`: one look at the running fleet, from the services' own /stats and /readyz."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from rich.table import Table


@dataclass(frozen=True)
class Fleet:
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


def fleet_table(fleet: Fleet, sample_s: float = 1.0) -> Table:
    """Readiness, vectors and lag per shard; readiness, lag and events/s of the encoder."""
    _, before = probe(f"{fleet.encoder_url}/stats")
    time.sleep(sample_s)
    table = Table(title="Vitrine fleet")
    for column in ("service", "url", "ready", "vectors", "lag", "throughput", "detail"):
        table.add_column(column, justify="right" if column in ("vectors", "lag") else "left")
    total_vectors = 0
    for url in fleet.shard_urls:
        status, stats = probe(f"{url}/stats")
        ready_status, ready = probe(f"{url}/readyz")
        vectors = stats.get("vectors", 0)
        total_vectors += vectors
        table.add_row(
            f"shard-{stats.get('shard_id', '?')}", url, _ready(ready_status),
            f"{vectors:,}" if status else "-", _lag(stats), "",
            f"partitions {stats.get('partitions', '?')}" if status else ready.get("error", ""),
        )
    status, after = probe(f"{fleet.encoder_url}/stats")
    rate = _rate(before, after, sample_s) if status else "-"
    events = after.get("events", {})
    table.add_row(
        "encoder", fleet.encoder_url, _ready(probe(f"{fleet.encoder_url}/readyz")[0]), "",
        _lag(after), rate, ", ".join(f"{k} {v:,}" for k, v in sorted(events.items())),
    )
    table.add_row(
        "router", fleet.router_url, _ready(probe(f"{fleet.router_url}/readyz")[0]),
        f"{total_vectors:,}", "", "", "vectors: all shards",
    )
    return table


def _ready(status: int) -> str:
    return {200: "[green]ready[/]", 0: "[red]down[/]"}.get(status, "[yellow]not ready[/]")


def _lag(stats: dict[str, Any]) -> str:
    lags = stats.get("lag")
    return f"{sum(lags.values()):,}" if lags else "-"


def _rate(before: dict[str, Any], after: dict[str, Any], seconds: float) -> str:
    handled = sum(after.get("events", {}).values()) - sum(before.get("events", {}).values())
    return f"{max(0, handled) / seconds:.1f} events/s"
