"""Property-based: the address check is a rule about global reachability, the fetcher answers
any URI with bytes or `ImageRejected`, and any bytes decode to a picture or `ImageRejected`
that the model can then take at any aspect ratio."""

from __future__ import annotations

import asyncio
import io
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from vitrine.errors import ImageRejected
from vitrine.fetch import FetchPolicy, ImageFetcher, address_refusal, make_session
from vitrine.images import decode_image
from vitrine.model import DualEncoder, load_dual_encoder
from vitrine.settings import CommonSettings


@given(st.ip_addresses())
def test_an_address_passes_only_if_it_is_global_unicast(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    refusal = address_refusal(str(addr))
    judged = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped \
        else addr
    if refusal is None:
        assert judged.is_global and not judged.is_multicast
        if isinstance(judged, ipaddress.IPv6Address):
            assert judged in ipaddress.ip_network("2000::/3")
            assert judged not in ipaddress.ip_network("2002::/16")
    else:
        assert str(addr) in refusal


@given(st.text(max_size=30))
def test_anything_that_is_not_an_address_is_refused_not_raised(text: str) -> None:
    refusal = address_refusal(text)
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        assert refusal is not None and "not an IP address" in refusal


HOSTS = st.sampled_from(["127.0.0.1", "[::1", "[fe80::1%25eth0]", "10.0.0.1:99999", "[2002::1]",
                         "100.64.0.9", "0", "xn--", "a" * 70 + ".b", "%00", ":80", "[]"])
URIS = st.one_of(
    st.text(max_size=60),
    st.tuples(st.sampled_from(["http://", "https://", "HTTP://", "file://", "gopher://", ""]),
              HOSTS | st.text(max_size=12), st.text(max_size=30)).map("".join),
    st.text(max_size=40).map(lambda path: f"file:///{path}"),
)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-root")


@given(URIS)
def test_any_uri_gives_bytes_or_a_rejection(image_dir: Path, uri: str) -> None:
    policy = FetchPolicy(file_root=image_dir, timeout_s=5)

    async def attempt() -> None:
        async with make_session(policy) as session:
            try:
                await ImageFetcher(policy, session).fetch(uri)
            except ImageRejected as exc:
                assert str(exc)

    asyncio.run(attempt())


def _encoded(size: tuple[int, int], fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (120, 40, 200)).save(out, format=fmt)
    return out.getvalue()


SEEDS = [_encoded((6, 8), fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP")]


@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                        max_size=8), st.integers(0, 400))
def test_damaged_pictures_decode_or_are_rejected(
    seed: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    _decodes_or_is_rejected(bytes(data[: len(data) - cut]))


@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_are_rejected(data: bytes) -> None:
    _decodes_or_is_rejected(data)


def _decodes_or_is_rejected(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=1_000_000)
    except ImageRejected as exc:
        assert str(exc)
    else:
        assert image.mode == "RGB" and image.width * image.height <= 1_000_000


@pytest.fixture(scope="module")
def model() -> DualEncoder:
    return load_dual_encoder(CommonSettings().model_spec(), device="cpu")


@given(st.integers(1, 6000), st.integers(1, 6000))
def test_the_model_takes_a_picture_of_any_aspect_ratio(
    model: DualEncoder, width: int, height: int
) -> None:
    if width * height > 4_000_000:
        width = max(1, 4_000_000 // height)
    pixels = model.preprocess_image(Image.new("RGB", (width, height), (10, 200, 30)))
    assert tuple(pixels.shape) == (3, model.image_size, model.image_size)
