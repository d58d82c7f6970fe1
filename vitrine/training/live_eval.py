"""The eval's queries through a running router, one served model after another (`model=`):
the table a data scientist reads before `vitrine model promote`.

A live catalog is whatever was published, so relevance is judged on what comes back: a hit is
graded from the attributes it shows, as the offline eval grades (2: every attribute the query
names matches, 1: its article type only), and NDCG@10 is taken against the pooled judgements
(the best grades among every compared model's hits, TREC-style), so the models are compared on
one scale. Also: P@10 (fully relevant hits in the top 10) and MRR (first fully relevant hit).
Covered by tests/training/test_eval.py and tests/e2e/test_models.py.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from vitrine.errors import VitrineError
from vitrine.training.data import PATTERN, pattern_words
from vitrine.training.eval import QUERY_GROUPS, QUERY_TEMPLATES, Query

K = 10
LIVE_METRICS = ("ndcg@10 pooled", "p@10", "mrr")


def grade(query: Query, attributes: Mapping[str, str], title: str = "") -> int:
    """2: everything the query names matches (case-insensitively; a pattern or material word:
    in the title), 1: the article type only."""
    def same(key: str) -> bool:
        if key == PATTERN:
            return query.wanted[key] in pattern_words(title)
        return attributes.get(key, "").strip().casefold() == query.wanted[key].casefold()

    if all(same(key) for key in query.wanted):
        return 2
    return int("article_type" in query.wanted and same("article_type"))


def live_metrics(
    ranked: Mapping[str, Sequence[tuple[str, int]]],
) -> dict[str, dict[str, float]]:
    """One query's metrics per model, from each model's ranked (product id, grade) hits."""
    pooled: dict[str, int] = {}
    for hits in ranked.values():
        pooled.update(hits)
    ideal = sorted(pooled.values(), reverse=True)[:K]
    discount = 1 / np.log2(np.arange(2, K + 2))
    ideal_gain = float((2.0 ** np.array(ideal, dtype=float) - 1) @ discount[: len(ideal)])
    out = {}
    for model, hits in ranked.items():
        grades = np.array([g for _, g in hits[:K]], dtype=float)
        gain = float((2.0**grades - 1) @ discount[: len(grades)])
        full = [i for i, g in enumerate(grades) if g == 2]
        out[model] = {
            "ndcg@10 pooled": gain / ideal_gain if ideal_gain else 0.0,
            "p@10": len(full) / K,
            "mrr": 1 / (full[0] + 1) if full else 0.0,
        }
    return out


def evaluate_live(
    router_url: str, models: Sequence[str], queries: Sequence[Query], mode: str = "dense"
) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {query group: {metric: percent}}}: the same queries, each model's answer."""
    per_query: dict[str, list[dict[str, float]]] = {m: [] for m in models}
    kinds: list[str] = []
    for query in tqdm(queries, desc="queries", unit="q"):
        ranked = {m: _ranked(router_url, query, m, mode) for m in models}
        for model, metrics in live_metrics(ranked).items():
            per_query[model].append(metrics)
        kinds.append(query.kind)
    groups = {"all": [True] * len(kinds)} | {
        name: [k in members for k in kinds] for name, members in QUERY_GROUPS.items()
    } | {kind: [k == kind for k in kinds] for kind in QUERY_TEMPLATES}
    return {
        model: {
            name: {m: float(100 * np.mean([r[m] for r, keep in zip(rows, mask, strict=True)
                                           if keep])) if any(mask) else float("nan")
                   for m in LIVE_METRICS} | {"queries": sum(mask)}
            for name, mask in groups.items()
        }
        for model, rows in per_query.items()
    }


def live_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    groups = ["all", *QUERY_GROUPS]
    head = "| model | " + " | ".join(f"{g} NDCG@10 (pooled) / P@10 / MRR" for g in groups)
    lines = [head + " |", "|" + " --- |" * (1 + len(groups))]
    for model, result in results.items():
        cells = [" / ".join(f"{result[g][m]:.1f}" for m in LIVE_METRICS) for g in groups]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ranked(router_url: str, query: Query, model: str, mode: str) -> list[tuple[str, int]]:
    params = urllib.parse.urlencode({"q": query.text, "k": K, "model": model, "mode": mode,
                                     "collapse": "false"})
    try:
        with urllib.request.urlopen(f"{router_url}/search?{params}", timeout=30) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise VitrineError(f"the router refused {model!r}: {exc.read()[:300].decode()}") from None
    if answer["partial"]:
        raise VitrineError(f"a partial answer for {model!r} ({answer['partial_reason']}): "
                           "the comparison needs every shard")
    return [(hit["product_id"], grade(query, hit["attributes"], hit["title"]))
            for hit in answer["results"]]
