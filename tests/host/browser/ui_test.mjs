// Usage: node ui_test.mjs URL PROMPT_JSON_FILE OUT_DIR
// Loads ComfyUI's UI, finds our nodes, sets the backend through the widget, queues the graph
// from the UI and waits for success; prints one JSON line with what it saw.
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";

const [url, promptFile, outDir] = process.argv.slice(2);
const apiPrompt = JSON.parse(readFileSync(promptFile, "utf8"));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
await page.goto(url, { waitUntil: "domcontentloaded" });
await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 120000 });
const result = await page.evaluate(async (prompt) => {
  const app = window.app;
  const api = app.api;
  const registered = Object.keys(window.LiteGraph.registered_node_types);
  await app.loadApiJson(prompt, "nvfp4_ui_test.json");
  const backend = app.graph.nodes.find((n) => n.type === "NVFP4Backend");
  const combo = backend.widgets.find((w) => w.name === "backend");
  const options = [...(combo.options.values || [])];
  // pick an unavailable backend first (the node should turn red and say why), then dequant
  const info = await (await api.fetchApi("/nvfp4/backends")).json();
  const missing = info.backends.find((b) => !b.available);
  let warned = null;
  if (missing) {
    combo.value = missing.name;
    combo.callback?.(missing.name);
    await new Promise((r) => setTimeout(r, 200));
    warned = { status: backend.widgets.find((w) => w.name === "nvfp4_status")?.value, red: !!backend.bgcolor };
  }
  combo.value = "dequant";
  combo.callback?.("dequant");
  const done = new Promise((resolve) => {
    api.addEventListener("execution_success", (e) => resolve({ ok: true, detail: e.detail }));
    api.addEventListener("execution_error", (e) => resolve({ ok: false, detail: e.detail }));
  });
  const summary = new Promise((resolve) => api.addEventListener("nvfp4.paths", (e) => resolve(e.detail)));
  await app.queuePrompt(0, 1);
  const outcome = await Promise.race([done, new Promise((r) => setTimeout(() => r({ ok: false, detail: "timeout" }), 300000))]);
  const paths = await Promise.race([summary, new Promise((r) => setTimeout(() => r(null), 5000))]);
  await new Promise((r) => setTimeout(r, 300));
  return {
    registered: registered.filter((t) => t.startsWith("NVFP4")),
    options, warned, outcome, paths,
    status_after: backend.widgets.find((w) => w.name === "nvfp4_status")?.value,
  };
}, apiPrompt);
await page.keyboard.press("Escape"); // the first-run templates dialog covers the graph
await page.waitForTimeout(500);
await page.screenshot({ path: `${outDir}/ui.png` });
result.page_errors = errors;
console.log(JSON.stringify(result));
await browser.close();
