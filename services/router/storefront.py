"""The shopper-facing demo page and the product images it shows, served by the router.

`GET /` is one static page (services/router/static/, package data, no build step) that talks
to `/search` and `/images/{product_id}`. Images are fetched under the encoder's rules
(`vitrine.fetch`): an image_uri the encoder would refuse is refused here too.
Covered by tests/router/test_storefront.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import structlog
from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from proto.catalog import MAX_PRODUCT_ID_LEN, CatalogEvent
from services.router.products import ProductLookup
from vitrine.errors import ImageRejected, ImageUnavailable, InvalidQuery, ProductNotFound
from vitrine.fetch import ImageFetcher
from vitrine.images import ACCEPTED_FORMATS, image_content_type

STATIC_DIR = Path(__file__).parent / "static"
# a product's image can change with an update: let browsers reuse it briefly, not for days
IMAGE_CACHE_CONTROL = "public, max-age=300"
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'",
}

# the catalog's own rule for product ids, not a copy of it
_PRODUCT_ID = TypeAdapter(Annotated[str, CatalogEvent.model_fields["product_id"]])

log = structlog.get_logger()


@dataclass(frozen=True)
class ProductImage:
    data: bytes
    content_type: str


def parse_product_id(raw: str) -> str:
    try:
        return _PRODUCT_ID.validate_python(raw)
    except ValidationError as exc:
        raise InvalidQuery(
            f"product id must be 1-{MAX_PRODUCT_ID_LEN} characters of A-Z a-z 0-9 . _ : -, "
            f"got {raw[:MAX_PRODUCT_ID_LEN + 1]!r}"
        ) from exc


class ProductImages:
    """A product id -> its image bytes: the image_uri from the owning shard, the bytes
    through the safe fetcher."""

    def __init__(self, products: ProductLookup, fetcher: ImageFetcher) -> None:
        self._products = products
        self._fetcher = fetcher

    async def get(self, product_id: str) -> ProductImage:
        fields = await self._products.get(product_id)
        if not fields.image_uri:  # a product known only from a version 1 record
            raise ProductNotFound(f"product {product_id!r} has no image_uri yet")
        try:
            data = await self._fetcher.fetch(fields.image_uri)
        except ImageRejected as exc:
            # the reason names internal hosts and paths: it goes to the log, not to shoppers
            log.warning("product image unavailable", product_id=product_id, reason=str(exc))
            raise ImageUnavailable(f"image of product {product_id!r} unavailable") from exc
        content_type = image_content_type(data)
        if content_type is None:
            raise ImageUnavailable(
                f"image of product {product_id!r} is not in a format the encoder accepts "
                f"({', '.join(sorted(ACCEPTED_FORMATS))})"
            )
        return ProductImage(data, content_type)


PRODUCT_IMAGES = web.AppKey("product_images", ProductImages)


async def storefront_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


async def product_image(request: web.Request) -> web.Response:
    product_id = parse_product_id(request.match_info["product_id"])
    image = await request.app[PRODUCT_IMAGES].get(product_id)
    return web.Response(
        body=image.data,
        content_type=image.content_type,
        headers={"Cache-Control": IMAGE_CACHE_CONTROL, "X-Content-Type-Options": "nosniff"},
    )


def add_storefront_routes(app: web.Application) -> None:
    """The page, its assets and product images; `PRODUCT_IMAGES` must be set by startup."""
    app.router.add_get("/", storefront_page)
    app.router.add_static("/static/", STATIC_DIR)
    app.router.add_get("/images/{product_id:.+}", product_image)
