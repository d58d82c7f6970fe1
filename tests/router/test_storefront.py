"""The storefront on the real stack: product images over HTTP, and the demo page driven in a
real headless Chromium (Debian's, installed by `make setup`) through Playwright: text search,
"more like this" by a product's own picture, facet chips, the price slider, "in stock only",
pages, "N similar" on collapsed duplicates, errors, and the partial-answer notice.

Screenshots go to $VITRINE_TEST_ARTIFACTS when set, else to the test's tmp_path; their paths
are printed (`pytest -rP` shows them for passing tests).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from proto.catalog import CatalogEvent
from tests.conftest import stage_image
from tests.helpers import eventually, ids_of, search_image, search_text
from vitrine.catalog import events_from_csv
from vitrine.cli.ingest import EventPublisher
from vitrine.cli.stack import LocalStack
from vitrine.images import ACCEPTED_FORMATS, CONTENT_TYPES, decode_image, image_content_type

pytestmark = pytest.mark.stack

ROWS = (400, 460)  # of products.csv: the e2e module owns rows 0-300
K = 24  # what the page asks for
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # without these Chromium dials out at start and this closed network refuses it
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 30_000  # the suite shares a few cores with model loads and encoding


@dataclass(frozen=True)
class Catalog:
    live: list[CatalogEvent]  # rows of products.csv, priced, images staged as <id>.jpg
    twins: list[str]  # two more listings of live[5]'s picture, under its title
    deleted: str  # published, then deleted
    png_named_jpg: str  # a PNG behind a .jpg name
    vanished: str  # indexed, then its image file was removed


@dataclass(frozen=True)
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


def get(url: str) -> Fetched:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return Fetched(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        return Fetched(exc.code, dict(exc.headers), exc.read())


def _synthetic(product_id: str, path: Path, colour: tuple[int, int, int]) -> CatalogEvent:
    image = Image.new("RGB", (60, 80), colour)
    image.paste((255 - colour[0], 40, 90), (10, 20, 50, 60))  # not a flat image: no ties
    image.save(path, format="PNG")  # whatever the .jpg name says
    return CatalogEvent(
        op="upsert",
        product_id=product_id,
        version=1,
        image_uri=path.as_uri(),
        title=f"Storefront test swatch {product_id}",
    )


@pytest.fixture(scope="module")
def catalog(stack: LocalStack, fashion_data: Path, image_root: Path) -> Catalog:
    rows = list(itertools.islice(events_from_csv(fashion_data / "products.csv", image_root), *ROWS))
    rows = [e.model_copy(update={"schema_version": 2, "price": float(100 * (i % 10 + 1)),
                                 "in_stock": i % 4 != 0}) for i, e in enumerate(rows)]
    for event in rows:
        stage_image(fashion_data, image_root, event.product_id)
    twins = []
    for n in range(2):
        twin = f"storefront-twin-{n}"
        (image_root / f"{twin}.jpg").write_bytes((image_root / f"{rows[5].product_id}.jpg")
                                                 .read_bytes())
        twins.append(rows[5].model_copy(update={
            "product_id": twin, "image_uri": (image_root / f"{twin}.jpg").as_uri()}))
    png = _synthetic("storefront-png", image_root / "storefront-png.jpg", (20, 160, 120))
    vanished = _synthetic(
        "storefront-vanished", image_root / "storefront-vanished.jpg", (200, 120, 30)
    )
    s = stack.settings
    publisher = EventPublisher(stack.kafka_bootstrap, s.events_topic, s.event_partitions)
    for event in [*rows, *twins, png, vanished]:
        publisher.publish(event)
    publisher.flush()
    eventually(lambda: get(f"{stack.router_url}/images/{twins[-1].product_id}").status == 200,
               what="the twins indexed")

    pending = {e.product_id for e in [*rows, png, vanished]}

    def all_searchable() -> bool:
        for pid in sorted(pending):
            answer = search_image(stack.router_url, image_root / f"{pid}.jpg", k=10)
            shown = ids_of(answer) + [also for hit in answer["results"] for also in hit["also"]]
            if pid in shown:  # a twin's listing may show as the other's "also"
                pending.discard(pid)
        return not pending

    eventually(all_searchable, what=f"the storefront's products to be searchable: {pending}")

    doomed = rows[-1]
    publisher.publish(
        CatalogEvent(op="delete", product_id=doomed.product_id, version=doomed.version + 1)
    )
    publisher.flush()
    eventually(
        lambda: get(f"{stack.router_url}/images/{doomed.product_id}").status == 404,
        what="the deleted product's image to be gone",
    )
    (image_root / "storefront-vanished.jpg").unlink()
    return Catalog(rows[:-1], [t.product_id for t in twins], doomed.product_id,
                   png.product_id, vanished.product_id)


# -- product images over HTTP -------------------------------------------------------------


def _encoded(format: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 60)).save(out, format=format, **options)
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_encoded("JPEG"), "image/jpeg"),
        (_encoded("PNG"), "image/png"),
        (_encoded("GIF"), "image/gif"),
        (_encoded("WEBP"), "image/webp"),
        (_encoded("BMP"), "image/bmp"),
        (_encoded("TIFF"), None),  # the encoder refuses it: so does the storefront
        (b"<html><script>alert(1)</script>", None),
        (b"RIFF\x10\0\0\0WAVEfmt ", None),
        (b"", None),
    ],
)
def test_content_type_comes_from_the_bytes(data: bytes, expected: str | None) -> None:
    assert image_content_type(data) == expected


@pytest.mark.parametrize("format", sorted(ACCEPTED_FORMATS))
def test_every_format_the_encoder_accepts_can_be_served(format: str) -> None:
    data = _encoded(format)
    assert decode_image(data, 10_000).size == (8, 8)
    assert image_content_type(data) == CONTENT_TYPES[format]


def test_a_product_image_is_its_file_byte_for_byte(
    stack: LocalStack, catalog: Catalog, image_root: Path
) -> None:
    for event in catalog.live[:10]:
        fetched = get(f"{stack.router_url}/images/{event.product_id}")
        assert fetched.status == 200, fetched.body[:200]
        assert fetched.headers["Content-Type"] == "image/jpeg"
        assert fetched.body == (image_root / f"{event.product_id}.jpg").read_bytes()
        assert "max-age=" in fetched.headers["Cache-Control"]
        assert fetched.headers["X-Content-Type-Options"] == "nosniff"


def test_the_content_type_is_sniffed_not_taken_from_the_name(
    stack: LocalStack, catalog: Catalog
) -> None:
    fetched = get(f"{stack.router_url}/images/{catalog.png_named_jpg}")
    assert fetched.status == 200
    assert fetched.headers["Content-Type"] == "image/png"
    assert fetched.body.startswith(b"\x89PNG")


@pytest.mark.parametrize("which", ["unknown", "deleted"])
def test_unknown_and_deleted_products_get_a_404(
    stack: LocalStack, catalog: Catalog, which: str
) -> None:
    pid = catalog.deleted if which == "deleted" else "storefront-never-published"
    fetched = get(f"{stack.router_url}/images/{pid}")
    assert fetched.status == 404
    assert fetched.json() == {"error": f"no product {pid!r}"}


@pytest.mark.parametrize(
    "raw", ["bad%20id", "a%2Fb", "..%2F..%2Fetc%2Fpasswd", "x" * 129, "%3Cscript%3E"]
)
def test_malformed_product_ids_get_a_400(stack: LocalStack, raw: str) -> None:
    fetched = get(f"{stack.router_url}/images/{raw}")
    assert fetched.status == 400
    assert "product id must be" in fetched.json()["error"]


def test_an_image_the_fetcher_refuses_is_a_502_that_leaks_no_path(
    stack: LocalStack, catalog: Catalog
) -> None:
    fetched = get(f"{stack.router_url}/images/{catalog.vanished}")
    assert fetched.status == 502
    error = fetched.json()["error"]
    assert error == f"image of product {catalog.vanished!r} unavailable"
    assert "/" not in error  # the fetcher's reason (a server path) stays in the log
    log = (stack.log_dir / "router.log").read_text()
    assert "image not found" in log and catalog.vanished in log


def test_the_page_and_its_assets_are_served(stack: LocalStack) -> None:
    page = get(f"{stack.router_url}/")
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert b'id="search-form"' in page.body
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for asset, kind in [("storefront.js", "javascript"), ("storefront.css", "text/css")]:
        fetched = get(f"{stack.router_url}/static/{asset}")
        assert fetched.status == 200 and kind in fetched.headers["Content-Type"]
    assert not re.search(rb"(src|href)=\"https?:", page.body), "the page must work offline"


# -- the page in a real browser ------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: run `make setup` (installs Debian's chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(UI_TIMEOUT_MS)
    yield opened
    context.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    configured = os.environ.get("VITRINE_TEST_ARTIFACTS")
    directory = Path(configured) if configured else tmp_path
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def screenshot(page: Page, artifacts: Path, name: str) -> Path:
    path = artifacts / f"storefront-{name}.png"
    page.mouse.move(0, 0)  # no hover effects in the picture
    heights = page.eval_on_selector_all("#grid .card", "cards => cards.map(c => c.offsetHeight)")
    assert max(heights, default=0) < 1000, "a picture of an odd shape stretched its card"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def settled(page: Page) -> None:
    """The last answer is painted and every product picture has loaded or failed."""
    expect(page.locator("#results")).not_to_have_attribute(
        "aria-busy", "true", timeout=UI_TIMEOUT_MS
    )
    # polled from here: wait_for_function compiles its predicate with eval, which the page's
    # Content-Security-Policy (rightly) forbids
    deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
    while not page.evaluate("[...document.querySelectorAll('#grid img')].every((i) => i.complete)"):
        assert time.monotonic() < deadline, "product pictures did not finish loading"
        page.wait_for_timeout(50)


def search_in_page(page: Page, text: str) -> None:
    page.get_by_role("searchbox", name="Search products").fill(text)
    page.get_by_role("button", name="Search").click()


def _image_digests(image_root: Path) -> Counter[bytes]:
    return Counter(
        hashlib.sha256(path.read_bytes()).digest()
        for path in image_root.iterdir()
        if path.is_file()
    )


def pick_product_with_a_unique_picture(router: str, shown: list[str], image_root: Path) -> str:
    """A product on the page whose picture no other indexed product has (the dataset has
    duplicates), so image search must rank it first. Every indexed image is a file below
    image_root: the only file:// root, and loopback/private hosts are refused."""
    digests = _image_digests(image_root)
    for pid in shown[1:]:  # not the first card: "first in the similar grid" must mean something
        own_file = image_root / f"{pid}.jpg"
        fetched = get(f"{router}/images/{pid}")
        if fetched.status != 200 or not own_file.is_file():
            continue
        digest = hashlib.sha256(fetched.body).digest()
        if digest == hashlib.sha256(own_file.read_bytes()).digest() and digests[digest] == 1:
            return pid
    raise AssertionError(f"no product with a unique picture among {shown}")


def test_search_then_more_like_this_in_a_browser(
    stack: LocalStack, catalog: Catalog, page: Page, image_root: Path, artifacts: Path
) -> None:
    page.goto(f"{stack.router_url}/")
    expect(page.locator("#results-heading")).to_have_text("Find something to wear")
    screenshot(page, artifacts, "1-empty")

    search_in_page(page, "black leather shoes")
    results, cards = page.locator("#results"), page.locator("#grid .card")
    expect(results).to_have_attribute("data-mode", "text", timeout=UI_TIMEOUT_MS)
    expect(cards).to_have_count(K, timeout=UI_TIMEOUT_MS)
    expect(page.locator("#results-heading")).to_have_text("Results for “black leather shoes”")
    for title in cards.locator(".card-title").all_inner_texts():
        assert title.strip()
    for score in cards.locator(".card-score").all_inner_texts():
        assert re.fullmatch(r"-?\d\.\d{3}", score), score
    expect(page.locator("#partial-notice")).to_be_hidden()
    expect(page.locator("#error")).to_be_hidden()
    settled(page)
    screenshot(page, artifacts, "2-text-results")

    shown = cards.evaluate_all("(cards) => cards.map((card) => card.dataset.productId)")
    pid = pick_product_with_a_unique_picture(stack.router_url, shown, image_root)
    page.locator(f'#grid .card[data-product-id="{pid}"] .card-image').click()

    expect(results).to_have_attribute("data-mode", "similar", timeout=UI_TIMEOUT_MS)
    expect(page.locator("#results-heading")).to_contain_text(f"Items similar to product {pid}")
    expect(cards.first).to_have_attribute("data-product-id", pid)
    # The grid is the answer to the product's own picture (fused product vectors score below 1).
    own = search_image(stack.router_url, image_root / f"{pid}.jpg", k=K)
    assert ids_of(own)[0] == pid
    shown_score = float(cards.first.locator(".card-score").inner_text())
    assert shown_score == pytest.approx(own["results"][0]["score"], abs=6e-4)
    expect(cards).to_have_count(K)
    assert page.url.endswith(f"/?like={pid}")
    settled(page)
    screenshot(page, artifacts, "3-more-like-this")


def test_errors_are_shown_to_the_shopper(
    stack: LocalStack, catalog: Catalog, page: Page, artifacts: Path
) -> None:
    error = page.locator("#error")
    page.goto(f"{stack.router_url}/?q={'boots ' * 100}")  # longer than max_query_chars: a 400
    expect(error).to_contain_text("longer than 512 characters", timeout=UI_TIMEOUT_MS)
    page.goto(f"{stack.router_url}/?like={catalog.deleted}")  # its picture went with it: a 404
    expect(error).to_have_text(
        f"Cannot show items like product {catalog.deleted}: no product '{catalog.deleted}'",
        timeout=UI_TIMEOUT_MS,
    )

    # the two swatches look alike; the vanished one's picture is a 502 shown as "No picture"
    page.goto(f"{stack.router_url}/?like={catalog.png_named_jpg}")
    vanished = page.locator(f'#grid .card[data-product-id="{catalog.vanished}"]')
    expect(vanished).to_have_class(re.compile(r"\bcard-no-image\b"), timeout=UI_TIMEOUT_MS)
    expect(error).to_be_hidden()
    vanished.locator(".card-image").click()
    expect(error).to_contain_text(
        f"Cannot show items like product {catalog.vanished}: image of product "
        f"'{catalog.vanished}' unavailable",
        timeout=UI_TIMEOUT_MS,
    )
    settled(page)
    screenshot(page, artifacts, "4-error")


def test_a_partial_answer_names_the_missing_shard(
    stack: LocalStack, catalog: Catalog, page: Page, artifacts: Path
) -> None:
    page.goto(f"{stack.router_url}/")
    notice = page.locator("#partial-notice")
    stack.stop_child("shard-1")
    try:
        search_in_page(page, "blue shirt")
        expect(notice).to_be_visible(timeout=UI_TIMEOUT_MS)
        expect(notice).to_contain_text("Partial results: shard 1 did not answer")
        expect(page.locator("#grid .card").first).to_be_visible()
        settled(page)
        screenshot(page, artifacts, "5-partial")
    finally:
        stack.start_child("shard-1")
    eventually(
        lambda: not search_text(stack.router_url, "blue shirt", k=5)["partial"],
        timeout_s=30,
        what="shard 1 to answer again",
    )
    search_in_page(page, "blue shirt")
    expect(notice).to_be_hidden(timeout=UI_TIMEOUT_MS)


def card_texts(page: Page, selector: str) -> list[str]:
    return page.locator(f"#grid .card {selector}").all_inner_texts()


def test_refining_a_search_in_a_browser(
    stack: LocalStack, catalog: Catalog, page: Page, artifacts: Path
) -> None:
    page.goto(f"{stack.router_url}/")
    search_in_page(page, "shirt")
    cards = page.locator("#grid .card")
    expect(cards).to_have_count(K, timeout=UI_TIMEOUT_MS)
    settled(page)

    # next page and back: other products, then the same first page again
    first_page = cards.evaluate_all("(cards) => cards.map((card) => card.dataset.productId)")
    page.get_by_role("button", name="Next page").click()
    expect(page.locator("#page-number")).to_have_text("Page 2", timeout=UI_TIMEOUT_MS)
    settled(page)
    second_page = cards.evaluate_all("(cards) => cards.map((card) => card.dataset.productId)")
    assert second_page and not set(second_page) & set(first_page)
    page.get_by_role("button", name="Previous page").click()
    expect(page.locator("#page-number")).to_have_text("Page 1", timeout=UI_TIMEOUT_MS)
    expect(cards.first).to_have_attribute("data-product-id", first_page[0])
    settled(page)

    # a colour chip narrows the results to that colour, and shows pressed
    chip = page.locator('#facets .chip[data-facet="colour"]').first
    colour = chip.get_attribute("data-value")
    assert colour
    chip.click()
    expect(page.locator(f'#facets .chip[data-value="{colour}"]')).to_have_attribute(
        "aria-pressed", "true", timeout=UI_TIMEOUT_MS
    )
    settled(page)
    attributes = card_texts(page, ".card-attributes")
    assert attributes and all(line.startswith(colour) for line in attributes), attributes
    screenshot(page, artifacts, "6-facet")
    page.locator(f'#facets .chip[data-value="{colour}"]').click()  # and off again
    expect(page.locator(f'#facets .chip[data-value="{colour}"]')).to_have_attribute(
        "aria-pressed", "false", timeout=UI_TIMEOUT_MS
    )

    # the price slider and "in stock only": only priced products in stock, at most the price
    page.locator("#price-max").fill("500")
    expect(page.locator("#price-shown")).to_have_text("₹500")
    page.get_by_label("In stock only").check()
    settled(page)
    expect(cards.first).to_be_visible(timeout=UI_TIMEOUT_MS)
    prices = [float(text.lstrip("₹").replace(",", "")) for text in card_texts(page, ".card-price")]
    assert prices and all(price <= 500 for price in prices), prices
    assert page.locator("#grid .card .card-stock:visible").count() == 0
    shown = set(cards.evaluate_all("(cards) => cards.map((card) => card.dataset.productId)"))
    priced = {e.product_id: e for e in catalog.live}  # other modules price products too
    ours = shown & set(priced)
    assert ours and all(priced[pid].in_stock and (priced[pid].price or 0) <= 500 for pid in ours)
    screenshot(page, artifacts, "7-price-and-stock")


def test_duplicate_listings_show_as_one_card_with_n_similar(
    stack: LocalStack, catalog: Catalog, page: Page, artifacts: Path
) -> None:
    original = catalog.live[5]
    page.goto(f"{stack.router_url}/")
    search_in_page(page, original.title)
    listings = {original.product_id, *catalog.twins}
    cards = page.locator("#grid .card")
    expect(cards.first).to_be_visible(timeout=UI_TIMEOUT_MS)
    settled(page)
    shown = cards.evaluate_all("(cards) => cards.map((card) => card.dataset.productId)")
    assert len(listings & set(shown)) == 1, "one card for the three listings of one picture"
    card = page.locator(f'#grid .card[data-product-id="{(listings & set(shown)).pop()}"]')
    expect(card.locator(".card-similar")).to_have_text("2 similar")
    screenshot(page, artifacts, "8-similar")
