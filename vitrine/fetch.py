"""Reading an event's image_uri without letting untrusted input reach what it should not.

- http(s): every address a host resolves to must be globally reachable (`address_refusal`),
  checked before connecting and again at connect time through the resolver, so DNS rebinding
  gains nothing; redirects are followed by hand and each hop is checked again.
- file://: only regular files below a configured root, after resolving symlinks (a FIFO or a
  device under the root is refused before it is read).
- Every read stops at a size limit; the whole fetch, DNS and file reads included, has one
  timeout. Whatever the URI, the only error is `ImageRejected` with a reason (covered by
  tests/vitrine/test_fetch.py and tests/vitrine/test_fuzz.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

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


_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # relays to any IPv4 address, inside too
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")


def address_refusal(ip: str) -> str | None:
    """Why connecting to this address could reach what is not the public internet, or None.

    A rule, not a list of ranges: whatever `ipaddress` does not call global is refused
    (private, shared 100.64/10, loopback, link-local, reserved, documentation, Teredo, ...),
    and so are multicast, IPv6 outside global unicast 2000::/3 (site-local fec0::/10, NAT64)
    and 6to4 (a relay reaches any IPv4 address). An IPv4-mapped address is judged as IPv4.
    """
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return f"{ip!r} is not an IP address"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            inner = address_refusal(str(addr.ipv4_mapped))
            return f"{ip} maps to {inner}" if inner else None
        if addr in _SIX_TO_FOUR:
            return f"{ip} is a 6to4 address"
        if addr not in _GLOBAL_UNICAST_V6:
            return f"{ip} is {_kind(addr)}"
    if addr.is_multicast or not addr.is_global:
        return f"{ip} is {_kind(addr)}"
    return None


def _kind(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    for flag in ("unspecified", "loopback", "link_local", "multicast", "site_local", "private",
                 "reserved"):
        if getattr(addr, f"is_{flag}", False):
            article = "an" if flag[0] in "aeiou" else "a"
            return f"{article} {flag.replace('_', '-')} address"
    return "not a globally reachable address"


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
        """The image bytes, or `ImageRejected` with a reason: nothing else escapes, and nothing
        takes longer than the policy's timeout."""
        try:
            async with asyncio.timeout(self._policy.timeout_s):
                return await self._fetch(uri)
        except ImageRejected:
            raise
        except TimeoutError:
            raise ImageRejected(
                f"image fetch timed out after {self._policy.timeout_s:g}s: {_shown(uri)}"
            ) from None
        except Exception as exc:  # a URI no parser foresaw must not escape as anything else
            raise ImageRejected(f"image_uri cannot be fetched: {_shown(uri)}: {exc!r}") from exc

    async def _fetch(self, uri: str) -> bytes:
        parts = _split(uri)
        if parts.scheme == "file":
            # the thread may stay blocked on a hung filesystem; the timeout above still holds
            return await asyncio.to_thread(self._read_file, parts)
        if parts.scheme in ("http", "https"):
            return await self._fetch_http(uri)
        raise ImageRejected(f"unsupported image_uri scheme {parts.scheme!r}")

    def _read_file(self, parts: SplitResult) -> bytes:
        root = self._policy.file_root
        if root is None:
            raise ImageRejected("file:// image_uri refused: no VITRINE_IMAGE_FILE_ROOT configured")
        if parts.netloc not in ("", "localhost"):
            raise ImageRejected(f"file:// image_uri names a remote host {_shown(parts.netloc)}")
        raw_path = unquote(parts.path, errors="strict")
        if "\0" in raw_path:
            raise ImageRejected("file:// path contains a NUL byte")
        try:
            path = Path(raw_path).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            reason = f"file:// path cannot be resolved: {_shown(raw_path)}: {exc}"
            raise ImageRejected(reason) from exc
        if not path.is_relative_to(root.resolve()):
            raise ImageRejected(f"file:// path {path} is outside the allowed root {root}")
        return self._within_limit(_read_regular_file(path, self._policy.max_bytes + 1))

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
            except (aiohttp.ClientError, ValueError) as exc:  # ValueError: yarl refused the URL
                reason = str(exc) or type(exc).__name__
                raise ImageRejected(f"image fetch failed for {_shown(url)}: {reason}") from exc
        raise ImageRejected(f"too many redirects (> {self._policy.max_redirects}) from {uri}")

    async def _check_host(self, url: str) -> None:
        """Refuse before connecting, with a reason that names the address (the resolver
        repeats the check at connect time)."""
        parts = _split(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageRejected(f"refused redirect target {_shown(url)}")
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


def _split(uri: str) -> SplitResult:
    """The URI's parts, checked the way the client will read them: a port out of range, an
    unclosed IPv6 bracket or a host label IDNA refuses is a reason, not an exception."""
    try:
        parts = urlsplit(uri)
        _ = parts.port  # raises for a port out of range or not a number
        if parts.hostname:
            parts.hostname.encode("idna")
    except (ValueError, UnicodeError) as exc:
        raise ImageRejected(f"invalid image_uri {_shown(uri)}: {exc}") from exc
    return parts._replace(scheme=parts.scheme.lower())


def _read_regular_file(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file. O_NONBLOCK: opening a FIFO does not wait for a
    writer; O_NOFOLLOW: a symlink swapped in after `resolve()` is not followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ImageRejected(f"image not found: {path}") from exc
    except OSError as exc:
        raise ImageRejected(f"image unreadable: {path}: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageRejected(f"image is not a regular file: {path}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit)
    except OSError as exc:
        raise ImageRejected(f"image unreadable: {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _shown(text: str, limit: int = 200) -> str:
    """A URI as a reason may quote it: bounded, and repr'd so control characters show."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
