"""`vitrine`: run the local stack, publish a catalog, query the router, print the contract."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from proto.catalog import catalog_event_json_schema
from proto.stats import EncoderStats, ShardStats
from vitrine.catalog import count_rows, events_from_csv
from vitrine.cli.control import ControlServer, request_control, request_reshard
from vitrine.cli.ingest import EventPublisher, publish_all
from vitrine.cli.models import ServingTarget
from vitrine.cli.stack import LocalStack, StackSettings, read_run_file
from vitrine.cli.status import StackEndpoints, status_table
from vitrine.errors import VitrineError
from vitrine.service import configure_logging

DEFAULT_DATA = Path("../shared/data/fashion")
T = TypeVar("T")

app = typer.Typer(help="Vitrine: streaming multimodal product search.", no_args_is_help=True)
model_app = typer.Typer(
    help="Roll a model forward beside the active one: add, status, promote, rollback, retire.",
    no_args_is_help=True,
)
app.add_typer(model_app, name="model")


@app.command()
def schema() -> None:
    """Print the JSON Schema of CatalogEvent, for publishers in other languages."""
    typer.echo(json.dumps(catalog_event_json_schema(), indent=2))


@app.command()
def up(
    shards: Annotated[int | None, typer.Option(help="number of shards")] = None,
    port: Annotated[int | None, typer.Option(help="router port")] = None,
    file_root: Annotated[Path | None, typer.Option(help="allow file:// images below")] = None,
) -> None:
    """Start the local stack (Tansu, Redis, shards, encoder, router) until Ctrl-C."""
    stack = LocalStack(_stack_settings(shards, port, file_root))
    stack.start()
    stack.supervise()
    control = ControlServer(stack)  # `vitrine reshard` asks this process to do it
    control.start()
    typer.echo(f"Vitrine is up: {stack.router_url}/search?q=red+shoes  (Ctrl-C to stop)")
    cache = stack.redis_url or "none (in-process query cache only)"
    typer.echo(f"broker {stack.kafka_bootstrap}  query cache {cache}  logs {stack.log_dir}")
    _wait_for_signal()
    typer.echo("stopping...")
    control.stop()
    stack.stop()


@app.command()
def ingest(
    csv_path: Annotated[Path, typer.Argument(help="products.csv", exists=True, dir_okay=False)],
    images: Annotated[Path, typer.Option(help="directory of <id>.jpg", exists=True)],
    limit: Annotated[int | None, typer.Option(help="publish at most N products")] = None,
    price_column: Annotated[str | None, typer.Option(help="the CSV column of prices")] = None,
    stock_column: Annotated[
        str | None, typer.Option(help="the CSV column of availability (true/false)")
    ] = None,
) -> None:
    """Publish a catalog CSV as CatalogEvents to the running stack."""
    settings = StackSettings()
    endpoints = _endpoints(settings)
    total = min(count_rows(csv_path), limit) if limit is not None else count_rows(csv_path)
    publisher = EventPublisher(
        endpoints["kafka_bootstrap"], endpoints["events_topic"], endpoints["event_partitions"]
    )
    events = events_from_csv(csv_path, images, limit, price_column=price_column,
                             stock_column=stock_column)
    published = publish_all(publisher, events, total)
    typer.echo(f"published {published} events to {endpoints['events_topic']}")


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="what the shopper types")],
    k: Annotated[int, typer.Option("-k", help="results")] = 10,
    router: Annotated[str | None, typer.Option(help="router URL")] = None,
) -> None:
    """Query the router and print the answer."""
    url = router or _endpoints(StackSettings())["router_url"]
    answer = query_router(url, text, k)
    _print_answer(answer)


@app.command()
def status(
    watch: Annotated[bool, typer.Option(help="refresh until Ctrl-C")] = False,
) -> None:
    """Shards, vectors per shard, lag, readiness and encoder throughput of the running stack."""
    found = read_run_file(StackSettings().state_dir)
    if found is None:
        raise typer.BadParameter("no running stack found: start `vitrine up` first")
    fleet = StackEndpoints(found["router_url"], found["encoder_url"], found["shard_urls"])
    console = Console()
    while True:
        console.print(status_table(fleet))
        if not watch:
            return
        time.sleep(1.0)


@app.command()
def reshard(
    shards: Annotated[int, typer.Argument(help="the new number of shards")],
) -> None:
    """Re-shard the running stack without downtime: a new fleet replays its partitions beside
    the old one, the router switches once all of it is ready, then the old fleet stops."""
    found = read_run_file(StackSettings().state_dir)
    if found is None:
        raise typer.BadParameter("no running stack found: start `vitrine up` first")
    try:
        for line in request_reshard(found, shards):
            typer.echo(line)
    except VitrineError as exc:
        typer.secho(f"re-shard failed: {exc}", err=True, fg="red")
        raise typer.Exit(1) from None


Cluster = Annotated[bool, typer.Option(
    "--cluster", help="a cluster, not the local stack: the broker and the shards from the "
    "VITRINE_* settings (run it in a router pod: kubectl exec deploy/vitrine-router -- ...)")]
def _router_url(value: str | None) -> str | None:
    """Checked before anything changes: a switch is written first and confirmed on it after."""
    if value is None:
        return None
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise typer.BadParameter(f"{value!r} is not an http(s)://host[:port] URL")
    return value.rstrip("/")


RouterUrl = Annotated[str | None, typer.Option(
    help="with --cluster: the router to confirm a switch on (default: this pod's; the "
    "Service, e.g. http://vitrine-router, asks every pod in turn)", callback=_router_url)]


@model_app.command("add")
def model_add(
    weights: Annotated[str, typer.Argument(help="checkpoint path, shipped name, tag or 'offline'")],
    arch: Annotated[str | None, typer.Option(help="architecture (default: the settings')")] = None,
    seed: Annotated[int, typer.Option(help="init seed of untrained parts")] = 0,
    text_runtime: Annotated[str, typer.Option(help="auto, torch, onnx or onnx-int8")] = "auto",
    cluster: Cluster = False,
) -> None:
    """Serve a candidate model beside the active one: its encoder backfills the catalog from
    the active model's vector log and follows new events; the shards build its index. With
    --cluster only the registry is written, and the candidate encoders' settings are printed
    (its model.env for deploy/k8s: see the README, "Model roll-forward")."""
    if not cluster:
        _control("/model/add", {"architecture": arch, "weights": weights or None, "seed": seed,
                                "text_runtime": text_runtime})
        return
    from vitrine.cli.models import add_candidate, model_env

    target = _cluster_target(None)
    entry = _cluster_step("add", lambda: add_candidate(target.kafka, arch, weights or None,
                                                       seed, text_runtime))
    typer.echo(f"added {entry.model_id} (vectors on {entry.vectors_topic}); apply its encoder "
               "Deployment with the settings below", err=True)
    typer.echo(model_env(entry, target.kafka), nl=False)


@model_app.command("env")
def model_env_of(
    model_id: Annotated[str, typer.Argument(help="a served model")],
    cluster: Cluster = False,
) -> None:
    """Print a served model's encoder settings (the model.env of its Kubernetes encoder)."""
    from vitrine.cli.models import model_env
    from vitrine.registry import read_registry

    target = _target(cluster, None)
    entry = _cluster_step("env", lambda: read_registry(target.kafka).entry(model_id))
    typer.echo(model_env(entry, target.kafka), nl=False)


@model_app.command("promote")
def model_promote(
    model_id: Annotated[str, typer.Argument(help="the candidate's model id")],
    cluster: Cluster = False, router: RouterUrl = None,
) -> None:
    """Make a candidate the active model; refused until it covers the catalog."""
    if not cluster:
        _control("/model/promote", {"model_id": model_id})
        return
    from vitrine.cli.models import promote

    _cluster_step("promote", lambda: promote(_cluster_target(router), model_id, typer.echo))


@model_app.command("rollback")
def model_rollback(cluster: Cluster = False, router: RouterUrl = None) -> None:
    """Switch back to the model that was active before the last promotion."""
    if not cluster:
        _control("/model/rollback", {})
        return
    from vitrine.cli.models import rollback

    _cluster_step("rollback", lambda: rollback(_cluster_target(router), typer.echo))


@model_app.command("retire")
def model_retire(
    model_id: Annotated[str, typer.Argument(help="a model that is not active")],
    cluster: Cluster = False,
) -> None:
    """Stop serving a model: its encoder stops and the shards free its index."""
    if not cluster:
        _control("/model/retire", {"model_id": model_id})
        return
    from vitrine.cli.models import retire

    _cluster_step("retire", lambda: retire(_cluster_target(None).kafka, model_id))
    typer.echo(f"retired {model_id}: the shards drop its index; delete its encoder Deployment "
               "(the README, \"Model roll-forward\", step 6)")


@model_app.command("status")
def model_status(
    sample_s: Annotated[float, typer.Option(help="seconds between the two rate samples")] = 2.0,
    cluster: Cluster = False, router: RouterUrl = None,
) -> None:
    """Each served model: vectors against the catalog, shards caught up, backfill rate, ETA."""
    from vitrine.cli.models import coverage
    from vitrine.registry import read_registry

    target = _target(cluster, router)
    registry = read_registry(target.kafka)
    before = {c.model_id: c for c in coverage(registry, target)}
    time.sleep(sample_s)
    table = Table(title=f"Vitrine models (registry revision {registry.revision})")
    for column in ("model", "role", "vectors", "coverage", "shards", "backfill left",
                   "rate", "ETA", "promotable"):
        table.add_column(column)
    for now in coverage(registry, target):
        was = before[now.model_id]
        if now.encoded is not None and was.encoded is not None:  # events and records handled
            rate = max(0, now.encoded - was.encoded) / sample_s
        else:  # many encoders: how fast their backfill shrinks
            rate = max(0, (was.backfill_left or 0) - (now.backfill_left or 0)) / sample_s
        left = now.backfill_left
        eta = "-" if not left else (f"{left / rate:.0f} s" if rate > 0 else "stalled")
        problems = now.problems()
        index = now.index
        table.add_row(
            now.model_id, "active" if now.active else "candidate", f"{index.vectors:,}",
            f"{index.ratio:.1%}", f"{index.shards_caught_up}/{index.shards} caught up",
            "-" if left is None else f"{left:,}", f"{rate:.1f}/s", eta,
            "yes" if not problems else "; ".join(problems),
        )
    console = Console()
    if not console.is_terminal:  # piped or captured: whole model ids, never cut to fit 80
        console.width = 240
    console.print(table)


def _target(cluster: bool, router: str | None) -> ServingTarget:
    """The served models of a cluster (`--cluster`) or of the running `vitrine up`."""
    if cluster:
        return _cluster_target(router)
    found = _run_info()
    return ServingTarget.of_run_file(found, StackSettings(kafka_bootstrap=found["kafka_bootstrap"]))


def _cluster_target(router: str | None) -> ServingTarget:
    from services.router.settings import RouterSettings

    settings = RouterSettings()  # what the router in this pod reads
    return ServingTarget(settings, [address.replicas[0] for address in settings.shard_urls],
                         router or f"http://127.0.0.1:{settings.router_port}")


def _cluster_step(what: str, step: Callable[[], T]) -> T:
    try:
        return step()
    except VitrineError as exc:
        typer.secho(f"{what} failed: {exc}", err=True, fg="red")
        raise typer.Exit(1) from None


def _run_info() -> dict[str, Any]:
    found = read_run_file(StackSettings().state_dir)
    if found is None:
        raise typer.BadParameter("no running stack found: start `vitrine up` first")
    return found


def _control(path: str, args: dict[str, Any]) -> None:
    try:
        for line in request_control(_run_info(), path, args):
            typer.echo(line)
    except VitrineError as exc:
        typer.secho(f"{path.rsplit('/', 1)[-1]} failed: {exc}", err=True, fg="red")
        raise typer.Exit(1) from None


@app.command()
def demo(
    data: Annotated[Path, typer.Option(help="fashion dataset dir")] = DEFAULT_DATA,
    limit: Annotated[int, typer.Option(help="products to ingest")] = 1000,
    shards: Annotated[int, typer.Option(help="number of shards")] = 2,
) -> None:
    """Bring the stack up, ingest a catalog, wait until it is searchable, query it, stop."""
    data = data.resolve()
    settings = _stack_settings(shards, 0, data)
    stack = LocalStack(settings)
    stack.start()
    try:
        typer.echo(f"stack up: router {stack.router_url}")
        publisher = EventPublisher(
            stack.kafka_bootstrap, settings.events_topic, settings.event_partitions
        )
        total = min(limit, count_rows(data / "products.csv"))
        events = events_from_csv(data / "products.csv", data / "images", limit)
        published = publish_all(publisher, events, total)
        typer.echo(f"published {published} events; waiting until searchable...")
        indexed = wait_until_indexed(stack, published)
        typer.echo(f"{indexed} products searchable")
        for text in ("red dress", "men black leather shoes", "blue denim jeans"):
            typer.echo(f"\n$ vitrine search {text!r}")
            _print_answer(query_router(stack.router_url, text, 5))
        # text relevance needs the trained projection (`vitrine train`); image search works now
        first = next(events_from_csv(data / "products.csv", data / "images", 1))
        picture = data / "images" / f"{first.product_id}.jpg"
        typer.echo(f"\nshop the look: POST /search with the picture of {first.product_id}")
        _print_answer(query_router_image(stack.router_url, picture, 5))
    finally:
        stack.stop()


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="fashion dataset dir")] = DEFAULT_DATA,
    out: Annotated[Path | None, typer.Option(help="checkpoint to write")] = None,
    epochs: Annotated[int | None, typer.Option(help="image-tower epochs")] = None,
    trainable_blocks: Annotated[int | None, typer.Option(help="trunk stages to fine-tune")] = None,
    fusion_epochs: Annotated[int | None, typer.Option(help="fusion epochs (0: none)")] = None,
    limit: Annotated[int | None, typer.Option(help="first N products only")] = None,
) -> None:
    """Train the image tower and the product-side fusion (VITRINE_TRAIN_* settings)."""
    from vitrine.training.train import TrainSettings
    from vitrine.training.train import train as run_training

    options: dict[str, Any] = {"data_dir": data, "out": out, "epochs": epochs, "limit": limit,
               "trainable_blocks": trainable_blocks, "fusion_epochs": fusion_epochs}
    settings = TrainSettings(**{k: v for k, v in options.items() if v is not None})
    result = run_training(settings)
    typer.echo(f"trained in {result.seconds:.0f}s: {result.checkpoint}")
    typer.echo(f"serve it: VITRINE_MODEL_ARCH={settings.architecture} "
               f"VITRINE_MODEL_WEIGHTS={result.checkpoint}")


@app.command("eval")
def evaluate(
    data: Annotated[Path, typer.Option(help="fashion dataset dir")] = DEFAULT_DATA,
    arch: Annotated[str | None, typer.Option(help="architecture (default: the services')")] = None,
    weights: Annotated[list[str] | None, typer.Option(help="weights; repeat to compare")] = None,
    split: Annotated[str, typer.Option(help="test or val")] = "test",
    json_out: Annotated[Path | None, typer.Option("--json", help="write all metrics")] = None,
    router: Annotated[str | None, typer.Option(
        help="score a running stack instead: its router URL ('up': the local one)")] = None,
    model: Annotated[list[str] | None, typer.Option(
        help="with --router: a served model id; repeat to compare (default: every one)")] = None,
    queries: Annotated[int, typer.Option(help="with --router: how many queries")] = 300,
) -> None:
    """Text-to-image retrieval metrics under the four catalog conditions, as a table; with
    --router, the same queries through a running stack, model by model, side by side."""
    from vitrine.model import ModelSpec
    from vitrine.settings import CommonSettings
    from vitrine.training.eval import evaluate_spec, markdown_table

    if split not in ("test", "val"):
        raise typer.BadParameter("split must be test or val")
    if router is not None:
        results = _evaluate_live(router, model, data, "val" if split == "val" else "test",
                                 queries)
        if json_out is not None:
            json_out.write_text(json.dumps(results, indent=2))
        return
    default = CommonSettings().model_spec()
    specs = [ModelSpec(arch or default.architecture, w or None, default.seed)
             for w in (weights or [default.weights or ""])]
    results = {spec.model_id: evaluate_spec(spec, data, "val" if split == "val" else "test")
               for spec in specs}
    typer.echo(markdown_table(results))
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2))


def _evaluate_live(
    router: str, models: list[str] | None, data: Path, split: Literal["test", "val"],
    count: int,
) -> dict[str, Any]:
    from vitrine.registry import read_registry
    from vitrine.training.data import in_split, load_products
    from vitrine.training.eval import build_queries
    from vitrine.training.live_eval import evaluate_live, live_table

    if router == "up" or not models:
        found = _run_info()
        router = found["router_url"] if router == "up" else router
        if not models:
            registry = read_registry(StackSettings(kafka_bootstrap=found["kafka_bootstrap"]))
            models = [registry.active, *(m.model_id for m in registry.candidates)]
    built = build_queries(in_split(load_products(data), split))
    step = max(1, len(built) // max(1, count))
    results = evaluate_live(router, models, built[::step][:count])
    typer.echo(live_table(results))
    return results


def wait_until_indexed(stack: LocalStack, published: int, timeout_s: float = 600) -> int:
    """Until the encoder has handled every event and the shards hold what it indexed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        encoder = EncoderStats.model_validate(_get_json(f"{stack.encoder_url}/stats"))
        held = sum(
            ShardStats.model_validate(_get_json(f"{url}/stats")).vectors for url in stack.shard_urls
        )
        events = encoder.events
        indexed = events.get("indexed", 0) - events.get("deleted", 0)
        if encoder.handled >= published and held >= indexed:
            return held
        time.sleep(0.5)
    raise VitrineError(f"catalog not searchable after {timeout_s}s")


def query_router(router_url: str, text: str, k: int) -> dict[str, Any]:
    params = urllib.parse.urlencode({"q": text, "k": k})
    return _get_json(f"{router_url}/search?{params}")


def query_router_image(router_url: str, picture: Path, k: int) -> dict[str, Any]:
    body = json.dumps({"image_b64": base64.b64encode(picture.read_bytes()).decode(), "k": k})
    request = urllib.request.Request(
        f"{router_url}/search", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _print_answer(answer: dict[str, Any]) -> None:
    for rank, hit in enumerate(answer["results"], 1):
        typer.echo(f"{rank:>3}. {hit['score']:.3f}  {hit['product_id']:>8}  {hit['title']}")
    flag = f" PARTIAL, missing shards {answer['missing_shards']}" if answer["partial"] else ""
    typer.echo(f"     {len(answer['results'])} results in {answer['took_ms']:.1f} ms{flag}")


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _stack_settings(shards: int | None, port: int | None, file_root: Path | None) -> StackSettings:
    overrides: dict[str, Any] = {}
    if shards is not None:
        overrides["num_shards"] = shards
    if port is not None:
        overrides["router_port"] = port
    if file_root is not None:
        overrides["image_file_root"] = file_root.resolve()
    settings = StackSettings(**overrides)
    configure_logging("vitrine", settings.log_level, json=False)
    return settings


def _endpoints(settings: StackSettings) -> dict[str, Any]:
    """Explicit settings win; otherwise the run file that `vitrine up` wrote."""
    found = read_run_file(settings.state_dir) or {}
    explicit = settings.model_fields_set

    def pick(name: str, default: Any) -> Any:
        return getattr(settings, name) if name in explicit else found.get(name, default)

    endpoints = {
        "kafka_bootstrap": settings.kafka_bootstrap or found.get("kafka_bootstrap"),
        "router_url": found.get("router_url") or f"http://127.0.0.1:{settings.router_port}",
        "events_topic": pick("events_topic", settings.events_topic),
        "event_partitions": pick("event_partitions", settings.event_partitions),
    }
    if not endpoints["kafka_bootstrap"]:
        raise typer.BadParameter(
            "no running stack found: start `vitrine up` or set VITRINE_KAFKA_BOOTSTRAP"
        )
    return endpoints


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(1.0)
