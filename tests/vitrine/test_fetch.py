"""The image fetcher against a real HTTP server on loopback and real files."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from vitrine.errors import ImageRejected
from vitrine.fetch import (
    CheckingResolver,
    FetchPolicy,
    ImageFetcher,
    address_refusal,
    make_session,
)

JPEG = b"\xff\xd8" + b"x" * 1000


@pytest.mark.parametrize(
    ("ip", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.7", "private"),
        ("172.16.0.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata endpoint
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        # not in any list of "private" ranges, and still not the public internet
        ("100.64.0.1", "not a globally reachable"),  # carrier-grade NAT
        ("2002:c0a8:101::1", "6to4"),
        ("fec0::1", "site-local"),
        ("ff0e::1", "multicast"),
        ("64:ff9b::a00:1", "reserved"),  # NAT64 of 10.0.0.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private"),  # Teredo
        ("198.18.0.1", "private"),  # benchmarking
        ("240.0.0.1", "private"),
        ("::ffff:100.64.0.1", "maps to 100.64.0.1"),
    ],
)
def test_internal_addresses_are_refused(ip: str, kind: str) -> None:
    refusal = address_refusal(ip)
    assert refusal is not None and kind in refusal


@pytest.mark.parametrize(
    "ip", ["8.8.8.8", "151.101.1.69", "2606:4700::6810:84e5", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(ip: str) -> None:
    assert address_refusal(ip) is None


async def test_the_resolver_refuses_internal_addresses_at_connect_time() -> None:
    resolver = CheckingResolver(allow_private_networks=False)
    with pytest.raises(OSError, match="loopback"):
        await resolver.resolve("localhost", 80)
    await resolver.close()


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async def image(request: web.Request) -> web.Response:
        return web.Response(body=JPEG, content_type="image/jpeg")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"\0" * 5000)

    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no Content-Length: the limit must hold while reading
        await response.prepare(request)
        for _ in range(10):
            await response.write(b"\0" * 1000)
        return response

    async def to_file(request: web.Request) -> web.Response:
        raise web.HTTPFound("file:///etc/passwd")

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/image.jpg")

    app = web.Application()
    app.router.add_get("/image.jpg", image)
    app.router.add_get("/big", big)
    app.router.add_get("/streamed", streamed)
    app.router.add_get("/to-file", to_file)
    app.router.add_get("/loop", loop)
    app.router.add_get("/hop", hop)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def fetch(policy: FetchPolicy, uri: str) -> bytes:
    async with make_session(policy) as session:
        return await ImageFetcher(policy, session).fetch(uri)


async def test_a_loopback_server_is_refused_by_default(server: str) -> None:
    with pytest.raises(ImageRejected, match="loopback"):
        await fetch(FetchPolicy(file_root=None), f"{server}/image.jpg")


async def test_allowed_private_fetch_follows_redirects(server: str) -> None:
    policy = FetchPolicy(file_root=None, allow_private_networks=True, max_bytes=2000)
    assert await fetch(policy, f"{server}/image.jpg") == JPEG
    assert await fetch(policy, f"{server}/hop") == JPEG


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/big", "too large"),
        ("/streamed", "too large"),
        ("/to-file", "refused redirect target"),
        ("/loop", "too many redirects"),
        ("/missing", "HTTP 404"),
    ],
)
async def test_http_limits(server: str, path: str, message: str) -> None:
    policy = FetchPolicy(file_root=None, allow_private_networks=True, max_bytes=2000)
    with pytest.raises(ImageRejected, match=message):
        await fetch(policy, f"{server}{path}")


async def test_files_are_read_only_below_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "secret.jpg"
    root.mkdir()
    (root / "ok.jpg").write_bytes(JPEG)
    outside.write_bytes(JPEG)
    (root / "escape.jpg").symlink_to(outside)
    policy = FetchPolicy(file_root=root, max_bytes=5000)
    assert await fetch(policy, (root / "ok.jpg").as_uri()) == JPEG
    for uri in (outside.as_uri(), (root / "escape.jpg").as_uri(), f"file://{root}/../secret.jpg"):
        with pytest.raises(ImageRejected, match="outside the allowed root"):
            await fetch(policy, uri)
    with pytest.raises(ImageRejected, match="remote host"):
        await fetch(policy, "file://evil.example.com/etc/passwd")
    with pytest.raises(ImageRejected, match="no VITRINE_IMAGE_FILE_ROOT"):
        await fetch(FetchPolicy(file_root=None), (root / "ok.jpg").as_uri())
    with pytest.raises(ImageRejected, match="too large"):
        await fetch(FetchPolicy(file_root=root, max_bytes=10), (root / "ok.jpg").as_uri())
    with pytest.raises(ImageRejected, match="unsupported image_uri scheme"):
        await fetch(policy, "gopher://x/y")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://example.com:99999/a.jpg", "invalid image_uri"),  # port out of range
        ("http://[::1/a.jpg", "invalid image_uri"),  # unclosed IPv6 bracket
        ("http://a" + "b" * 70 + ".com/x.jpg", "invalid image_uri"),  # label too long for IDNA
        ("http://xn--ls8h\u0000.com/x.jpg", "cannot resolve"),
        ("https:///no-host.jpg", "refused redirect target"),
    ],
)
async def test_unparseable_uris_are_rejected_not_raised(uri: str, message: str) -> None:
    with pytest.raises(ImageRejected, match=message):
        await fetch(FetchPolicy(file_root=None), uri)


async def test_special_files_under_the_root_are_refused_at_once(tmp_path: Path) -> None:
    """A FIFO would block `open` forever, waiting for a writer; a loop cannot be resolved."""
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "loop-a.jpg").symlink_to(tmp_path / "loop-b.jpg")
    (tmp_path / "loop-b.jpg").symlink_to(tmp_path / "loop-a.jpg")
    (tmp_path / "dir.jpg").mkdir()
    policy = FetchPolicy(file_root=tmp_path, timeout_s=30)
    cases = {
        (tmp_path / "pipe.jpg").as_uri(): "not a regular file",
        (tmp_path / "dir.jpg").as_uri(): "not a regular file",
        (tmp_path / "loop-a.jpg").as_uri(): "cannot be resolved",
        f"file://{tmp_path}/nul%00.jpg": "NUL",
    }
    for uri, message in cases.items():
        started = time.monotonic()
        with pytest.raises(ImageRejected, match=message):
            await fetch(policy, uri)
        assert time.monotonic() - started < 10, uri  # refused, not timed out


async def test_a_server_that_never_answers_is_cut_off_by_the_timeout() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(60)

    silent = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    policy = FetchPolicy(file_root=None, allow_private_networks=True, timeout_s=0.5)
    async with silent:
        with pytest.raises(ImageRejected, match="timed out after 0.5s"):
            await fetch(policy, f"http://127.0.0.1:{port}/slow.jpg")
