// klein-agent's MCP App view: plain JavaScript, no SDK (the protocol is a few JSON-RPC messages over postMessage,
// SEP-1865). Pictures arrive as data: URIs from tool results or the app-only tool app_image: the sandbox's CSP
// allows nothing else, and the view needs no network.
"use strict";

const $ = (id) => document.getElementById(id);
const PROTOCOL = "2026-01-26";
const TOKEN_PX = Number("{{SIZE_MULTIPLE}}");  // the model repaints whole tokens: the brush is measured in them
const pending = new Map();
let nextId = 1;
let host = {};               // hostCapabilities from ui/initialize
const images = new Map();    // image_id -> {id, uri (data:), width, height, parents, tool, prompt, seed, standing, rerun}
let order = [];              // the strip: this result's pictures, then what the view made
let current = null;          // the picture shown (A)
let other = null;            // B in compare
let mode = "view";           // view | compare | paint
let compareMode = "side";
let blinkTimer = null;
let busy = false;

// -- JSON-RPC over postMessage, to the host only ------------------------------------------------------------
function send(message) { window.parent.postMessage({ jsonrpc: "2.0", ...message }, "*"); }
function request(method, params) {
  const id = nextId++;
  send({ id, method, params });
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
}
function notify(method, params) { send({ method, params }); }

window.addEventListener("message", (event) => {
  if (event.source !== window.parent) return;
  const m = event.data;
  if (!m || m.jsonrpc !== "2.0") return;
  if (m.method === undefined && pending.has(m.id)) {
    const { resolve, reject } = pending.get(m.id);
    pending.delete(m.id);
    if (m.error) reject(new Error(m.error.message || "the host refused the request"));
    else resolve(m.result);
    return;
  }
  if (m.id !== undefined && m.method) {  // a request from the host: answer it
    if (m.method === "ui/resource-teardown") stopBlink();
    send({ id: m.id, result: {} });
    return;
  }
  if (m.method === "ui/notifications/tool-result") showResult(m.params || {});
  else if (m.method === "ui/notifications/host-context-changed") applyContext(m.params || {});
  else if (m.method === "ui/notifications/tool-cancelled") say("the call was cancelled", true);
});

function applyContext(ctx) {
  if (ctx.theme) document.documentElement.dataset.theme = ctx.theme;
  const vars = ctx.styles && ctx.styles.variables;
  if (vars) for (const [k, v] of Object.entries(vars)) if (v) document.documentElement.style.setProperty(k, v);
}

async function callTool(name, args) {
  const result = await request("tools/call", { name, arguments: args });
  if (result.isError) {
    const text = (result.content || []).filter((c) => c.type === "text").map((c) => c.text).join(" ");
    throw new Error(text || `${name} failed`);
  }
  return result;
}

function say(text, error = false) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", error);
}

// -- pictures ------------------------------------------------------------------------------------------------
function dataUri(block) { return `data:${block.mimeType};base64,${block.data}`; }
function firstImage(result) { return (result.content || []).find((c) => c.type === "image"); }

async function fetchImage(id) {
  const result = await callTool("app_image", { image_id: id });
  const block = firstImage(result);
  const info = { ...result.structuredContent, id, uri: block ? dataUri(block) : "" };
  images.set(id, info);
  return info;
}

async function ensure(id) { return images.get(id) && images.get(id).tool !== undefined ? images.get(id) : fetchImage(id); }

// A tool result: the image tools' {images:[...]}, view_image's {images:[...]}, compare_images' {a, b}.
async function showResult(result) {
  const sc = result.structuredContent || {};
  if (result.isError) { say(textOf(result) || "the call failed", true); return; }
  let ids = [];
  if (Array.isArray(sc.images)) ids = sc.images.map((i) => i.image_id);
  else if (sc.a && sc.b) ids = [sc.b, sc.a];
  if (!ids.length) { say("no pictures in this result"); return; }
  const block = firstImage(result);
  if (block && ids.length === 1 && !sc.a) {  // the preview is that picture: show it before asking for more
    images.set(ids[0], { id: ids[0], uri: dataUri(block), width: sc.images[0].width, height: sc.images[0].height });
  }
  for (const id of ids) if (!order.includes(id)) order.push(id);
  current = ids[0];
  if (sc.a && sc.b) { other = sc.a; mode = "compare"; }
  render();
  say(`${ids.length} picture${ids.length > 1 ? "s" : ""}`);
  try {
    await Promise.all(ids.map(fetchImage));
    await lineage(current);
    render();
  } catch (err) { say(err.message, true); }
}

function textOf(result) { return (result.content || []).filter((c) => c.type === "text").map((c) => c.text).join(" "); }

async function lineage(id) {
  const info = images.get(id);
  for (const p of (info && info.parents) || []) if (!images.has(p) || images.get(p).tool === undefined) {
    try { await fetchImage(p); } catch { /* a parent evicted from the store: the id is still shown */ }
  }
}

// -- rendering -----------------------------------------------------------------------------------------------
function badge(standing) {
  if (!standing) return null;
  const b = document.createElement("span");
  b.className = `badge ${standing}`;
  b.textContent = standing === "pick" ? "✓" : "✕";
  b.title = standing;
  return b;
}

function render() {
  const strip = $("strip");
  strip.replaceChildren();
  for (const id of order) {
    const info = images.get(id) || {};
    const b = document.createElement("button");
    b.type = "button";
    b.title = id;
    b.setAttribute("aria-label", `show ${id}`);
    b.setAttribute("aria-current", String(id === current));
    const img = document.createElement("img");
    if (info.uri) img.src = info.uri;
    img.alt = id;
    b.append(img);
    const mark = badge(info.standing);
    if (mark) b.append(mark);
    b.onclick = () => select(id);
    strip.append(b);
  }
  strip.hidden = order.length < 2;
  const info = images.get(current) || {};
  $("main-img").src = info.uri || "";
  $("main-img").alt = current || "";
  $("main-img").dataset.id = current || "";
  const made = info.tool ? `${info.tool}${info.seed != null ? `, seed ${info.seed}` : ""}` : "";
  $("about").textContent = current
    ? `${current} · ${info.width || "?"}×${info.height || "?"}${made ? ` · ${made}` : ""}${info.prompt ? ` · “${info.prompt}”` : ""}`
    : "";
  renderLineage(info);
  $("pick").classList.toggle("on", info.standing === "pick");
  $("reject").classList.toggle("on", info.standing === "reject");
  $("pick").setAttribute("aria-pressed", String(info.standing === "pick"));
  $("reject").setAttribute("aria-pressed", String(info.standing === "reject"));
  for (const id of ["pick", "reject", "compare-btn", "paint-btn"]) $(id).disabled = busy || !current;
  $("vary").disabled = busy || !info.rerun;
  $("repaint").disabled = busy;
  renderMode();
}

function renderLineage(info) {
  const line = $("lineage");
  line.replaceChildren();
  const parents = info.parents || [];
  if (!parents.length) return;
  line.append("made from ");
  for (const p of parents) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = p;
    b.title = `show ${p}`;
    b.onclick = () => { if (!order.includes(p)) order.push(p); select(p); };
    line.append(b, " ");
  }
}

async function select(id) {
  current = id;
  if (mode === "compare" && other === id) other = null;
  render();
  try { await ensure(id); await lineage(id); render(); } catch (err) { say(err.message, true); }
}

function candidatesForB() {
  const info = images.get(current) || {};
  const ids = [...(info.parents || []), ...order];
  return [...new Set(ids)].filter((id) => id !== current && images.get(id) && images.get(id).uri);
}

function renderMode() {
  const comparing = mode === "compare", painting = mode === "paint";
  $("single").hidden = comparing || painting;
  $("compare").hidden = !comparing;
  $("paint").hidden = !painting;
  $("compare-tools").hidden = !comparing;
  $("paint-tools").hidden = !painting;
  $("compare-btn").setAttribute("aria-pressed", String(comparing));
  $("paint-btn").setAttribute("aria-pressed", String(painting));
  if (comparing) renderCompare();
  else stopBlink();
  if (painting) preparePaint();
}

// -- A/B compare: side by side, slider, blink ----------------------------------------------------------------
function renderCompare() {
  const choices = candidatesForB();
  if (!other || !choices.includes(other)) other = choices[0] || null;
  const select = $("b-select");
  select.replaceChildren(...choices.map((id) => new Option(id, id, false, id === other)));
  const a = (images.get(current) || {}).uri || "", b = other ? images.get(other).uri : "";
  if (!other) say("nothing to compare with yet: no parent or second picture");
  $("side-a").src = a; $("side-b").src = b;
  $("slide-a").src = a; $("slide-b").src = b;
  for (const btn of document.querySelectorAll(".seg button")) btn.setAttribute("aria-pressed", String(btn.dataset.mode === compareMode));
  $("side").hidden = compareMode !== "side";
  $("slider").hidden = compareMode !== "slider";
  $("blink").hidden = compareMode !== "blink";
  $("slide-range").hidden = compareMode !== "slider";
  slide();
  if (compareMode === "blink") startBlink(a, b); else stopBlink();
}

function slide() {  // A on top, clipped at the slider: left of the line is A, right is B
  const x = Number($("slide-range").value);
  $("slide-a").style.clipPath = `inset(0 ${100 - x}% 0 0)`;
  $("slide-line").style.left = `${x}%`;
}

function startBlink(a, b) {
  stopBlink();
  let showA = true;
  const flip = () => { $("blink-img").src = showA ? a : b; $("blink-label").textContent = showA ? "A" : "B"; showA = !showA; };
  flip();
  blinkTimer = setInterval(flip, 600);
}
function stopBlink() { if (blinkTimer) clearInterval(blinkTimer); blinkTimer = null; }

// -- mask painting: white on black at the picture's own size, sent to inpaint as a PNG data: URI -------------
const mask = document.createElement("canvas");
let painted = false;

function preparePaint() {
  const info = images.get(current) || {};
  $("paint-img").src = info.uri || "";
  const canvas = $("paint-canvas");
  const w = info.width || 512, h = info.height || 512;
  if (canvas.width !== w || canvas.height !== h || canvas.dataset.id !== current) {
    canvas.width = mask.width = w;
    canvas.height = mask.height = h;
    canvas.dataset.id = current;
    clearMask();
  }
  if (!$("paint-prompt").value && info.prompt) $("paint-prompt").value = info.prompt;
}

function clearMask() {
  const m = mask.getContext("2d");
  m.fillStyle = "#000";
  m.fillRect(0, 0, mask.width, mask.height);
  const c = $("paint-canvas");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  painted = false;
}

function dab(event) {
  const canvas = $("paint-canvas");
  const r = canvas.getBoundingClientRect();
  const x = ((event.clientX - r.left) / r.width) * canvas.width;
  const y = ((event.clientY - r.top) / r.height) * canvas.height;
  const radius = (Number($("brush").value) * TOKEN_PX) / 2;  // a narrower stroke would cover no token
  for (const [ctx, colour] of [[canvas.getContext("2d"), "#ff3b30"], [mask.getContext("2d"), "#fff"]]) {
    ctx.fillStyle = colour;
    ctx.beginPath();
    ctx.arc(x, y, radius, 0, 2 * Math.PI);
    ctx.fill();
  }
  painted = true;
}

let drawing = false;
$("paint-canvas").addEventListener("pointerdown", (e) => { drawing = true; e.target.setPointerCapture(e.pointerId); dab(e); });
$("paint-canvas").addEventListener("pointermove", (e) => { if (drawing) dab(e); });
for (const type of ["pointerup", "pointercancel"]) $("paint-canvas").addEventListener(type, () => { drawing = false; });
$("clear").onclick = clearMask;

$("repaint").onclick = async () => {
  const prompt = $("paint-prompt").value.trim();
  if (!painted) { say("paint the region to repaint first", true); return; }
  if (!prompt) { say("say what the painted region should show", true); return; }
  await make("inpaint", { image: current, prompt, mask: mask.toDataURL("image/png") }, "repainting the region…");
};

// -- actions -------------------------------------------------------------------------------------------------
async function make(tool, args, doing) {
  busy = true; render(); say(doing);
  try {
    const result = await callTool(tool, args);
    const made = (result.structuredContent.images || []).map((i) => i.image_id);
    for (const id of made) if (!order.includes(id)) order.push(id);
    await Promise.all(made.map(fetchImage));
    if (made.length) { current = made[0]; mode = "view"; }
    say(`${tool}: made ${made.join(", ")}`);
  } catch (err) { say(err.message, true); }
  busy = false; render();
}

$("vary").onclick = () => {
  const info = images.get(current);
  if (!info || !info.rerun) return;
  const args = { ...info.rerun.arguments, seed: Math.floor(Math.random() * 2 ** 31), num_images: 1 };
  make(info.rerun.name, args, `new seed ${args.seed}…`);
};

async function verdict(kind) {
  const id = current;
  busy = true; render();
  try {
    const result = await callTool("app_verdict", { image_id: id, verdict: kind, reason: "the person's choice in the view" });
    const info = images.get(id);
    info.standing = result.structuredContent.standing;
    say(`${kind === "pick" ? "picked" : "rejected"} ${id}`);
    if (host.updateModelContext) {  // the agent learns it on its next turn
      await request("ui/update-model-context", {
        content: [{ type: "text", text: `The person ${kind === "pick" ? "picked" : "rejected"} ${id} in the image view.` }],
        structuredContent: { image_id: id, verdict: kind },
      });
    }
  } catch (err) { say(err.message, true); }
  busy = false; render();
}
$("pick").onclick = () => verdict("pick");
$("reject").onclick = () => verdict("reject");

$("compare-btn").onclick = () => { mode = mode === "compare" ? "view" : "compare"; render(); };
$("paint-btn").onclick = () => { mode = mode === "paint" ? "view" : "paint"; render(); };
$("b-select").onchange = (e) => { other = e.target.value; renderCompare(); };
$("slide-range").oninput = slide;
for (const btn of document.querySelectorAll(".seg button")) btn.onclick = () => { compareMode = btn.dataset.mode; renderCompare(); };

// -- start: initialize, then tell the host our size as it changes ---------------------------------------------
(async () => {
  try {
    const init = await request("ui/initialize", {
      protocolVersion: PROTOCOL,
      appInfo: { name: "klein-agent-view", version: "1" },
      appCapabilities: {},
    });
    host = init.hostCapabilities || {};
    applyContext(init.hostContext || {});
    notify("ui/notifications/initialized", {});
  } catch (err) { say(`the host did not start the view: ${err.message}`, true); }
  const report = () => notify("ui/notifications/size-changed", {
    width: Math.ceil(document.documentElement.scrollWidth), height: Math.ceil(document.documentElement.scrollHeight),
  });
  new ResizeObserver(report).observe(document.body);
  render();
})();
