"""The Grafana dashboard only charts metrics the running services really export."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from vitrine.cli.stack import LocalStack

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "vitrine-dashboard.json"
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def exported_names(url: str) -> set[str]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    names = set(re.findall(r"^# (?:HELP|TYPE) (\w+)", text, flags=re.M))
    names |= set(re.findall(r"^(\w+)[{ ]", text, flags=re.M))
    return names


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_the_dashboard_covers_the_slos() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for slo in ("query latency", "partial", "encoder lag", "freshness", "memory", "vectors"):
        assert slo in titles, slo
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]


@pytest.mark.stack
def test_every_charted_metric_is_exported(stack: LocalStack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    charted = {
        base_name(name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bvitrine_\w+", target["expr"])
    }
    exported: set[str] = set()
    for url in [stack.router_url, stack.encoder_url, *stack.shard_urls]:
        exported |= {base_name(name) for name in exported_names(url)}
    assert charted, "no metrics charted"
    assert charted <= exported, sorted(charted - exported)
