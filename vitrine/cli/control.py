"""How `vitrine reshard`, run in another terminal, asks the running `vitrine up` to re-shard.

The shards must stay children of the `vitrine up` process: its supervisor restarts them and
they die with it. So that process does the work and the CLI only asks. `vitrine up` serves a
tiny HTTP control server on loopback and records its address and a random token in the run
file (mode 0600). `POST /reshard?shards=N` answers with progress lines as they happen and a
last line, `ok` or `error: <why>`. Chosen over a signal plus a request file because the
answer comes back on the same connection (progress, errors, the end), and nothing is left
on disk to clean up after a crash.

The work runs on one long-lived worker thread, not on the request's thread: PR_SET_PDEATHSIG
(`vitrine.cli.stack._die_with_parent`) fires when the *thread* that started a child exits, so
shards started from a per-request thread would be killed as soon as the request ended. One
worker also means one re-shard at a time. Covered by `tests/e2e/test_reshard.py`.
"""

from __future__ import annotations

import http.server
import queue
import secrets
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from vitrine.cli.stack import LocalStack
from vitrine.errors import VitrineError

log = structlog.get_logger()

OK = "ok"
ERROR = "error: "


@dataclass
class _Job:
    num_shards: int
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)


class ControlServer:
    def __init__(self, stack: LocalStack) -> None:
        self._stack = stack
        self._token = secrets.token_urlsafe(24)
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._threads = [
            threading.Thread(target=self._http.serve_forever, name="control-http", daemon=True),
            threading.Thread(target=self._work, name="control-worker", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self._stack.extra_run_info.update(control_url=self.url, control_token=self._token)
        self._stack.write_run_file()

    def stop(self) -> None:
        """Stops listening. The worker thread stays (a daemon) until the process ends: the
        shards it started die with it. A re-shard under way ends when the stack stops."""
        self._http.shutdown()
        self._http.server_close()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                self._stack.reshard(job.num_shards, job.lines.put)
                job.lines.put(OK)
            except Exception as exc:  # noqa: BLE001 (reported to the caller, who decides)
                log.error("re-shard failed", error=str(exc))
                job.lines.put(f"{ERROR}{exc}")
            job.lines.put(None)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        control = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server naming)
                control._serve(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # structlog lines from the stack say what happened

        return Handler

    def _serve(self, request: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(request.path)
        if request.headers.get("Authorization") != f"Bearer {self._token}":
            request.send_error(403, "missing or wrong control token")
            return
        if url.path != "/reshard":
            request.send_error(404)
            return
        try:
            job = _Job(int(urllib.parse.parse_qs(url.query)["shards"][0]))
        except (KeyError, ValueError):
            request.send_error(400, "expected /reshard?shards=N")
            return
        self._jobs.put(job)
        request.send_response(200)
        request.send_header("Content-Type", "text/plain; charset=utf-8")
        request.end_headers()
        while (line := job.lines.get()) is not None:
            try:
                request.wfile.write(f"{line}\n".encode())
                request.wfile.flush()
            except OSError:
                pass  # the caller went away; the re-shard goes on, its log says how it ends


def request_reshard(run_info: dict[str, Any], num_shards: int) -> Iterator[str]:
    """Ask the `vitrine up` that wrote `run_info` (its run file) to re-shard to `num_shards`;
    yields its progress lines and raises VitrineError if it failed."""
    if "control_url" not in run_info:
        raise VitrineError("the running stack has no control server: restart `vitrine up`")
    request = urllib.request.Request(
        f"{run_info['control_url']}/reshard?shards={num_shards}", method="POST",
        headers={"Authorization": f"Bearer {run_info['control_token']}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            for raw in response:
                line = raw.decode().rstrip("\n")
                if line == OK:
                    return
                if line.startswith(ERROR):
                    raise VitrineError(line.removeprefix(ERROR))
                yield line
    except urllib.error.HTTPError as exc:
        raise VitrineError(f"control server: {exc.code} {exc.reason}") from None
    raise VitrineError("`vitrine up` ended the connection before the re-shard finished")
