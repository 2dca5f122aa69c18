"use strict";
// The bagel-serve playground: one page over this server's OpenAI-compatible API. URLs are relative (the page
// works behind a path prefix too); nothing is fetched from anywhere else; no build step, no dependencies.
// The controls' defaults and bounds come from GET v1/defaults, so they are always this server's.

const KEY_STORAGE = "bagel-serve-api-key";
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
let DEFAULTS = null;

// Each control: the API field it sets, its label, its kind, and `when` it applies (a control that does not
// apply is disabled and not sent, so the server never sees a field it would ignore).
const IMAGE_CONTROLS = [
  {group: "Image"},
  {name: "size", label: "Size", type: "text", help: "WxH, multiples of 16, or auto"},
  {name: "n", label: "Images", type: "int", min: 1, max: "max_n"},
  {name: "num_inference_steps", label: "Steps", type: "int", min: 2, max: "max_steps"},
  {name: "seed", label: "Seed", type: "seed", help: "empty: random (reported); image i gets seed + i"},
  {name: "timestep_shift", label: "Timestep shift", type: "float", min: 0},
  {name: "output_format", label: "Format", type: "select", options: "output_formats"},
  {group: "Guidance (CFG)"},
  {name: "cfg_text_scale", label: "Text scale", type: "float", min: 0, help: "≤ 1 turns it off"},
  {name: "cfg_img_scale", label: "Image scale", type: "float", min: 0, help: "≤ 1 turns it off"},
  {name: "cfg_interval", label: "Interval", type: "pair", min: 0, max: 1, help: "guidance where low < t ≤ high"},
  {name: "cfg_renorm_type", label: "Renorm type", type: "select", options: "cfg_renorm_types"},
  {name: "cfg_renorm_min", label: "Renorm min", type: "float", min: 0, max: 1},
  {name: "negative_prompt", label: "Negative prompt", type: "text", wide: true, help: "text of the text-dropped CFG context"},
  {name: "enable_taylorseer", label: "TaylorSeer step caching", type: "bool", help: "faster, not the exact image"},
  {group: "Think"},
  {name: "think", label: "Plan first (think)", type: "bool"},
  {name: "max_think_tokens", label: "Max think tokens", type: "int", min: 1, when: (v) => v.think},
  {name: "temperature", label: "Plan temperature", type: "float", min: 0, max: 2, help: "0: greedy",
   when: (v) => v.think},
];
const TEXT_CONTROLS = [
  {group: "Decoding"},
  {name: "max_tokens", label: "Max tokens", type: "int", min: 1, help: "think included"},
  {name: "temperature", label: "Temperature", type: "float", min: 0, max: 2, help: "0: greedy"},
  {name: "top_p", label: "Top p", type: "float", min: 0, max: 1, when: (v) => v.temperature > 0},
  {name: "top_k", label: "Top k", type: "int", min: 0, help: "0: off", when: (v) => v.temperature > 0},
  {name: "repetition_penalty", label: "Repetition penalty", type: "float", min: 0, help: "1: off"},
  {name: "seed", label: "Seed", type: "seed", help: "empty: random", when: (v) => v.temperature > 0},
  {group: "Think"},
  {name: "think", label: "Reason first (think)", type: "bool", help: "its text is shown apart"},
];

// ---------------------------------------------------------------------------------------------- the API
class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.error = error;
  }
}

function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? {...extra, Authorization: `Bearer ${key}`} : extra;
}

// fetch with the key; an error answer becomes an ApiError (a 401 also says so at the top of the page).
async function api(path, options = {}) {
  let resp;
  try {
    resp = await fetch(path, {...options, headers: authHeaders(options.headers)});
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, {message: `could not reach the server (${e.message})`});
  }
  if (!resp.ok) {
    let body = null;
    try { body = await resp.json(); } catch (_) { /* not JSON: the status says it */ }
    const error = (body && body.error) || {message: `${resp.status} ${resp.statusText}`};
    if (resp.status === 401) needKey(error);
    throw new ApiError(resp.status, error);
  }
  keyAccepted();
  return resp;
}

// The data of each server-sent event of a streamed answer, up to [DONE].
async function* sseData(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += decoder.decode(value, {stream: true});
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, at);
      buf = buf.slice(at + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield parseExact(data);
    }
  }
}

// JSON with a `seed` kept as its exact digits (seeds go up to 2**63 - 1, beyond a JS number's precision).
function parseExact(text) {
  const obj = JSON.parse(text);
  const m = /"seed":\s*(\d+)/.exec(text);
  if (m && obj && typeof obj === "object" && "seed" in obj) obj.seed = m[1];
  return obj;
}
function stringifyExact(obj) {
  return JSON.stringify(obj).replace(/"seed":"(\d+)"/g, '"seed":$1');
}

// ---------------------------------------------------------------------------------------------- the key
function needKey(error) {
  const has = Boolean(sessionStorage.getItem(KEY_STORAGE));
  banner(`${has ? "The API key was refused" : "This server needs an API key"} (401: ${error.message}). ` +
         "Enter the server's key in the “API key” field at the top and press Use; it is kept in this tab's " +
         "session storage only.");
  $("#api-key").classList.add("invalid");
  $("#api-key").focus();
}
function keyAccepted() {
  $("#api-key").classList.remove("invalid");
  if ($("#banner").dataset.kind === "key") banner(null);
}
function banner(text, kind = "key") {
  const el = $("#banner");
  el.hidden = !text;
  el.textContent = text || "";
  el.dataset.kind = text ? kind : "";
}

// ---------------------------------------------------------------------------------------------- controls
function controlsOf(form) {
  return form.dataset.kind === "image" ? IMAGE_CONTROLS : TEXT_CONTROLS;
}

function buildControls(form) {
  const defaults = DEFAULTS[form.dataset.defaults];
  const limits = DEFAULTS.limits;
  const box = $(".fields", form);
  box.replaceChildren();
  let group = null;
  for (const c of controlsOf(form)) {
    if (c.group) {
      group = document.createElement("fieldset");
      const legend = document.createElement("legend");
      legend.textContent = c.group;
      group.append(legend);
      box.append(group);
      continue;
    }
    const field = document.createElement("label");
    field.className = `field${c.wide ? " wide" : ""}${c.type === "bool" ? " check" : ""}`;
    field.dataset.control = c.name;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = c.label;
    const inputs = makeInputs(c, limits);
    if (c.type === "bool") field.append(...inputs, name);
    else if (c.type === "pair") {
      const pair = el("span", "pair");
      pair.append(...inputs);
      field.append(name, pair);
    } else field.append(name, ...inputs);
    const help = document.createElement("small");
    help.textContent = `default ${show(defaults[c.name])}${c.help ? ` · ${c.help}` : ""}`;
    field.append(help);
    group.append(field);
  }
  resetControls(form);
}

function makeInputs(c, limits) {
  const bound = (v) => (typeof v === "string" ? limits[v] : v);
  const number = (step) => {
    const el = document.createElement("input");
    el.type = "number";
    el.step = step;
    if (c.min !== undefined) el.min = c.min;
    if (c.max !== undefined) el.max = bound(c.max);
    return el;
  };
  let els;
  if (c.type === "int") els = [number("1")];
  else if (c.type === "float") els = [number("any")];
  else if (c.type === "pair") els = [number("any"), number("any")];
  else if (c.type === "bool") {
    els = [document.createElement("input")];
    els[0].type = "checkbox";
  } else if (c.type === "select") {
    const sel = document.createElement("select");
    for (const o of limits[c.options]) sel.append(new Option(o, o));
    els = [sel];
  } else {
    els = [document.createElement("input")];
    els[0].type = "text";
    if (c.type === "seed") {
      els[0].inputMode = "numeric";
      els[0].pattern = "[0-9]*";
      els[0].placeholder = "random";
    }
  }
  els.forEach((el, i) => {
    el.name = c.type === "pair" ? `${c.name}.${i}` : c.name;
    el.dataset.control = c.name;
  });
  return els;
}

function resetControls(form) {
  const defaults = DEFAULTS[form.dataset.defaults];
  for (const c of controlsOf(form)) {
    if (c.group) continue;
    const value = defaults[c.name];
    const els = $$(`[data-control="${c.name}"]:is(input, select)`, form);
    if (c.type === "bool") els[0].checked = Boolean(value);
    else if (c.type === "pair") els.forEach((el, i) => { el.value = value[i]; });
    else els[0].value = value === null || value === undefined ? "" : value;
    els.forEach((el) => el.classList.remove("invalid"));
  }
  applyWhen(form);
}

// The controls' values as the API takes them, before `when` is applied.
function rawValues(form) {
  const out = {};
  for (const c of controlsOf(form)) {
    if (c.group) continue;
    const els = $$(`[data-control="${c.name}"]:is(input, select)`, form);
    if (c.type === "bool") out[c.name] = els[0].checked;
    else if (c.type === "int" || c.type === "float") out[c.name] = els[0].value === "" ? null : Number(els[0].value);
    else if (c.type === "pair") out[c.name] = els.map((el) => Number(el.value));
    else out[c.name] = els[0].value.trim() === "" ? null : els[0].value.trim();
  }
  return out;
}

function applyWhen(form) {
  const raw = rawValues(form);
  for (const c of controlsOf(form)) {
    if (c.group || !c.when) continue;
    const on = Boolean(c.when(raw));
    $$(`[data-control="${c.name}"]:is(input, select)`, form).forEach((el) => { el.disabled = !on; });
    $(`label[data-control="${c.name}"]`, form).classList.toggle("off", !on);
  }
}

// The fields to send: every control that applies and has a value.
function values(form) {
  const raw = rawValues(form);
  const out = {};
  for (const c of controlsOf(form)) {
    if (c.group || (c.when && !c.when(raw)) || raw[c.name] === null) continue;
    out[c.name] = raw[c.name];
  }
  return out;
}

function markInvalid(form, param) {
  if (!form || !param) return;
  $$(`[data-control="${param}"]:is(input, select)`, form).forEach((el) => el.classList.add("invalid"));
}

function show(v) {
  if (v === null || v === undefined || v === "") return "none";
  if (Array.isArray(v)) return v.join(", ");
  return String(v);
}

// ---------------------------------------------------------------------------------------------- results
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function paramsList(params) {
  const dl = el("dl", "params");
  for (const [k, v] of Object.entries(params)) {
    dl.append(el("dt", null, k), el("dd", null, show(v)));
  }
  return dl;
}

function downloadLink(href, filename, label = "Download") {
  const a = el("a", "download", label);
  a.href = href;
  a.download = filename;
  return a;
}

function errorText(e) {
  if (!(e instanceof ApiError)) return `Error: ${e.message}`;
  const what = [e.status ? `HTTP ${e.status}` : null, e.error.code, e.error.param ? `field ${e.error.param}` : null];
  const said = what.filter(Boolean).join(", ");
  return `Error${said ? ` (${said})` : ""}: ${e.error.message}`;
}

// One running request per tab: its run/stop buttons and status line.
class Run {
  constructor(panel) {
    this.panel = panel;
    this.status = $(".status", panel);
    this.controller = new AbortController();
    this.t0 = performance.now();
    $$(".run", panel).forEach((b) => { b.disabled = true; });
    $$(".stop", panel).forEach((b) => {
      b.hidden = false;
      b.onclick = () => this.controller.abort();
    });
    this.say("Running…");
  }
  get seconds() { return ((performance.now() - this.t0) / 1000).toFixed(1); }
  say(text) { this.status.textContent = text; }
  end(text) {
    $$(".run", this.panel).forEach((b) => { b.disabled = false; });
    $$(".stop", this.panel).forEach((b) => { b.hidden = true; });
    this.say(text);
  }
  fail(e, form, card) {
    if (e.name === "AbortError") return this.end(`Stopped after ${this.seconds} s.`);
    if (card) card.append(el("p", "error", errorText(e)));
    if (e instanceof ApiError) markInvalid(form, e.error.param);
    this.end(errorText(e));
  }
}

// ---------------------------------------------------------------------------------------------- images
async function runImage(form) {
  const panel = form.closest(".panel");
  const editing = form.id === "form-img2img";
  const prompt = form.elements.prompt.value;
  const fields = values(form);
  const run = new Run(panel);
  $$(".invalid", form).forEach((e) => e.classList.remove("invalid"));
  const card = el("article", "card");
  const slots = el("div", "slots");
  const n = fields.n || 1;
  const slot = [];
  for (let i = 0; i < n; i++) {
    const s = el("figure", "slot");
    const bar = el("div", "bar");
    bar.append(el("i"));
    s.append(bar, el("figcaption", "step", "waiting…"));
    const think = el("pre", "think-text");
    think.hidden = true;
    s.append(think);
    slots.append(s);
    slot.push(s);
  }
  const params = {prompt, ...fields};
  let response;
  if (editing) {
    const file = form.elements.image.files[0];
    params.image = file.name;
    const body = new FormData();
    body.append("image", file, file.name);
    body.append("prompt", prompt);
    for (const [k, v] of Object.entries(fields)) body.append(k, Array.isArray(v) ? v.join(",") : String(v));
    body.append("stream", "true");
    response = () => api("v1/images/edits", {method: "POST", body, signal: run.controller.signal});
  } else {
    const body = stringifyExact({prompt, ...fields, stream: true, response_format: "b64_json"});
    response = () => api("v1/images/generations", {method: "POST", body, signal: run.controller.signal,
                                                   headers: {"Content-Type": "application/json"}});
  }
  card.append(slots, paramsList(params));
  $(".results", panel).prepend(card);
  let done = 0;
  let failed = null;
  try {
    for await (const ev of sseData(await response())) {
      if (ev.error) {
        failed = new ApiError(0, ev.error);
        card.append(el("p", "error", errorText(failed)));
        continue;
      }
      const s = slot[ev.index || 0];
      if (ev.type === "image_generation.think_delta") {
        const think = $(".think-text", s);
        think.hidden = false;
        think.textContent += ev.delta;
      } else if (ev.type === "image_generation.progress") {
        $(".bar i", s).style.width = `${(100 * ev.step) / ev.total_steps}%`;
        $(".step", s).textContent = `step ${ev.step} / ${ev.total_steps}`;
        run.say(`Denoising: step ${ev.step} / ${ev.total_steps} (${run.seconds} s)`);
      } else if (ev.type === "image_generation.completed") {
        done += 1;
        showImage(s, ev, run.seconds);
      }
    }
    if (failed) throw failed;
    run.end(`${done} image${done === 1 ? "" : "s"} in ${run.seconds} s.`);
  } catch (e) {
    $$(".slot", card).filter((s) => !$("img", s)).forEach((s) => s.remove());  // the images that never came
    run.fail(e, form, failed ? null : card);
  }
}

function showImage(slot, ev, seconds) {
  const fmt = ev.output_format || "png";
  const src = `data:image/${fmt};base64,${ev.b64_json}`;
  const img = el("img", "result-image");
  img.src = src;
  img.alt = ev.revised_prompt || "generated image";
  $(".bar", slot).remove();
  const caption = $(".step", slot);
  caption.replaceChildren(el("span", null, `seed ${ev.seed} · ${seconds} s `), downloadLink(src, `bagel-${ev.seed}.${fmt}`));
  img.addEventListener("load", () => {
    caption.prepend(el("span", null, `${img.naturalWidth}x${img.naturalHeight} · `));
  }, {once: true});
  slot.prepend(img);
}

// ---------------------------------------------------------------------------------------------- text
// Streams one chat completion into `target` ({think, answer} elements); returns the answer and its ending.
async function streamChat(messages, fields, target, run) {
  const body = stringifyExact({messages, ...fields, stream: true, stream_options: {include_usage: true}});
  const resp = await api("v1/chat/completions", {method: "POST", body, signal: run.controller.signal,
                                                 headers: {"Content-Type": "application/json"}});
  const out = {think: "", answer: "", finish: null, usage: null};
  for await (const ev of sseData(resp)) {
    if (ev.error) throw new ApiError(0, ev.error);
    if (ev.usage) out.usage = ev.usage;
    const choice = (ev.choices || [])[0];
    if (!choice) continue;
    const delta = choice.delta || {};
    if (delta.reasoning_content) {
      out.think += delta.reasoning_content;
      target.thinkBox.hidden = false;
      target.think.append(delta.reasoning_content);
    }
    if (typeof delta.content === "string" && delta.content) {
      out.answer += delta.content;
      target.answer.append(delta.content);
      run.say(`Streaming… ${out.answer.length} characters (${run.seconds} s)`);
    }
    if (choice.finish_reason) out.finish = choice.finish_reason;
  }
  return out;
}

function textTarget() {
  const thinkBox = el("details", "think");
  thinkBox.open = true;
  thinkBox.hidden = true;
  thinkBox.append(el("summary", null, "Thinking"));
  const think = el("pre", "think-text");
  thinkBox.append(think);
  return {thinkBox, think, answer: el("div", "answer")};
}

function textFile(out) {
  const text = (out.think ? `[thinking]\n${out.think}\n\n[answer]\n` : "") + out.answer;
  return URL.createObjectURL(new Blob([text], {type: "text/plain"}));
}

function endNote(out, seconds) {
  const parts = [`${seconds} s`];
  if (out.finish) parts.push(`finish: ${out.finish}`);
  if (out.usage) parts.push(`${out.usage.prompt_tokens} prompt + ${out.usage.completion_tokens} completion tokens`);
  return parts.join(" · ");
}

async function runImageToText(form) {
  const panel = form.closest(".panel");
  const file = form.elements.image.files[0];
  const prompt = form.elements.prompt.value;
  const fields = values(form);
  const run = new Run(panel);
  $$(".invalid", form).forEach((e) => e.classList.remove("invalid"));
  const card = el("article", "card");
  const target = textTarget();
  const thumb = el("img", "thumb");
  card.append(thumb, target.thinkBox, target.answer, paramsList({prompt, image: file.name, ...fields}));
  $(".results", panel).prepend(card);
  try {
    const url = await dataUrl(file);
    thumb.src = url;
    const messages = [{role: "user", content: [{type: "image_url", image_url: {url}}, {type: "text", text: prompt}]}];
    const out = await streamChat(messages, fields, target, run);
    card.append(el("p", "meta", endNote(out, run.seconds)), downloadLink(textFile(out), "bagel-answer.txt"));
    run.end(`Answered in ${run.seconds} s.`);
  } catch (e) {
    run.fail(e, form, card);
  }
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

// ---------------------------------------------------------------------------------------------- chat
const chat = {history: []};

async function sendChat() {
  const form = $("#form-chat");
  const input = $("#chat-input");
  const text = input.value.trim();
  if (!text || !DEFAULTS) return;
  const panel = form.closest(".panel");
  const fields = values(form);
  const system = form.elements.system.value.trim();
  chat.history.push({role: "user", content: text});
  input.value = "";
  const messages = (system ? [{role: "system", content: system}] : []).concat(chat.history);
  const box = $(".messages", panel);
  box.append(el("div", "message user", text));
  const msg = el("div", "message assistant");
  const target = textTarget();
  msg.append(target.thinkBox, target.answer);
  box.append(msg);
  msg.scrollIntoView({block: "end"});
  const run = new Run(panel);
  $$(".invalid", form).forEach((e) => e.classList.remove("invalid"));
  try {
    const out = await streamChat(messages, fields, target, run);
    chat.history.push({role: "assistant", content: out.answer});
    const meta = el("details", "meta");
    meta.append(el("summary", null, endNote(out, run.seconds)), paramsList(fields),
                downloadLink(textFile(out), "bagel-chat.txt"));
    msg.append(meta);
    run.end(`Answered in ${run.seconds} s.`);
  } catch (e) {
    chat.history.pop();
    run.fail(e, form, msg);
  }
}

// ---------------------------------------------------------------------------------------------- the page
async function loadDefaults() {
  try {
    DEFAULTS = await (await api("v1/defaults")).json();
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) banner(`The server's defaults could not be loaded: ${errorText(e)}`, "load");
    return;
  }
  if ($("#banner").dataset.kind === "load") banner(null);
  $("#model").textContent = DEFAULTS.model;
  const notice = $("#notice");
  notice.hidden = !DEFAULTS.notice;
  notice.textContent = DEFAULTS.notice || "";
  for (const form of $$("form.controls")) buildControls(form);
  $$(".run").forEach((b) => { b.disabled = false; });
  document.body.dataset.ready = "true";
}

function selectTab(name) {
  const tabs = $$("[role=tab]");
  if (!tabs.some((t) => t.dataset.tab === name)) name = "text2img";
  for (const t of tabs) {
    const on = t.dataset.tab === name;
    t.setAttribute("aria-selected", String(on));
    $(`#tab-${t.dataset.tab}`).hidden = !on;
  }
}

function init() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = key.value.trim();
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
    loadDefaults();
  });
  for (const t of $$("[role=tab]")) {
    t.addEventListener("click", () => { history.replaceState(null, "", `#${t.dataset.tab}`); selectTab(t.dataset.tab); });
  }
  selectTab(location.hash.slice(1));
  $("#form-text2img").addEventListener("submit", (e) => { e.preventDefault(); runImage(e.target); });
  $("#form-img2img").addEventListener("submit", (e) => { e.preventDefault(); runImage(e.target); });
  $("#form-img2text").addEventListener("submit", (e) => { e.preventDefault(); runImageToText(e.target); });
  $("#form-chat").addEventListener("submit", (e) => e.preventDefault());
  $("#chat-send").addEventListener("submit", (e) => { e.preventDefault(); sendChat(); });
  $("#chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      if (!$("#chat-send .run").disabled) sendChat();
    }
  });
  $(".clear", $("#form-chat")).addEventListener("click", () => {
    chat.history = [];
    $("#tab-chat .messages").replaceChildren();
  });
  for (const form of $$("form.controls")) form.addEventListener("input", () => { if (DEFAULTS) applyWhen(form); });
  for (const b of $$(".reset")) b.addEventListener("click", () => { if (DEFAULTS) resetControls(b.closest("form")); });
  for (const input of $$("input[type=file]")) {
    input.addEventListener("change", () => {
      const preview = $(".preview", input.closest("form"));
      const file = input.files[0];
      preview.hidden = !file;
      if (file) preview.src = URL.createObjectURL(file);
    });
  }
  loadDefaults();
}

document.addEventListener("DOMContentLoaded", init);
