// Vitrine storefront: text search with facet chips, price, stock and pages; "more like this"
// by image; collapsed duplicates ("N similar"); partial-answer notices.
// Plain browser JavaScript, no build step, no third-party code: the page must work offline.
"use strict";

const K = 24;
const FACETS = ["colour", "article_type"];
const FACET_NAMES = { colour: "Colour", article_type: "Type" };
const CHIPS_PER_FACET = 8;
const el = (id) => document.getElementById(id);
let latest = 0; // only the newest request may paint the page
// the text search being refined: its words, chosen facet values, price, stock and page
let refined = null;

function freshRefinement(q) {
  return { q, filters: {}, priceMax: null, inStock: false, offset: 0 };
}

function searchUrl(r) {
  const params = new URLSearchParams({ q: r.q, k: String(K), facets: FACETS.join(",") });
  for (const [name, values] of Object.entries(r.filters)) {
    if (values.length) params.set(name, values.join(","));
  }
  if (r.priceMax !== null) params.set("price_max", String(r.priceMax));
  if (r.inStock) params.set("in_stock", "true");
  if (r.offset) params.set("offset", String(r.offset));
  return `/search?${params}`;
}

class ShownError extends Error {}

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}

async function request(url, init) {
  let response;
  try {
    response = await fetch(url, init);
  } catch {
    throw new ShownError("The search service cannot be reached. Is the router running?");
  }
  const body = await readJson(response);
  if (!response.ok) {
    throw new ShownError(body?.error ?? `Search failed: HTTP ${response.status}`);
  }
  if (!body || !Array.isArray(body.results)) {
    throw new ShownError("The search service sent an answer this page does not understand.");
  }
  return body;
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function imageUrl(productId) {
  return `/images/${encodeURIComponent(productId)}`;
}

async function productImageBase64(productId) {
  let response;
  try {
    response = await fetch(imageUrl(productId));
  } catch {
    throw new ShownError("The search service cannot be reached. Is the router running?");
  }
  if (!response.ok) {
    const body = await readJson(response);
    const reason = body?.error ?? `HTTP ${response.status}`;
    throw new ShownError(`Cannot show items like product ${productId}: ${reason}`);
  }
  return toBase64(await response.arrayBuffer());
}

function plural(n, one, many) {
  return `${n.toLocaleString()} ${n === 1 ? one : many}`;
}

function listOf(items) {
  return items.length < 2
    ? items.join("")
    : `${items.slice(0, -1).join(", ")} and ${items[items.length - 1]}`;
}

function showError(message) {
  el("error").textContent = message;
  el("error").hidden = !message;
}

function showPartial(answer) {
  const missing = answer.missing_shards ?? [];
  const notice = el("partial-notice");
  notice.hidden = !answer.partial;
  if (!answer.partial) {
    notice.textContent = "";
  } else if (missing.length === 0) {  // the router's own time ran out: no shard was asked
    notice.textContent = "Partial results: the search ran out of time before it could ask " +
      "the catalog. Please try again.";
  } else {
    notice.textContent =
      `Partial results: ${missing.length === 1 ? "shard" : "shards"} ${listOf(missing.map(String))} ` +
      `did not answer, so products ${missing.length === 1 ? "it holds" : "they hold"} are missing below.`;
  }
}

function card(hit) {
  const node = el("card-template").content.firstElementChild.cloneNode(true);
  const title = hit.title || `Product ${hit.product_id}`;
  node.dataset.productId = hit.product_id;
  const img = node.querySelector("img");
  img.src = imageUrl(hit.product_id);
  img.alt = title;
  img.addEventListener("error", () => node.classList.add("card-no-image"), { once: true });
  const button = node.querySelector(".card-image");
  button.setAttribute("aria-label", `More like ${title}`);
  button.addEventListener("click", () => moreLikeThis(hit.product_id, title));
  node.querySelector(".card-title").textContent = title;
  node.querySelector(".card-price").textContent =
    typeof hit.price === "number" ? `₹${hit.price.toLocaleString()}` : "";
  node.querySelector(".card-stock").hidden = hit.in_stock !== false;
  const similar = node.querySelector(".card-similar");
  const also = hit.also ?? [];
  similar.hidden = also.length === 0;
  similar.textContent = `${also.length} similar`;
  similar.title = `Also listed as ${also.map((id) => `#${id}`).join(", ")}`;
  const attributes = hit.attributes ?? {};
  node.querySelector(".card-attributes").textContent =
    [attributes.colour, attributes.article_type].filter(Boolean).join(" · ");
  node.querySelector(".card-id").textContent = `#${hit.product_id}`;
  node.querySelector(".card-score").textContent = hit.score.toFixed(3);
  return node;
}

function render(answer, heading, mode) {
  const grid = el("grid");
  grid.replaceChildren(...answer.results.map(card));
  const c = answer.coverage;
  el("results-heading").textContent = heading;
  el("results-meta").textContent = answer.results.length
    ? `${plural(answer.results.length, "item", "items")} · searched ` +
      `${plural(c.vectors_searched, "product", "products")} on ${c.shards_answered} of ` +
      `${c.shards_total} shards · ${Math.round(answer.took_ms)} ms`
    : "Nothing found. Try other words.";
  showPartial(answer);
  el("results").dataset.mode = mode;
  renderRefinements(mode === "text" ? answer : null);
}

function renderRefinements(answer) {
  el("refine").hidden = answer === null;
  el("pager").hidden = answer === null || (!refined.offset && answer.next_offset === null);
  if (answer === null) return;
  const chips = [];
  for (const facet of FACETS) {
    const values = (answer.facets?.[facet] ?? []).slice(0, CHIPS_PER_FACET);
    const chosen = refined.filters[facet] ?? [];
    for (const value of chosen) {  // a chosen value stays, even when nothing is left of it
      if (!values.some((v) => v.value.toLowerCase() === value.toLowerCase())) {
        values.push({ value, count: 0 });
      }
    }
    if (!values.length) continue;
    const name = document.createElement("span");
    name.className = "facet-name";
    name.textContent = FACET_NAMES[facet];
    chips.push(name);
    for (const { value, count } of values) {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "chip";
      chip.dataset.facet = facet;
      chip.dataset.value = value;
      const on = chosen.some((v) => v.toLowerCase() === value.toLowerCase());
      chip.setAttribute("aria-pressed", String(on));
      chip.textContent = `${value} (${count})`;
      chip.addEventListener("click", () => toggleFacet(facet, value));
      chips.push(chip);
    }
  }
  el("facets").replaceChildren(...chips);
  el("prev-page").disabled = refined.offset === 0;
  el("next-page").disabled = answer.next_offset === null;
  el("page-number").textContent = `Page ${Math.floor(refined.offset / K) + 1}`;
}

function toggleFacet(facet, value) {
  const chosen = refined.filters[facet] ?? [];
  const on = chosen.some((v) => v.toLowerCase() === value.toLowerCase());
  refined.filters[facet] = on
    ? chosen.filter((v) => v.toLowerCase() !== value.toLowerCase())
    : [...chosen, value];
  refined.offset = 0;
  return searchRefined();
}

function searchRefined() {
  const r = refined;
  return run(async (current) => {
    const answer = await request(searchUrl(r));
    if (current()) render(answer, `Results for “${r.q}”`, "text");
  });
}

async function run(paint) {
  const ticket = ++latest;
  const results = el("results");
  results.setAttribute("aria-busy", "true");
  el("search-button").disabled = true;
  showError("");
  try {
    await paint(() => ticket === latest);
  } catch (err) {
    if (ticket !== latest) return;
    showError(err instanceof ShownError ? err.message : `Something went wrong: ${err}`);
  } finally {
    if (ticket === latest) {
      results.removeAttribute("aria-busy");
      el("search-button").disabled = false;
    }
  }
}

function searchText(q, push = true) {
  el("search-input").value = q;
  if (push) history.pushState({ q }, "", `/?q=${encodeURIComponent(q)}`);
  refined = freshRefinement(q);
  el("price-max").value = el("price-max").max;
  el("price-shown").textContent = "any";
  el("in-stock").checked = false;
  return searchRefined();
}

function moreLikeThis(productId, title, push = true) {
  if (push) history.pushState({ like: productId }, "", `/?like=${encodeURIComponent(productId)}`);
  window.scrollTo({ top: 0, behavior: "smooth" });
  return run(async (current) => {
    const imageB64 = await productImageBase64(productId);
    const answer = await request("/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image_b64: imageB64, k: K }),
    });
    if (!current()) return;
    const same = answer.results.find((hit) => hit.product_id === productId);
    const name = title ?? same?.title;
    const heading = `Items similar to product ${productId}` + (name ? ` · ${name}` : "");
    render(answer, heading, "similar");
  });
}

function fromLocation() {
  const params = new URLSearchParams(location.search);
  if (params.get("like")) moreLikeThis(params.get("like"), undefined, false);
  else if (params.get("q")) searchText(params.get("q"), false);
}

document.addEventListener("DOMContentLoaded", () => {
  el("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = el("search-input").value.trim();
    if (q) searchText(q);
  });
  window.addEventListener("popstate", fromLocation);
  el("refine").addEventListener("submit", (event) => event.preventDefault());
  const price = el("price-max");
  price.addEventListener("input", () => {
    el("price-shown").textContent = price.value === price.max ? "any" : `₹${price.value}`;
  });
  price.addEventListener("change", () => {
    if (!refined) return;
    refined.priceMax = price.value === price.max ? null : Number(price.value);
    refined.offset = 0;
    searchRefined();
  });
  el("in-stock").addEventListener("change", () => {
    if (!refined) return;
    refined.inStock = el("in-stock").checked;
    refined.offset = 0;
    searchRefined();
  });
  el("next-page").addEventListener("click", () => {
    refined.offset += K;
    window.scrollTo({ top: 0 });
    searchRefined();
  });
  el("prev-page").addEventListener("click", () => {
    refined.offset = Math.max(0, refined.offset - K);
    window.scrollTo({ top: 0 });
    searchRefined();
  });
  fromLocation();
});
