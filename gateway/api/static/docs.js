// /docs: Swagger UI (vendored, swagger-ui/VENDOR.md) over this gateway's own /openapi.json.
// When the gateway requires an API key, /openapi.json does too: the page asks for the key first and
// sends it with every request, unless Swagger UI's "Authorize" already put one on it. The key lives in
// this page's memory, or in the tab's sessionStorage (shared with /ui) when "keep for this tab" is
// ticked there or here; never beyond the tab.
"use strict";

(() => {
  const KEY_STORE = "gateway.apiKey";
  let apiKey = sessionStorage.getItem(KEY_STORE) || "";
  const form = document.getElementById("key-form");

  function withKey(request) {
    const sent = Object.keys(request.headers || {}).map((h) => h.toLowerCase());
    if (apiKey && !sent.includes("x-api-key") && !sent.includes("authorization")) {
      request.headers = Object.assign({}, request.headers, { "X-API-Key": apiKey });
    }
    return request;
  }

  function showSwagger() {
    form.hidden = true;
    window.ui = SwaggerUIBundle({
      url: "openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      validatorUrl: null, // no request to swagger.io's validator: nothing leaves this gateway
      displayRequestDuration: true,
      defaultModelsExpandDepth: 0,
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout",
      requestInterceptor: withKey,
    });
  }

  async function start() {
    let response;
    try {
      response = await fetch("openapi.json", { headers: apiKey ? { "X-API-Key": apiKey } : {} });
    } catch (_) {
      showSwagger(); // Swagger UI says what went wrong
      return;
    }
    if (response.status !== 401) {
      showSwagger();
      return;
    }
    let words = "401";
    try {
      const body = await response.json();
      words = `401 ${body.error.code}: ${body.error.message}`;
    } catch (_) { /* not the gateway's JSON */ }
    document.getElementById("key-message").textContent =
      `This gateway needs an API key to describe its API (${words}).`;
    form.hidden = false;
    document.getElementById("api-key").focus();
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = document.getElementById("api-key").value.trim();
    if (apiKey && document.getElementById("key-tab").checked) sessionStorage.setItem(KEY_STORE, apiKey);
    start();
  });
  start();
})();
