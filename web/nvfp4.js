// ComfyUI-NVFP4 frontend: shows which GEMM backends this server's GPU can run (marking the
// others with the reason) and, after sampling, which path every NVFP4 layer took.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "NVFP4Backend";
let backendInfo = null; // {device, backends: [{name, label, available, reason}]}

async function loadBackends() {
  if (backendInfo) return backendInfo;
  try {
    const res = await api.fetchApi("/nvfp4/backends");
    backendInfo = await res.json();
  } catch (e) {
    backendInfo = { device: "unknown", backends: [], error: String(e) };
  }
  return backendInfo;
}

function statusWidget(node) {
  let w = node.widgets?.find((x) => x.name === "nvfp4_status");
  if (!w) {
    w = node.addWidget("text", "nvfp4_status", "", () => {}, { serialize: false });
    w.serialize = false; // never sent with the prompt
  }
  return w;
}

function describe(info, selected) {
  if (!info) return "";
  const avail = info.backends.filter((b) => b.available).map((b) => b.name);
  const missing = info.backends.filter((b) => !b.available);
  const chosen = info.backends.find((b) => b.name === selected);
  let text = `${info.device}: available ${avail.join(", ") || "none"}`;
  if (chosen && !chosen.available) text = `⚠ ${selected} unavailable: ${chosen.reason} | ` + text;
  if (missing.length) text += ` | unavailable: ${missing.map((b) => `${b.name} (${b.reason})`).join("; ")}`;
  return text;
}

function refresh(node) {
  const combo = node.widgets?.find((w) => w.name === "backend");
  if (!combo || !backendInfo) return;
  const chosen = backendInfo.backends.find((b) => b.name === combo.value);
  const bad = chosen && !chosen.available;
  node.nvfp4Unavailable = bad;
  node.bgcolor = bad ? "#5a2a2a" : undefined;
  if (!node.nvfp4Summary) statusWidget(node).value = describe(backendInfo, combo.value);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "comfyui_nvfp4.backend",
  async setup() {
    await loadBackends();
    api.addEventListener("nvfp4.paths", ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail.node));
      if (!node) return;
      node.nvfp4Summary = detail.text;
      statusWidget(node).value = detail.text;
      node.setDirtyCanvas?.(true, true);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      const combo = this.widgets?.find((w) => w.name === "backend");
      if (combo) {
        const cb = combo.callback;
        combo.callback = (...args) => {
          this.nvfp4Summary = null;
          refresh(this);
          return cb?.apply(combo, args);
        };
      }
      statusWidget(this);
      loadBackends().then(() => refresh(this));
      return r;
    };
    const configured = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = configured?.apply(this, arguments);
      loadBackends().then(() => refresh(this));
      return r;
    };
  },
});
