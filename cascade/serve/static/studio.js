// The cascade studio page: forms -> POST /api/jobs, job updates over Server-Sent Events, the gallery from
// /api/images. Plain DOM, no libraries; every text from the server is set as textContent.
"use strict";

const $ = (sel) => document.querySelector(sel);
const $$ = (sel) => Array.from(document.querySelectorAll(sel));
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
};

const client = (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now());
const RUN_LABELS = {generate: "Generate", vary: "Vary", img2img: "Redraw", interpolate: "Interpolate",
                    textdiff: "Apply text diff", inpaint: "Inpaint"};
const HINTS = {
  generate: "Text to images through every stage up to 'until'.",
  vary: "New images of one image's CLIP embedding: upload one or press 'use as input' in the gallery.",
  img2img: "Redraw an image with a prompt; strength 0 keeps it, 1 ignores it.",
  interpolate: "Frames between two images' embeddings: fill image and image B (upload or 'use as input').",
  textdiff: "Move an image's embedding from one caption towards another, in frames.",
  inpaint: "Repaint part of an image: choose it, paint the mask, write what goes there.",
};
let tab = "generate";
let info = null;
const slots = {image: null, image_b: null};  // gallery items chosen as inputs
let nextSlot = "image";
let galleryVersion = "";
const jobsSeen = new Map();  // job id -> state, to refresh the gallery when one finishes

function showError(message) { $("#form-error").textContent = message || ""; }

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error("the studio's server does not answer (was it stopped?)");
  }
  const body = await response.json().catch(() => ({error: `the server answered ${response.status}`}));
  if (!response.ok) throw new Error(body.error || `the server answered ${response.status}`);
  return body;
}

// ------------------------------------------------------------------ tabs and the form
function selectTab(name) {
  tab = name;
  for (const b of $$("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const node of $$("[data-tabs]")) node.hidden = !node.dataset.tabs.split(" ").includes(name);
  $("#run").textContent = RUN_LABELS[name];
  $("#tab-hint").textContent = HINTS[name];
  showError("");
  nextSlot = "image";
}

function fillStageTable() {
  const tbody = $("#stage-table tbody");
  tbody.replaceChildren();
  for (const [name, s] of Object.entries(info.stages)) {
    const steps = el("input", {type: "number", min: 1, max: 1000, placeholder: s.steps, id: `steps-${name}`});
    const guidance = el("input", {type: "number", min: 0, max: 50, step: 0.5, placeholder: s.guidance,
                                  id: `guidance-${name}`});
    tbody.append(el("tr", {}, el("td", {textContent: name}), el("td", {}, steps), el("td", {}, guidance)));
  }
  for (const name of info.image_stages) $("#until").append(el("option", {value: name, textContent: name}));
  $("#until").value = info.image_stages[info.image_stages.length - 1];
  for (const name of info.samplers) $("#sampler").append(el("option", {value: name, textContent: name}));
  if (!info.text_only) {  // per-object guidance needs a decoder that reads the text itself
    $("#regions-field").dataset.tabs = "";
    $("#regions-field").hidden = true;
  } else {  // and an Imagen-style decoder reads no CLIP image embedding, which these three work on
    $("#regions_share").placeholder = info.region_share;  // the decoder config's
    for (const name of info.embedding_jobs) {
      const button = $(`#tabs button[data-tab='${name}']`);
      button.disabled = true;
      button.title = "needs an unCLIP bundle (CLIP image embeddings); this one is Imagen-style";
    }
  }
}

function showInfo() {
  const stages = Object.entries(info.stages).map(([n, s]) => `${n} (${s.sampler}, ${s.steps} steps)`).join(", ");
  $("#model-line").textContent = `${info.model} · ${info.device} · ${Object.keys(info.stages).join(" → ")}`;
  const dl = $("#model-info");
  dl.replaceChildren();
  for (const [k, v] of [["bundle", info.model], ["device", info.device], ["stages", stages],
                        ["inpainting", info.inpaint === "glide" ? "glide (the decoder was trained for it)" : "replace"],
                        ["uploads", `up to ${info.max_upload_bytes / 2 ** 20} MB, ${info.max_pixels} pixels`]]) {
    dl.append(el("dt", {textContent: k}), el("dd", {textContent: v}));
  }
  if (info.eval) $("#eval").textContent = info.eval;
}

function request() {
  const body = {kind: tab, client, seed: $("#seed").value.trim() || "random", until: $("#until").value,
                sampler: $("#sampler").value, steps: {}, guidance: {}};
  for (const name of Object.keys(info.stages)) {
    const steps = $(`#steps-${name}`).value, guidance = $(`#guidance-${name}`).value;
    if (steps !== "") body.steps[name] = Number(steps);
    if (guidance !== "") body.guidance[name] = Number(guidance);
  }
  const value = (id) => $(`#${id}`).value;
  if (["generate", "img2img", "inpaint"].includes(tab)) body.prompt = value("prompt");
  if (["generate", "vary", "img2img", "inpaint"].includes(tab)) {
    body.negative_prompt = value("negative_prompt");
    body.num_images = value("num_images");
  }
  if (tab !== "generate") body.image = slots.image && slots.image.id;
  if (tab === "interpolate") body.image_b = slots.image_b && slots.image_b.id;
  if (tab === "generate" && info.text_only && value("regions") !== "") {
    body.regions = value("regions");
    if (value("regions_share") !== "") body.regions_share = value("regions_share");
  }
  if (tab === "img2img") body.strength = value("strength");
  if (tab === "interpolate" || tab === "textdiff") body.frames = value("frames");
  if (tab === "textdiff") Object.assign(body, {from: value("from"), to: value("to"), max_theta: value("max_theta")});
  if (tab === "inpaint") Object.assign(body, {method: value("method"), resample: value("resample")});
  return body;
}

async function submit(event) {
  event.preventDefault();
  showError("");
  $("#run").disabled = true;
  try {
    const body = request();
    if (tab === "inpaint") body.mask = await uploadMask();
    await api("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                            body: JSON.stringify(body)});
  } catch (err) {
    showError(err.message);
  } finally {
    $("#run").disabled = false;
  }
}

// ------------------------------------------------------------------ inputs: uploads and "use as input"
async function upload(file, kind = "image") {
  const query = new URLSearchParams({name: file.name || `${kind}.png`, kind});
  return api(`/api/uploads?${query}`, {method: "POST", body: file,
                                       headers: {"Content-Type": file.type || "application/octet-stream"}});
}

function setSlot(name, item) {
  slots[name] = item;
  const img = $(`#slot-${name} img`);
  img.src = item.url;
  img.hidden = false;
  img.title = item.name;
  img.dataset.id = item.id;
  if (name === "image") loadMaskBase(item);
}

function useAsInput(item) {
  if (tab === "generate") selectTab(info.text_only ? "img2img" : "vary");
  let name = "image";
  if (tab === "interpolate") {
    name = nextSlot;
    nextSlot = name === "image" ? "image_b" : "image";
  }
  setSlot(name, item);
  showError("");
}

// ------------------------------------------------------------------ the mask editor
const maskData = document.createElement("canvas");  // black, white strokes: the mask that is uploaded
let last = null;  // the brush's last point while the pointer is down

function loadMaskBase(item) {
  $("#mask-base").src = item.url;
  for (const c of [$("#mask-canvas"), maskData]) { c.width = item.width; c.height = item.height; }
  clearMask();
}

function clearMask() {
  const shown = $("#mask-canvas");
  shown.getContext("2d").clearRect(0, 0, shown.width, shown.height);
  const ctx = maskData.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, maskData.width, maskData.height);
}

function paint(event) {  // a round-ended stroke from the last point, on the shown canvas and the mask
  const canvas = $("#mask-canvas");
  const rect = canvas.getBoundingClientRect();
  const scale = canvas.width / rect.width;
  const point = [(event.clientX - rect.left) * scale, (event.clientY - rect.top) * scale];
  const from = last || point;
  for (const [c, colour] of [[canvas, "#ff2020"], [maskData, "#fff"]]) {
    const ctx = c.getContext("2d");
    Object.assign(ctx, {strokeStyle: colour, lineWidth: Number($("#brush").value) * scale, lineCap: "round",
                        lineJoin: "round"});
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...point);
    ctx.stroke();
  }
  last = point;
}

async function uploadMask() {
  if (!slots.image) throw new Error("inpaint needs an image: upload one or use one from the gallery");
  const blob = await new Promise((resolve) => maskData.toBlob(resolve, "image/png"));
  const item = await upload(new File([blob], "mask.png", {type: "image/png"}), "mask");
  return item.id;
}

function maskCoverage() {  // the fraction of the mask painted white (the browser tests read it)
  const {width, height} = maskData;
  const pixels = maskData.getContext("2d").getImageData(0, 0, width, height).data;
  let white = 0;
  for (let i = 0; i < pixels.length; i += 4) white += pixels[i] > 127 ? 1 : 0;
  return white / (width * height);
}
window.maskCoverage = maskCoverage;

// ------------------------------------------------------------------ jobs
function jobState(job) {
  if (job.state === "queued") return `queued · place ${job.position}`;
  return job.state;
}

function jobItem(job) {  // a job's list entry, made once; renderJobs updates it in place
  const what = job.request.prompt || job.request.to || job.request.source || job.request.image_a || "";
  const li = el("li", {id: job.id},
                el("div", {className: "job-head"}, el("span", {textContent: `${job.kind}${what ? " · " + what : ""}`}),
                   el("span", {className: "job-state"})));
  for (const stage of job.stages) {
    const bar = el("progress", {max: 1, value: 0});
    bar.dataset.stage = stage;
    li.append(el("div", {className: "bar"}, el("span", {textContent: stage}), bar, el("span", {className: "count"})));
  }
  const cancel = el("button", {type: "button", textContent: "cancel", className: "cancel"});
  cancel.addEventListener("click", () => api(`/api/jobs/${job.id}/cancel`, {method: "POST"})
    .catch((err) => showError(err.message)));
  li.append(cancel, el("div", {className: "job-error"}));
  return li;
}

function renderJobs(snapshot) {
  const list = $("#jobs");
  for (const job of snapshot.jobs) {
    let li = document.getElementById(job.id);
    if (!li) {
      li = jobItem(job);
      list.prepend(li);  // newest first
    }
    li.className = `job ${job.state}`;
    li.dataset.state = job.state;
    li.querySelector(".job-state").textContent = jobState(job);
    const active = job.state === "running" || job.state === "queued";
    for (const bar of li.querySelectorAll(".bar")) {
      const [done, total] = job.progress[bar.querySelector("progress").dataset.stage] || [0, 0];
      Object.assign(bar.querySelector("progress"), {max: total || 1, value: done});
      bar.querySelector(".count").textContent = total ? `${done}/${total}` : "";
      bar.hidden = !active;
    }
    li.querySelector(".cancel").hidden = !active;
    li.querySelector(".job-error").textContent = job.error || "";
    if (jobsSeen.get(job.id) !== job.state && job.state === "done") refreshGallery();
    jobsSeen.set(job.id, job.state);
  }
}

function listen() {
  const events = new EventSource(`/api/events?client=${encodeURIComponent(client)}`);
  events.onmessage = (event) => renderJobs(JSON.parse(event.data));
  window.addEventListener("pagehide", () => {
    events.close();
    navigator.sendBeacon(`/api/clients/${encodeURIComponent(client)}/close`);
  });
}

// ------------------------------------------------------------------ the gallery
function settingsList(text) {
  const dl = el("dl", {className: "settings"});
  for (const [k, v] of Object.entries(text)) if (k !== "index") dl.append(el("dt", {textContent: k}), el("dd", {textContent: v}));
  return dl;
}

function card(item, label) {
  const img = el("img", {src: item.url, alt: label || item.name, title: item.name});
  img.dataset.id = item.id;
  const download = el("a", {href: `${item.url}?download=1`, download: item.name, textContent: "download PNG",
                            className: "download"});
  const use = el("button", {type: "button", textContent: "use as input", className: "use"});
  use.addEventListener("click", () => useAsInput(item));
  const node = el("div", {className: "card"}, img, el("div", {className: "label", textContent: label || item.name}),
                  el("div", {className: "actions"}, download, use));
  node.dataset.id = item.id;
  return node;
}

function strip(animation, frames) {
  const big = el("img", {src: frames[0].url, alt: "frame"});
  big.className = "frame";
  const slider = el("input", {type: "range", min: 0, max: frames.length - 1, value: 0, className: "frame-slider"});
  const caption = el("span", {textContent: `frame 1 of ${frames.length}`});
  slider.addEventListener("input", () => {
    big.src = frames[slider.value].url;
    caption.textContent = `frame ${Number(slider.value) + 1} of ${frames.length}`;
  });
  const anim = el("img", {src: animation.url, alt: "animated strip", className: "animation"});
  return el("div", {className: "strip"}, anim, el("div", {}, big, slider, el("br"), caption,
            el("br"), el("a", {href: `${animation.url}?download=1`, download: animation.name,
                               textContent: "download animation (APNG)"})));
}

async function refreshGallery() {
  const {images} = await api("/api/images");
  const key = images.map((i) => i.id).join(",");
  if (key === galleryVersion) return;
  galleryVersion = key;
  const groups = new Map();  // job id (or the upload's id) -> items, newest group first
  for (const item of images) {
    const group = item.job || item.id;
    if (!groups.has(group)) groups.set(group, []);
    groups.get(group).push(item);
  }
  const gallery = $("#gallery");
  gallery.replaceChildren();
  for (const [group, items] of groups) {
    const results = items.filter((i) => i.kind !== "animation").reverse();
    const animation = items.find((i) => i.kind === "animation");
    const node = el("div", {className: "group"});
    node.dataset.group = group;
    if (animation) node.append(strip(animation, results));
    const row = el("div", {className: "group-images"});
    results.forEach((item) => row.append(card(item, item.kind === "upload" ? `upload · ${item.name}` : item.name)));
    node.append(row);
    node.append(settingsList(results[0].text));
    gallery.append(node);
  }
}

// ------------------------------------------------------------------ start
async function start() {
  for (const b of $$("#tabs button")) b.addEventListener("click", () => selectTab(b.dataset.tab));
  $("#job-form").addEventListener("submit", submit);
  for (const input of $$(".slot input[type=file]")) {
    input.addEventListener("change", async () => {
      if (!input.files.length) return;
      showError("");
      try {
        const item = await upload(input.files[0]);
        setSlot(input.dataset.slot, item);
        refreshGallery();
      } catch (err) {
        showError(err.message);
      } finally {
        input.value = "";
      }
    });
  }
  const canvas = $("#mask-canvas");
  canvas.addEventListener("pointerdown", (e) => { last = null; canvas.setPointerCapture(e.pointerId); paint(e); });
  canvas.addEventListener("pointermove", (e) => { if (e.buttons) paint(e); });
  canvas.addEventListener("pointerup", () => { last = null; });
  $("#mask-clear").addEventListener("click", clearMask);
  try {
    info = await api("/api/info");
  } catch (err) {
    showError(err.message);
    return;
  }
  fillStageTable();
  showInfo();
  selectTab("generate");
  listen();
  refreshGallery();
  document.body.dataset.ready = "1";
}

start();
