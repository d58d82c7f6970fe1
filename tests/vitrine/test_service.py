from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import faiss
import pytest
import torch
from aiohttp import web

from vitrine.service import (
    base_app,
    json_body,
    limit_compute_threads,
    request_id,
    start_service,
)


def test_compute_threads_bound_faiss_and_torch() -> None:
    faiss_before, torch_before = faiss.omp_get_max_threads(), torch.get_num_threads()
    try:
        limit_compute_threads(1)
        assert faiss.omp_get_max_threads() == 1
        assert torch.get_num_threads() == 1
        limit_compute_threads(None)  # unset: left as it is
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(faiss_before)
        torch.set_num_threads(torch_before)


# -- the HTTP edge every service shares: every error is JSON, the request id is checked ------


async def _echo_request_id(request: web.Request) -> web.Response:
    return web.json_response({"request_id": request_id(request)})


async def _reads_json(request: web.Request) -> web.Response:
    return web.json_response(await json_body(request))


async def _raises(request: web.Request) -> web.Response:
    raise RuntimeError("a bug, not the caller's fault")


@pytest.fixture
async def service() -> AsyncIterator[int]:
    """A real service on loopback, started the way `run_service` starts every role."""
    app = base_app("test")
    app.router.add_get("/id", _echo_request_id)
    app.router.add_post("/id", _reads_json)
    app.router.add_get("/bug", _raises)
    runner = await start_service(app, "127.0.0.1", 0)
    port = runner.addresses[0][1]
    yield port
    await runner.cleanup()


async def _raw_exchange(port: int, request: bytes) -> tuple[int, str, bytes]:
    """Send raw bytes; the status, content type and body of the answer (read by its
    Content-Length: the server may keep the connection open to drain a refused body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()
    return int(lines[0].split()[1]), headers.get("content-type", ""), body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET /id HTTP/1.1\r\nHost: x\r\nBad\x01Name: v\r\n\r\n", 400),
        (b"GET /id HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n", 400),
        (b"POST /id HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
        (b"DELETE /id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        (b"POST /id HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\nConnection: close\r\n\r\n"
         + b"x" * 70_000, 413),
    ],
)
async def test_every_refused_request_gets_a_json_error(
    service: int, request_bytes: bytes, status: int
) -> None:
    got, content_type, body = await _raw_exchange(service, request_bytes)
    assert got == status, body
    assert content_type.startswith("application/json"), (content_type, body)
    assert isinstance(json.loads(body)["error"], str) and json.loads(body)["error"]


async def test_a_405_names_the_allowed_methods(service: int) -> None:
    async with aiohttp.ClientSession() as session, session.put(
        f"http://127.0.0.1:{service}/id"
    ) as response:
        assert response.status == 405
        assert "GET" in response.headers["Allow"]
        assert "allowed" in (await response.json())["error"]


async def test_a_bug_is_a_json_500_that_tells_nothing_inside(service: int) -> None:
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{service}/bug"
    ) as response:
        assert response.status == 500
        assert "a bug" not in (await response.json())["error"]


@pytest.mark.parametrize(
    ("offered", "kept"),
    [
        (b"trace-me-42", True),
        (b"a" * 64, True),
        (b"a" * 65, False),  # too long for a log line and a header
        (b"caf\xc3\xa9", False),  # not ASCII
        (b"two words", False),  # not a token
        (b"", False),
    ],
)
async def test_a_request_id_is_kept_only_if_it_is_a_short_ascii_token(
    service: int, offered: bytes, kept: bool
) -> None:
    status, _, body = await _raw_exchange(
        service,
        b"GET /id HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Request-Id: " + offered
        + b"\r\n\r\n",
    )
    assert status == 200
    answered = json.loads(body)["request_id"]
    if kept:
        assert answered == offered.decode()
    else:
        assert answered != offered.decode("utf-8", "replace") and len(answered) == 16
        assert answered.isascii() and answered.isalnum()


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        ("application/json; charset=klingon", b"{}", "unknown charset"),
        ("application/json", b"\xff\xfe{}", "not valid utf-8"),
        ("application/json", b"[" * 50_000 + b"]" * 50_000, "not valid JSON"),
        ("application/json", b'{"k": NaN}', "NaN"),
        ("application/json", b'{"k": 1e999}', "beyond the range"),
        ("application/json", b'{"k": 1, "k": 2}', "repeats a key"),
        ("application/json", b'["not", "an", "object"]', "JSON object"),
    ],
)
async def test_a_json_body_is_read_strictly(
    service: int, content_type: str, body: bytes, reason: str
) -> None:
    async with aiohttp.ClientSession() as session, session.post(
        f"http://127.0.0.1:{service}/id", data=body, headers={"Content-Type": content_type}
    ) as response:
        assert response.status == 400
        assert reason in (await response.json())["error"]


async def test_a_json_body_in_another_charset_is_read(service: int) -> None:
    async with aiohttp.ClientSession() as session, session.post(
        f"http://127.0.0.1:{service}/id", data='{"colour": "cr\u00e8me"}'.encode("latin-1"),
        headers={"Content-Type": "application/json; charset=latin-1"},
    ) as response:
        assert response.status == 200
        assert await response.json() == {"colour": "cr\u00e8me"}


# -- the event loop a service runs on -------------------------------------------------------

_SERVE = """
import sys
from vitrine.service import base_app, run_service
run_service(base_app("test"), "127.0.0.1", int(sys.argv[1]), sys.argv[2])
"""


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_a_service_serves_on_either_event_loop_and_stops_on_sigterm(event_loop: str) -> None:
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c", _SERVE, str(port), event_loop])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert child.poll() is None, "the service exited before it answered"
                assert time.monotonic() < deadline, "the service never answered"
                time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()


def test_an_unknown_event_loop_is_refused() -> None:
    from pydantic import ValidationError

    from vitrine.service import run_service
    from vitrine.settings import CommonSettings

    with pytest.raises(ValidationError, match="event_loop"):
        CommonSettings(event_loop="tokio")
    with pytest.raises(ValueError, match="unknown event loop 'tokio'"):
        run_service(base_app("test"), "127.0.0.1", 0, "tokio")
