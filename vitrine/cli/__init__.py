"""The operator's tools: the `vitrine` command (`main`), the embedded local stack it runs and
supervises (`stack`, `control`), fleet status (`status`) and catalog ingest (`ingest`).
Services never import from here; they link only `vitrine/`'s shared libraries."""
