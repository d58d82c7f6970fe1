"""How `vitrine reshard` and `vitrine model ...`, run in another terminal, ask the running
`vitrine up` to re-shard or to roll a model forward.

The shards must stay children of the `vitrine up` process: its supervisor restarts them and
they die with it. So that process does the work and the CLI only asks. `vitrine up` serves a
tiny HTTP control server on loopback and records its address and a random token in the run
file (mode 0600). `POST /reshard?shards=N` and `POST /model/<add|promote|rollback|retire>`
(a JSON body of arguments) answer with progress lines as they happen and a last line, `ok` or
`error: <why>`. Chosen over a signal plus a request file because the
answer comes back on the same connection (progress, errors, the end), and nothing is left
on disk to clean up after a crash.

The work runs on one long-lived worker thread, not on the request's thread: PR_SET_PDEATHSIG
(`vitrine.cli.stack._die_with_parent`) fires when the *thread* that started a child exits, so
shards started from a per-request thread would be killed as soon as the request ended. One
worker also means one change at a time. Covered by `tests/e2e/test_reshard.py` and
`tests/e2e/test_models.py`.
"""

from __future__ import annotations

import http.server
import json
import queue
import secrets
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from vitrine.cli.models import ModelRollout
from vitrine.cli.stack import LocalStack, Progress
from vitrine.errors import VitrineError

log = structlog.get_logger()

OK = "ok"
ERROR = "error: "


@dataclass
class _Job:
    run: Callable[[Progress], object]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)


class ControlServer:
    def __init__(self, stack: LocalStack) -> None:
        self._stack = stack
        self._models = ModelRollout(stack)
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
                job.run(job.lines.put)
                job.lines.put(OK)
            except Exception as exc:  # noqa: BLE001 (reported to the caller, who decides)
                log.error("control request failed", error=str(exc))
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
        try:
            length = int(request.headers.get("Content-Length") or 0)
            args = json.loads(request.rfile.read(length) or b"{}") if length else {}
            job = _Job(self._job(url.path, urllib.parse.parse_qs(url.query), args))
        except LookupError:
            request.send_error(404)
            return
        except (KeyError, ValueError, TypeError) as exc:
            request.send_error(400, f"bad arguments for {url.path}: {exc}")
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


    def _job(self, path: str, query: dict[str, list[str]], args: dict[str, Any]
             ) -> Callable[[Progress], object]:
        """What a request asks for, checked before it is queued (LookupError: no such path)."""
        stack, models = self._stack, self._models
        if path == "/reshard":
            shards = int(query["shards"][0])
            return lambda progress: stack.reshard(shards, progress)
        if path == "/model/add":
            architecture, weights = args.get("architecture"), args.get("weights")
            seed, runtime = int(args.get("seed", 0)), str(args.get("text_runtime", "auto"))
            return lambda progress: models.add(architecture, weights, seed, runtime, progress)
        if path == "/model/promote":
            model_id = str(args["model_id"])
            return lambda progress: models.promote(model_id, progress)
        if path == "/model/rollback":
            return models.rollback
        if path == "/model/retire":
            model_id = str(args["model_id"])
            return lambda progress: models.retire(model_id, progress)
        raise LookupError(path)


def request_reshard(run_info: dict[str, Any], num_shards: int) -> Iterator[str]:
    """Ask the `vitrine up` that wrote `run_info` (its run file) to re-shard to `num_shards`;
    yields its progress lines and raises VitrineError if it failed."""
    return request_control(run_info, f"/reshard?shards={num_shards}")


def request_control(
    run_info: dict[str, Any], path: str, args: dict[str, Any] | None = None
) -> Iterator[str]:
    """Ask the `vitrine up` that wrote `run_info` to do `path`; yields its progress lines and
    raises VitrineError if it failed."""
    if "control_url" not in run_info:
        raise VitrineError("the running stack has no control server: restart `vitrine up`")
    request = urllib.request.Request(
        f"{run_info['control_url']}{path}", method="POST",
        data=json.dumps(args or {}).encode(),
        headers={"Authorization": f"Bearer {run_info['control_token']}",
                 "Content-Type": "application/json"},
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
    raise VitrineError("`vitrine up` ended the connection before it finished")
