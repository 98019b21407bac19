// clipforge serve's page: text, image and "more like this" searches over /api, the query kept in the URL.
"use strict";

const PAGE = 24;
const $ = (id) => document.getElementById(id);
let current = null;   // {text} | {like} | {image: File, preview}, with offset
let lastImage = null; // the latest upload, so Back to it can search again (a file cannot live in the URL)
let busy = 0;

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function queryFromURL() {
  const params = new URLSearchParams(location.search);
  const offset = Math.max(0, parseInt(params.get("offset"), 10) || 0);
  if (params.get("q")) return { text: params.get("q"), offset };
  if (/^\d+$/.test(params.get("like") || "")) return { like: Number(params.get("like")), offset };
  return null;
}

function urlFor(query) {
  if (!query || query.image) return "/";
  const params = new URLSearchParams(query.text !== undefined ? { q: query.text } : { like: query.like });
  if (query.offset) params.set("offset", query.offset);
  return "/?" + params;
}

async function run(query, push) {
  current = query;
  if (push) history.pushState(query.image ? { upload: true } : null, "", urlFor(query));
  $("q").value = query.text || "";
  $("error").hidden = true;
  busy++;
  document.body.classList.add("busy");
  try {
    let data;
    if (query.image) {
      const form = new FormData();
      form.append("image", query.image);
      form.append("k", PAGE);
      form.append("offset", query.offset);
      data = await api("/api/search/image", { method: "POST", body: form });
    } else {
      const body = { k: PAGE, offset: query.offset };
      if (query.text !== undefined) body.text = query.text; else body.like = query.like;
      data = await api("/api/search", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    }
    if (query === current) render(query, data);
  } catch (error) {
    if (query === current) showError(error.message);
  } finally {
    if (--busy === 0) document.body.classList.remove("busy");
  }
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function render(query, data) {
  const summary = $("summary");
  summary.replaceChildren();
  if (query.text !== undefined) summary.append("Results for ", el("q", { textContent: query.text }));
  else if (query.image) summary.append(el("img", { src: query.preview, alt: "" }),
                                       "Images like ", el("em", { textContent: query.image.name || "the upload" }));
  else summary.append(el("img", { src: `/thumb/${query.like}`, alt: "" }), "More like item ",
                      el("em", { textContent: String(query.like) }));
  const tiles = data.results.map((r) => {
    const button = el("button", { type: "button", className: "pick", title: "More like this" },
                      el("img", { src: r.thumb, alt: "", loading: "lazy" }));
    button.setAttribute("aria-label", `More like ${r.caption || r.path}`);
    button.addEventListener("click", () => { run({ like: r.id, offset: 0 }, true); scrollTo(0, 0); });
    const tile = el("li", { className: "tile" }, button,
      el("div", { className: "meta" },
         el("span", { className: "score", textContent: r.score.toFixed(3), title: "cosine similarity" }),
         el("a", { href: r.image, target: "_blank", rel: "noopener", textContent: "open" })),
      r.caption ? el("p", { className: "caption", textContent: r.caption }) : null,
      el("p", { className: "path", textContent: r.path.split(/[\\/]/).pop(), title: r.path }));
    tile.dataset.id = r.id;
    tile.dataset.path = r.path;
    return tile;
  });
  $("results").replaceChildren(...tiles);
  const first = data.offset + 1, last = data.offset + data.results.length;
  $("range").textContent = data.results.length ? `${first}–${last}` : "no results";
  $("prev").disabled = data.offset === 0;
  $("next").disabled = !data.more;
  $("pager").hidden = false;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("results").replaceChildren();
  $("summary").replaceChildren();
  $("pager").hidden = true;
}

function page(step) {
  if (!current) return;
  run({ ...current, offset: Math.max(0, current.offset + step * PAGE) }, !current.image);
  scrollTo(0, 0);
}

function searchImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) return showError(`${file.name} is not an image file.`);
  if (lastImage) URL.revokeObjectURL(lastImage.preview);
  lastImage = { image: file, preview: URL.createObjectURL(file), offset: 0 };
  run(lastImage, true);
}

$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("q").value.trim();
  if (text) run({ text, offset: 0 }, true);
});
$("file").addEventListener("change", (event) => { searchImage(event.target.files[0]); event.target.value = ""; });
$("prev").addEventListener("click", () => page(-1));
$("next").addEventListener("click", () => page(1));

let dragDepth = 0;
addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; $("drop").hidden = false; });
addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("drop").hidden = true; } });
addEventListener("dragover", (e) => e.preventDefault());
addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  $("drop").hidden = true;
  searchImage(e.dataTransfer.files[0]);
});

addEventListener("popstate", (event) => {
  const query = queryFromURL() || (event.state && event.state.upload ? lastImage : null);
  if (query) return run(query, false);
  current = null;
  for (const id of ["results", "summary"]) $(id).replaceChildren();
  $("pager").hidden = true;
  $("q").value = "";
});

api("/api/health").then(
  (h) => { $("status").textContent = `${h.count.toLocaleString()} images · model ${h.model} · ${h.embed_dim}-d`; },
  (error) => { $("status").textContent = `Server not reachable: ${error.message}`; });
const initial = queryFromURL();
if (initial) run(initial, false);
