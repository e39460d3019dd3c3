// The comparison page (/ui): one photo, every ready route of a model, side by side.
// Plain browser JS, no build step, no requests beyond this gateway's own JSON API.
// What each column shows is also kept in window.gatewayUI.results (for tests and the curious).
"use strict";

(() => {
  const KEY_STORE = "gateway.apiKey"; // sessionStorage only: forgotten when the tab closes
  const TOP_K = 5;
  const DETECTIONS_LISTED = 10;
  // box colours by class index (distinct on photos; the first is the COCO person's)
  const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
                   "#008080", "#f032e6", "#9a6324", "#800000", "#000075"];

  const state = {
    models: [],
    defaultModel: null,
    apiKey: sessionStorage.getItem(KEY_STORE) || "",
    results: [], // {photo, route, backend, status, ok, latency_ms, body, error, boxes}
    photos: [], // {photo, routes, ms}: the time from sending to the last column shown
    busy: 0,
  };
  window.gatewayUI = state;

  const $ = (id) => document.getElementById(id);

  /** An element with attributes (data-*, class, ...) and children (nodes or text). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name === "style") Object.assign(node.style, value); // CSSOM: allowed by the page's CSP
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function headers(extra) {
    const h = Object.assign({ Accept: "application/json" }, extra || {});
    if (state.apiKey) h["X-API-Key"] = state.apiKey;
    return h;
  }

  /** The JSON body of an answer, or null when it is not JSON (a proxy's HTML page, say). */
  async function jsonOf(response) {
    try {
      return await response.json();
    } catch (_) {
      return null;
    }
  }

  /** An error answer in words: "503 backend_unavailable: backend 'triton': ...". */
  function errorWords(response, body) {
    const error = body && body.error;
    if (error && typeof error === "object") {
      return `${response.status} ${error.code || ""}: ${error.message || "(no message)"}`;
    }
    if (typeof error === "string") return `${response.status}: ${error}`;
    return `${response.status} ${response.statusText || "error"} (the answer was not the gateway's JSON)`;
  }

  function showMessage(text) {
    const message = $("message");
    message.textContent = text || "";
    message.hidden = !text;
  }

  // -- models and the status strip -------------------------------------------------------------

  async function loadModels() {
    let response;
    try {
      response = await fetch("v1/models", { headers: headers() });
    } catch (err) {
      showMessage(`The gateway did not answer: ${err.message}`);
      return false;
    }
    const body = await jsonOf(response);
    if (response.status === 401) {
      $("key-box").hidden = false;
      $("api-key").focus();
      showMessage(`This gateway needs an API key: ${errorWords(response, body)}`);
      $("status").replaceChildren(el("span", { class: "muted", text: "enter the API key to see the models" }));
      return false;
    }
    if (!response.ok || !body || !Array.isArray(body.models)) {
      showMessage(`Could not list the models: ${errorWords(response, body)}`);
      return false;
    }
    showMessage("");
    state.models = body.models;
    state.defaultModel = body.default_model;
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren(...body.models.map((m) =>
      el("option", { value: m.name, text: `${m.name} (${m.task}${m.default ? ", default" : ""})` })));
    const keep = body.models.some((m) => m.name === chosen) ? chosen : body.default_model;
    select.value = keep || (body.models[0] && body.models[0].name) || "";
    select.disabled = false;
    renderStatus();
    return true;
  }

  function currentModel() {
    return state.models.find((m) => m.name === $("model").value) || null;
  }

  function renderStatus() {
    const model = currentModel();
    const strip = $("status");
    if (!model) {
      strip.replaceChildren(el("span", { class: "muted", text: "no model" }));
      return;
    }
    const chips = model.routes.map((r) => {
      const open = r.circuit === "open";
      const failures = r.consecutive_failures || 0;
      const circuit = open ? `circuit open · ${failures} failure${failures === 1 ? "" : "s"}`
        : failures ? `circuit closed · ${failures} failure${failures === 1 ? "" : "s"}` : "circuit closed";
      return el("span", {
        class: `chip ${r.ready ? "ready" : "down"}${open ? " open" : ""}`,
        "data-route": r.name, "data-ready": String(r.ready), "data-circuit": r.circuit || "",
        title: `${r.name}: backend ${r.backend} (${r.kind}), model ${r.backend_model}`,
      },
      el("span", { class: "dot", "aria-hidden": "true" }),
      el("strong", { text: r.name }),
      el("span", { class: "muted", text: r.kind === r.name ? "" : r.kind }),
      el("span", { text: r.ready ? "ready" : "not ready" }),
      el("span", { class: "circuit", text: circuit }));
    });
    strip.replaceChildren(
      el("span", { class: "model-facts" },
        el("strong", { text: model.name }), ` ${model.task} · weights ${model.weights}`),
      ...chips);
  }

  async function refreshStatus() {
    if (state.busy) return; // the last photo's run refreshes it when it ends
    await loadModels();
  }

  // -- photos -----------------------------------------------------------------------------------

  function imageOf(file) {
    return new Promise((resolve) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => resolve(null); // not an image this browser shows: the gateway still says why
      img.src = URL.createObjectURL(file);
    });
  }

  function sizeWords(bytes) {
    if (bytes >= 1 << 20) return `${(bytes / (1 << 20)).toFixed(1)} MiB`;
    if (bytes >= 1 << 10) return `${(bytes / (1 << 10)).toFixed(0)} KiB`;
    return `${bytes} B`;
  }

  async function handleFiles(fileList) {
    const files = Array.from(fileList || []);
    const model = currentModel();
    if (!files.length) return;
    if (!model) {
      showMessage("Pick a model first (enter the API key if the gateway asks for one).");
      return;
    }
    state.busy += 1;
    try {
      for (const file of files) await runPhoto(model, file); // photos one after another, routes at once
    } finally {
      state.busy -= 1;
      $("files").value = "";
    }
    await refreshStatus();
  }

  async function runPhoto(model, file) {
    const started = performance.now();
    const img = await imageOf(file);
    const asked = model.routes.filter((r) => r.ready || $("ask-all").checked);
    const card = el("article", {
      class: "photo", "data-photo": file.name, "data-model": model.name, "data-state": "running",
    });
    const facts = `${sizeWords(file.size)}${img ? ` · ${img.naturalWidth}×${img.naturalHeight} px` : ""}`;
    const head = el("header", {},
      img ? el("img", { class: "thumb", src: img.src, alt: "" }) : null,
      el("div", {}, el("h2", { text: file.name }),
        el("p", { class: "muted", text: `${facts} · ${model.name} on ${asked.length} of ${model.routes.length} routes` })),
      el("span", { class: "total muted" }));
    const grid = el("div", { class: `routes ${model.task}` });
    card.append(head, grid);
    $("results").prepend(card);

    const columns = asked.map((route) => {
      const column = el("section", {
        class: "route", "data-route": route.name, "data-state": "pending", "aria-busy": "true",
      },
      el("h3", {}, el("span", { text: route.name }), el("span", { class: "badge", text: route.kind })),
      el("p", { class: "meta muted", text: "asking…" }));
      grid.append(column);
      return column;
    });
    const skipped = model.routes.filter((r) => !asked.includes(r));
    if (skipped.length) {
      card.append(el("p", { class: "skipped hint" }, "Not asked, not ready: ",
        skipped.map((r, i) => [i ? ", " : "", el("span", { "data-route": r.name, "data-state": "skipped", text: r.name })]),
        " (tick “ask routes that are not ready too” to send anyway)."));
    }
    if (!asked.length) grid.append(el("p", { class: "error", text: "No route of this model is ready." }));
    await Promise.all(asked.map((route, i) => ask(model, route, file, img, columns[i])));
    const ms = performance.now() - started;
    card.dataset.state = "done";
    card.dataset.ms = ms.toFixed(1);
    head.querySelector(".total").textContent = `all routes in ${ms.toFixed(0)} ms`;
    state.photos.push({ photo: file.name, model: model.name, routes: asked.length, ms });
  }

  async function ask(model, route, file, img, column) {
    const verb = model.task === "detection" ? "detect" : "classify";
    const query = new URLSearchParams({ route: route.name });
    if (verb === "classify") query.set("top_k", String(TOP_K));
    const url = `v1/models/${encodeURIComponent(model.name)}/${verb}?${query}`;
    const record = { photo: file.name, model: model.name, route: route.name, task: model.task };
    const t0 = performance.now();
    let response;
    let body = null;
    try {
      response = await fetch(url, {
        method: "POST", body: file,
        headers: headers({ "Content-Type": file.type || "application/octet-stream" }),
      });
      body = await jsonOf(response);
    } catch (err) {
      record.latency_ms = performance.now() - t0;
      Object.assign(record, { ok: false, status: 0, error: `no answer: ${err.message}` });
      return finish(column, record);
    }
    record.latency_ms = performance.now() - t0;
    record.status = response.status;
    record.ok = response.ok && body !== null;
    record.body = body;
    if (!record.ok) {
      record.error = errorWords(response, body);
      record.backend = body && body.error && body.error.backend;
      return finish(column, record);
    }
    record.backend = body.backend;
    const result = (body.results || [])[0] || {};
    if (model.task === "detection") renderDetection(column, record, result.detections || [], img);
    else renderPredictions(column, result.predictions || []);
    return finish(column, record);
  }

  function finish(column, record) {
    column.dataset.state = record.ok ? "ok" : "error";
    column.dataset.status = String(record.status);
    column.dataset.latencyMs = record.latency_ms.toFixed(1);
    if (record.backend) column.dataset.backend = record.backend;
    column.removeAttribute("aria-busy");
    const meta = column.querySelector(".meta");
    const server = (record.ok && record.body.timings_ms) || {};
    const ms = (v) => (typeof v === "number" ? `${v.toFixed(0)} ms` : "?");
    meta.replaceChildren(
      el("span", { class: "latency", text: `${record.latency_ms.toFixed(0)} ms` }),
      record.ok ? ` (gateway ${ms(server.total)}, inference ${ms(server.inference)})` : "",
      record.backend ? el("span", { class: "engine" }, record.ok ? " · answered by " : " · failed at ",
        el("strong", { text: record.backend })) : "");
    meta.classList.remove("muted");
    if (!record.ok) column.append(el("p", { class: "error", role: "status", text: record.error }));
    state.results.push(record);
  }

  function renderPredictions(column, predictions) {
    const list = el("ol", { class: "predictions" });
    for (const p of predictions) {
      const pct = Math.max(0, Math.min(1, p.score)) * 100;
      list.append(el("li", { "data-label": p.label, "data-index": p.index, "data-score": String(p.score) },
        el("span", { class: "label", text: p.label, title: `class ${p.index}` }),
        el("span", { class: "score", text: p.score.toFixed(3) }),
        el("span", { class: "bar", "aria-hidden": "true" },
          el("span", { style: { width: `${pct.toFixed(2)}%` } }))));
    }
    if (!predictions.length) list.append(el("li", { class: "muted", text: "no predictions" }));
    column.append(list);
  }

  /** The photo in its own pixels on a canvas, the boxes drawn at the JSON's coordinates. */
  function renderDetection(column, record, detections, img) {
    record.boxes = [];
    if (img) {
      const w = img.naturalWidth;
      const h = img.naturalHeight;
      const canvas = el("canvas", { class: "boxes", width: w, height: h, role: "img",
                                    "aria-label": `${detections.length} boxes on ${record.photo}` });
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0, w, h);
      const line = Math.max(3, Math.round(Math.max(w, h) / 200));
      const font = Math.max(14, Math.round(Math.max(w, h) / 28));
      ctx.font = `600 ${font}px system-ui, sans-serif`;
      ctx.textBaseline = "top";
      // lowest score first, so the best box and its label end up on top
      for (const d of [...detections].reverse()) {
        const color = PALETTE[d.index % PALETTE.length];
        const b = d.box;
        ctx.lineWidth = line;
        ctx.strokeStyle = color;
        ctx.strokeRect(b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1);
        const text = `${d.label} ${d.score.toFixed(2)}`;
        const tw = ctx.measureText(text).width + 8;
        const ty = b.y1 - font - 6 >= 0 ? b.y1 - font - 6 : b.y1 + line; // above the box, or inside it
        const tx = Math.min(Math.max(0, b.x1 - line / 2), Math.max(0, w - tw));
        ctx.fillStyle = color;
        ctx.fillRect(tx, ty, tw, font + 6);
        ctx.fillStyle = "#fff";
        ctx.fillText(text, tx + 4, ty + 3);
      }
      for (const d of detections) {
        record.boxes.push({ label: d.label, index: d.index, score: d.score, ...d.box,
                            color: PALETTE[d.index % PALETTE.length], line });
      }
      canvas.dataset.boxes = JSON.stringify(record.boxes);
      column.append(canvas);
    } else {
      column.append(el("p", { class: "hint", text: "This browser cannot show the photo; the boxes are listed." }));
    }
    const list = el("ol", { class: "predictions detections" });
    for (const d of detections.slice(0, DETECTIONS_LISTED)) {
      const b = d.box;
      list.append(el("li", { "data-label": d.label, "data-index": d.index, "data-score": String(d.score) },
        el("span", { class: "label", text: d.label,
                     title: `x1=${b.x1} y1=${b.y1} x2=${b.x2} y2=${b.y2}` }),
        el("span", { class: "score", text: d.score.toFixed(3) }),
        el("span", { class: "bar", "aria-hidden": "true" },
          el("span", { style: { width: `${(Math.max(0, Math.min(1, d.score)) * 100).toFixed(2)}%`,
                                background: PALETTE[d.index % PALETTE.length] } })),
        el("span", { class: "coords muted",
                     text: `${b.x1.toFixed(0)},${b.y1.toFixed(0)} → ${b.x2.toFixed(0)},${b.y2.toFixed(0)}` })));
    }
    if (detections.length > DETECTIONS_LISTED) {
      list.append(el("li", { class: "muted", text: `and ${detections.length - DETECTIONS_LISTED} more (all drawn)` }));
    }
    if (!detections.length) list.append(el("li", { class: "muted", text: "no objects above the score threshold" }));
    column.append(list);
  }

  // -- wiring -----------------------------------------------------------------------------------

  function applyKey() {
    state.apiKey = $("api-key").value.trim();
    if (state.apiKey && $("key-tab").checked) sessionStorage.setItem(KEY_STORE, state.apiKey);
    else sessionStorage.removeItem(KEY_STORE);
    loadModels();
  }

  function init() {
    if (state.apiKey) {
      $("api-key").value = state.apiKey;
      $("key-tab").checked = true;
    }
    $("key-toggle").addEventListener("click", () => {
      $("key-box").hidden = !$("key-box").hidden;
      if (!$("key-box").hidden) $("api-key").focus();
    });
    $("key-box").addEventListener("submit", (e) => {
      e.preventDefault();
      applyKey();
    });
    $("key-tab").addEventListener("change", () => {
      if (!$("key-tab").checked) sessionStorage.removeItem(KEY_STORE);
      else if (state.apiKey) sessionStorage.setItem(KEY_STORE, state.apiKey);
    });
    $("model").addEventListener("change", renderStatus);
    $("files").addEventListener("change", (e) => handleFiles(e.target.files));
    const drop = $("drop");
    // a photo dropped anywhere is taken (and never opened by the browser in place of the page)
    document.addEventListener("dragover", (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
    document.addEventListener("dragleave", (e) => {
      if (!e.relatedTarget) drop.classList.remove("over");
    });
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      handleFiles(e.dataTransfer && e.dataTransfer.files);
    });
    loadModels();
  }

  init();
})();
