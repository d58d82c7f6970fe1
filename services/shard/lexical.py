"""The shard's lexical index: BM25 over each product's text, in tantivy (the Rust engine).

A document per live product: its title and attribute values as English text (stemmed, stop
words out; by default a product must hold every remaining query word), its
filterable attributes (normalised, untokenised), price and availability, so a query's filters
apply inside the lexical search exactly as inside the vector scan. The store keeps it in step
with the same versioned upserts and deletes (services/shard/store.py); writes become visible at
the next refresh (`refresh`, at most `REFRESH_S` after a write, like Elasticsearch's refresh
interval), and every candidate is checked against the store before it counts, so a stale
document can never show a deleted product or an old title. With snapshots on, the index lives
in a directory and a snapshot carries its committed files (hard links, taken with the
offsets); without, it lives in memory. A restart opens the snapshot's copy, or rebuilds it
from the products the snapshot holds when there is none; a re-shard builds it from the log.
Covered by tests/shard/test_lexical.py.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import tantivy

from proto.vectors import ProductFields
from services.shard.attributes import RowFilter, normalise

ANALYZER = "vitrine_en"
REFRESH_S = 0.2  # the most a write waits before lexical searches see it
WRITER_HEAP_BYTES = 64 * 1024 * 1024  # tantivy's indexing buffer (it needs >= 15 MB per thread)
_NOT_A_WORD = re.compile(r"[^\w]+")  # the query language's operators are never the shopper's


class LexicalIndex:
    def __init__(
        self, filter_fields: Iterable[str], match_all: bool = True,
        directory: Path | None = None,
    ) -> None:
        """`match_all`: a document must hold every word of the query (the storefront's "red
        shirt" means red and shirt); else any word counts, ranked by BM25. `directory`: where
        the index lives (it must hold nothing but an index this schema wrote); None: memory."""
        self._filter_fields = list(filter_fields)
        self._match_all = match_all
        self.directory = directory
        builder = tantivy.SchemaBuilder()
        builder.add_text_field("id", stored=True, tokenizer_name="raw")
        builder.add_text_field("text", tokenizer_name=ANALYZER)
        for name in self._filter_fields:
            builder.add_text_field(_field(name), tokenizer_name="raw")
        builder.add_float_field("price", indexed=True, fast=True)
        builder.add_unsigned_field("in_stock", indexed=True)
        self._schema = builder.build()
        if directory is None:
            self._index = tantivy.Index(self._schema)
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self._index = tantivy.Index(self._schema, path=str(directory))
        self._index.register_tokenizer(ANALYZER, _english())
        self._writer = self._index.writer(heap_size=WRITER_HEAP_BYTES, num_threads=1)
        self._dirty = False
        self._refreshed = time.monotonic()

    def upsert(self, product_id: str, fields: ProductFields, fresh: bool = False) -> None:
        """`fresh`: the product is known to be absent (a rebuild), no delete needed."""
        if not fresh:
            self._writer.delete_documents_by_term("id", product_id)
        document = tantivy.Document(id=product_id, text=searchable_text(fields))
        for name in self._filter_fields:
            value = fields.attributes.get(name)
            if value is not None and (normalised := normalise(value)):
                document.add_text(_field(name), normalised)
        if fields.price is not None:
            document.add_float("price", float(fields.price))
        if fields.in_stock is not None:
            document.add_unsigned("in_stock", int(fields.in_stock))
        self._writer.add_document(document)
        self._dirty = True

    def delete(self, product_id: str) -> None:
        self._writer.delete_documents_by_term("id", product_id)
        self._dirty = True

    def refresh(self, force: bool = False) -> bool:
        """Make the writes so far searchable, unless the last refresh was under REFRESH_S ago."""
        if not self._dirty or (not force and time.monotonic() - self._refreshed < REFRESH_S):
            return False
        self._writer.commit()
        self._index.reload()
        self._dirty, self._refreshed = False, time.monotonic()
        return True

    def search(self, text: str, k: int, where: RowFilter | None = None) -> list[tuple[float, str]]:
        """(BM25 score, product id) of the best k documents passing the filter, best first."""
        words = _NOT_A_WORD.sub(" ", text).strip().lower()  # AND, OR, NOT: operators
        if not words or k <= 0:
            return []
        query = self._index.parse_query(words, ["text"], conjunction_by_default=self._match_all)
        clauses = self._filter_clauses(where) if where else []
        if clauses:
            query = tantivy.Query.boolean_query(
                [(tantivy.Occur.Must, query)] + [(tantivy.Occur.Must, c) for c in clauses]
            )
        searcher = self._index.searcher()
        found = searcher.search(query, k, count=False)
        return [(float(score), searcher.doc(address)["id"][0]) for score, address in found.hits]

    def __len__(self) -> int:
        return int(self._index.searcher().num_docs)

    def checkpoint(self, into: Path) -> None:
        """Commit, then hard-link the committed files into `into` (a new directory): a copy
        consistent with this moment, however tantivy merges and collects afterwards."""
        assert self.directory is not None, "an index in memory has no files"
        self._dirty = True  # commit even when nothing changed: meta.json must exist
        self.refresh(force=True)
        into.mkdir(parents=True)
        for path in self.directory.iterdir():
            if path.is_file() and not path.name.startswith(".tantivy"):
                os.link(path, into / path.name)

    @classmethod
    def opened(
        cls, filter_fields: Iterable[str], match_all: bool, directory: Path, files: Path
    ) -> LexicalIndex:
        """An index over a copy of a checkpoint's files (the checkpoint stays as it is)."""
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(files, directory)
        index = cls(filter_fields, match_all, directory)
        index._index.reload()
        return index

    def _filter_clauses(self, where: RowFilter) -> list[tantivy.Query]:
        clauses = []
        for name, values in where.attributes.items():
            if name in self._filter_fields:  # an unknown field is refused before we get here
                accepted = sorted({normalise(v) for v in values})
                clauses.append(tantivy.Query.term_set_query(self._schema, _field(name), accepted))
        if where.price_min is not None or where.price_max is not None:
            clauses.append(tantivy.Query.range_query(
                self._schema, "price", tantivy.FieldType.Float,
                None if where.price_min is None else float(where.price_min),
                None if where.price_max is None else float(where.price_max),
            ))
        if where.in_stock is not None:
            clauses.append(
                tantivy.Query.term_query(self._schema, "in_stock", int(where.in_stock))
            )
        return clauses


def _english() -> tantivy.TextAnalyzer:
    """Words, lowercased, accents folded, English stop words out ("shirts for men" asks for
    shirt and men), stemmed; the same for documents and queries."""
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(40))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.ascii_fold())
        .filter(tantivy.Filter.stopword("english"))
        .filter(tantivy.Filter.stemmer("english"))
        .build()
    )


def searchable_text(fields: ProductFields) -> str:
    """What BM25 reads of a product: its title (the brand and model name are in it) and its
    attribute values."""
    return " ".join([fields.title, *fields.attributes.values()])


def _field(name: str) -> str:
    return f"attr_{name}"
