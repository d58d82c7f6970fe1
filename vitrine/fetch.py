"""Reading an event's image_uri without letting untrusted input reach what it should not.

- http(s): every address a host resolves to is checked (no loopback, private, link-local,
  multicast or reserved targets unless allowed), at connect time through the resolver too, so
  DNS rebinding gains nothing; redirects are followed by hand and each hop is checked again.
- file://: only below a configured root, after resolving symlinks.
- Every read stops at a size limit; the whole fetch has a timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from vitrine.errors import ImageRejected


@dataclass(frozen=True)
class FetchPolicy:
    file_root: Path | None
    allow_private_networks: bool = False
    max_bytes: int = 10 * 1024**2
    timeout_s: float = 10.0
    max_redirects: int = 3


def address_refusal(ip: str) -> str | None:
    """Why connecting to this address would reach inside the cluster, or None if it is public."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for flag in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(addr, f"is_{flag}"):
            return f"{ip} is a {flag.replace('_', '-')} address"
    return None


class CheckingResolver(AbstractResolver):
    """Resolves like the default resolver but refuses internal addresses at connect time."""

    def __init__(self, allow_private_networks: bool) -> None:
        self._inner = ThreadedResolver()
        self._allow = allow_private_networks

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self._allow:
            for result in results:
                refusal = address_refusal(result["host"])
                if refusal:
                    raise OSError(f"refused: {host} resolves to {refusal}")
        return results

    async def close(self) -> None:
        await self._inner.close()


def make_session(policy: FetchPolicy) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        resolver=CheckingResolver(policy.allow_private_networks), limit=64
    )
    timeout = aiohttp.ClientTimeout(total=policy.timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)


class ImageFetcher:
    def __init__(self, policy: FetchPolicy, session: aiohttp.ClientSession) -> None:
        self._policy = policy
        self._session = session

    async def fetch(self, uri: str) -> bytes:
        scheme = urlsplit(uri).scheme.lower()
        if scheme == "file":
            return await asyncio.to_thread(self._read_file, uri)
        if scheme in ("http", "https"):
            return await self._fetch_http(uri)
        raise ImageRejected(f"unsupported image_uri scheme {scheme!r}")

    def _read_file(self, uri: str) -> bytes:
        root = self._policy.file_root
        if root is None:
            raise ImageRejected("file:// image_uri refused: no VITRINE_IMAGE_FILE_ROOT configured")
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ImageRejected(f"file:// image_uri names a remote host {parts.netloc!r}")
        path = Path(unquote(parts.path)).resolve()
        if not path.is_relative_to(root.resolve()):
            raise ImageRejected(f"file:// path {path} is outside the allowed root {root}")
        try:
            with path.open("rb") as f:
                data = f.read(self._policy.max_bytes + 1)
        except FileNotFoundError as exc:
            raise ImageRejected(f"image not found: {path}") from exc
        except OSError as exc:
            raise ImageRejected(f"image unreadable: {path}: {exc.strerror}") from exc
        return self._within_limit(data)

    async def _fetch_http(self, uri: str) -> bytes:
        url = uri
        for _ in range(self._policy.max_redirects + 1):
            await self._check_host(url)
            try:
                async with self._session.get(url, allow_redirects=False) as response:
                    if response.status in (301, 302, 303, 307, 308):
                        location = response.headers.get("Location")
                        if not location:
                            raise ImageRejected(f"redirect without Location from {url}")
                        url = urljoin(url, location)
                        continue
                    if response.status != 200:
                        raise ImageRejected(f"image fetch got HTTP {response.status} from {url}")
                    return await self._read_body(response)
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = str(exc) or type(exc).__name__
                raise ImageRejected(f"image fetch failed for {url}: {reason}") from exc
        raise ImageRejected(f"too many redirects (> {self._policy.max_redirects}) from {uri}")

    async def _check_host(self, url: str) -> None:
        """Refuse before connecting, with a reason that names the address (the resolver
        repeats the check at connect time)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageRejected(f"refused redirect target {url!r}")
        if self._policy.allow_private_networks:
            return
        try:
            infos: list[Any] = await asyncio.get_running_loop().getaddrinfo(
                parts.hostname, parts.port or 0, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise ImageRejected(f"cannot resolve {parts.hostname}: {exc}") from exc
        for info in infos:
            refusal = address_refusal(info[4][0])
            if refusal:
                raise ImageRejected(
                    f"refused: {parts.hostname} resolves to {refusal} "
                    "(set VITRINE_ALLOW_PRIVATE_NETWORKS to allow)"
                )

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self._policy.max_bytes
        if response.content_length is not None and response.content_length > limit:
            raise ImageRejected(f"image too large: {response.content_length} bytes > {limit}")
        body = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise ImageRejected(f"image too large: more than {limit} bytes")
        return bytes(body)

    def _within_limit(self, data: bytes) -> bytes:
        if len(data) > self._policy.max_bytes:
            raise ImageRejected(f"image too large: more than {self._policy.max_bytes} bytes")
        return data
