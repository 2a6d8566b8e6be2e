// DitePose demo page. Vanilla JS, no build step. It uses only the public API
// (GET /v1/models, POST /v1/pose, GET /v1/jobs), so reading it shows how to call the service.
// URLs are relative to the page, so it also works behind a proxy that mounts the service on a path.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // Same colours and rules as model/draw.py: left warm, right cool, centre neutral.
  const PALETTE = {
    "left/arm": [255, 128, 0], "left/leg": [255, 51, 51], "left/head": [255, 204, 51],
    "right/arm": [0, 153, 255], "right/leg": [51, 51, 255], "right/head": [51, 255, 204],
    "center/torso": [0, 230, 0], "center/head": [230, 0, 230],
  };
  const JOINT_COLORS = { left: [255, 160, 40], right: [40, 160, 255], center: [230, 230, 230] };
  const PARTS = [
    ["head", ["nose", "eye", "ear", "head", "neck"]],
    ["arm", ["shoulder", "elbow", "wrist"]],
    ["leg", ["knee", "ankle"]],
  ];
  // Person colours when colouring by track id / person index (webcam).
  const PERSON_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
    "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#ffd8b1"];
  const SUMMARY_KEYS = new Set(["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl",
    "PCKh", "PCKh@0.1", "Mean", "mean"]);

  const rgb = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;
  const side = (name) => (name.startsWith("left") ? "left" : name.startsWith("right") ? "right" : "center");
  const part = (name) => {
    for (const [p, words] of PARTS) if (words.some((w) => name.includes(w))) return p;
    return "torso";
  };
  function limbColor(na, nb) {
    const s = side(na) === side(nb) ? side(na) : "center";
    const parts = new Set([part(na), part(nb)]);
    let p = parts.has("head") ? "head" : parts.has("arm") ? "arm" : parts.has("leg") ? "leg" : "torso";
    if (s === "center") p = p === "head" ? "head" : "torso";
    return PALETTE[`${s}/${p}`];
  }
  const personColor = (person, index) => {
    const id = person.track_id ?? person.track ?? index;
    return PERSON_COLORS[Math.abs(Number(id) || 0) % PERSON_COLORS.length];
  };

  const state = {
    models: {},
    image: null, // HTMLImageElement
    file: null,
    fileName: "image.jpg",
    boxes: [],
    drag: null,
    result: null, // last /v1/pose body for the image tab
    requests: 0,
    camera: null,
    jobsTimer: null,
    openJob: null,
  };

  // ------------------------------------------------------------------ API
  function apiKey() {
    return $("api-key").value.trim();
  }

  async function api(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (apiKey()) headers["X-API-Key"] = apiKey();
    const resp = await fetch(path, { ...options, headers });
    const type = resp.headers.get("content-type") || "";
    let body = null;
    if (type.includes("application/json")) body = await resp.json();
    else if (!resp.ok) body = { error: { code: `http_${resp.status}`, message: (await resp.text()).slice(0, 300) } };
    return { resp, body };
  }

  function errorText(resp, body) {
    const err = body && body.error;
    return err ? `${resp.status} ${err.code}: ${err.message}` : `HTTP ${resp.status}`;
  }

  function showBanner(text, kind = "warn") {
    const el = $("banner");
    el.textContent = text;
    el.className = `banner ${kind}`;
    el.hidden = !text;
  }

  // ------------------------------------------------------------------ models
  async function loadModels() {
    const select = $("model");
    let resp, body;
    try {
      ({ resp, body } = await api("v1/models"));
    } catch (err) {
      showBanner(`Cannot reach the service: ${err}`, "error");
      return;
    }
    if (!resp.ok) {
      select.innerHTML = '<option value="">(no models)</option>';
      showBanner(resp.status === 401 ? "This server needs an API key: type it in the field at the top right."
        : `GET /v1/models failed: ${errorText(resp, body)}`, "error");
      document.body.dataset.models = "error";
      return;
    }
    state.models = {};
    select.innerHTML = "";
    for (const m of body.models) {
      state.models[m.name] = m;
      const opt = document.createElement("option");
      opt.value = m.name;
      opt.textContent = `${m.name} (${m.arch}, ${m.dataset}, ${m.input_size[0]}×${m.input_size[1]})`;
      if (m.default) opt.selected = true;
      select.appendChild(opt);
    }
    document.body.dataset.models = String(body.models.length);
    modelChanged();
  }

  function currentModel() {
    return state.models[$("model").value] || Object.values(state.models)[0] || null;
  }

  function modelChanged() {
    const m = currentModel();
    if (m && m.demo_weights) {
      showBanner(`Model ${m.name} runs with RANDOM weights (no checkpoint was found): the poses are meaningless. `
        + "Serve a trained checkpoint with `ditepose serve --model NAME=CHECKPOINT`.", "warn");
    } else {
      showBanner("");
    }
  }

  // ------------------------------------------------------------------ requests
  function poseForm(blob, fileName, boxes) {
    const form = new FormData();
    form.append("image", blob, fileName);
    if (boxes.length) form.append("boxes", JSON.stringify(boxes));
    const fields = {
      model: $("model").value,
      flip_test: $("flip").checked ? "true" : "false",
      decoder: $("decoder").value,
    };
    if (!boxes.length) fields.detector = $("detector").value;
    for (const [k, v] of Object.entries(fields)) if (v !== "") form.append(k, v);
    return { form, fields };
  }

  function shellQuote(text) {
    return `'${String(text).replace(/'/g, "'\\''")}'`;
  }

  function curlCommand(fileName, boxes, fields, render) {
    const url = new URL(`v1/pose${render ? "?render=png" : ""}`, location.href).href;
    const lines = [`curl -X POST ${shellQuote(url)}`];
    if (apiKey()) lines.push('-H "X-API-Key: $DITEPOSE_API_KEY"');
    lines.push(`-F ${shellQuote(`image=@${fileName}`)}`);
    if (boxes.length) lines.push(`-F ${shellQuote(`boxes=${JSON.stringify(boxes)}`)}`);
    for (const [k, v] of Object.entries(fields)) if (v !== "") lines.push(`-F ${shellQuote(`${k}=${v}`)}`);
    if (render) lines.push("-o poses.png");
    return lines.join(" \\\n  ");
  }

  // Post one image; fills the side panel. Returns the body or null on error.
  async function estimate(blob, fileName, boxes, render = false) {
    const { form, fields } = poseForm(blob, fileName, boxes);
    $("curl").textContent = curlCommand(fileName, boxes, fields, render);
    const started = performance.now();
    let resp, body;
    try {
      resp = await fetch(`v1/pose${render ? "?render=png" : ""}`,
        { method: "POST", body: form, headers: apiKey() ? { "X-API-Key": apiKey() } : {} });
      const type = resp.headers.get("content-type") || "";
      body = type.includes("application/json") ? await resp.json() : render && resp.ok ? await resp.blob() : null;
    } catch (err) {
      setStatus(`Request failed: ${err}`, "error");
      return null;
    }
    const roundTrip = performance.now() - started;
    state.requests += 1;
    document.body.dataset.requests = String(state.requests);
    if (!resp.ok) {
      setStatus(errorText(resp, body), "error");
      if (resp.status === 401) showBanner("Wrong or missing API key.", "error");
      return null;
    }
    if (render) {
      const persons = resp.headers.get("X-Persons");
      setStatus(`PNG drawn by the server (${persons ?? "?"} persons) in ${roundTrip.toFixed(0)} ms.`, "ok");
      return body;
    }
    showResult(body, roundTrip);
    return body;
  }

  function setStatus(text, kind) {
    const el = $("status");
    el.textContent = text;
    el.className = `status ${kind || ""}`;
  }

  function showResult(body, roundTrip) {
    const n = body.persons.length;
    $("person-count").textContent = String(n);
    $("person-count").dataset.count = String(n);
    setStatus(`OK: ${n} person${n === 1 ? "" : "s"} from ${body.model} (${body.image.width}×${body.image.height}).`, "ok");
    const rows = Object.entries(body.timings).map(([k, v]) => [k.replace(/_ms$/, ""), `${Number(v).toFixed(1)} ms`]);
    rows.push(["round trip (browser)", `${roundTrip.toFixed(1)} ms`]);
    $("timings").tBodies[0].innerHTML = rows
      .map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(v)}</td></tr>`).join("");
    $("persons").innerHTML = body.persons.map((p, i) => {
      const box = p.bbox.map((v) => Math.round(v)).join(", ");
      const track = p.track_id != null ? ` track ${p.track_id}` : "";
      return `<li style="border-color:${personColor(p, i)}" data-score="${p.score}">`
        + `score ${fmtScore(p.score)}${track}; box [${box}]</li>`;
    }).join("");
  }

  // Trained weights score about 0..1; random (demo) weights score ~1e-10: keep the digits readable.
  function fmtScore(v) {
    return Math.abs(v) >= 0.001 || v === 0 ? v.toFixed(3) : v.toExponential(2);
  }

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }

  // ------------------------------------------------------------------ drawing
  function lineScale(width, height) {
    return Math.max(1, Math.round(Math.min(width, height) / 240)); // as model/draw.py
  }

  // Draws the persons; colourBy "limb" (as the server's PNG) or "person" (track id / index).
  function drawPersons(ctx, persons, width, height, colorBy, threshold, highlight) {
    const base = lineScale(width, height);
    const model = currentModel();
    const skeleton = (model && model.skeleton) || [];
    ctx.lineCap = "round";
    persons.forEach((person, p) => {
      const kpts = person.keypoints;
      const shown = kpts.map((k) => k.score >= threshold && Number.isFinite(k.x) && Number.isFinite(k.y));
      const own = personColor(person, p);
      const [bx, by, bw, bh] = person.bbox;
      ctx.lineWidth = base;
      ctx.strokeStyle = colorBy === "person" ? own : "rgb(255,255,255)";
      ctx.strokeRect(bx, by, bw, bh);
      if (person.track_id != null) {
        ctx.fillStyle = own;
        ctx.font = `${12 * base}px sans-serif`;
        ctx.fillText(`#${person.track_id}`, bx + 2 * base, by + 12 * base);
      }
      ctx.lineWidth = 2 * base;
      for (const [a, b] of skeleton) {
        if (a >= kpts.length || b >= kpts.length || !shown[a] || !shown[b]) continue;
        ctx.strokeStyle = colorBy === "person" ? own : rgb(limbColor(kpts[a].name, kpts[b].name));
        ctx.beginPath();
        ctx.moveTo(kpts[a].x, kpts[a].y);
        ctx.lineTo(kpts[b].x, kpts[b].y);
        ctx.stroke();
      }
      kpts.forEach((k, j) => {
        if (!shown[j]) return;
        const hot = highlight && highlight.person === p && highlight.joint === j;
        ctx.fillStyle = rgb(JOINT_COLORS[side(k.name)]);
        ctx.beginPath();
        ctx.arc(k.x, k.y, (hot ? 5 : 3) * base, 0, 2 * Math.PI);
        ctx.fill();
        if (hot) {
          ctx.lineWidth = base;
          ctx.strokeStyle = "#000";
          ctx.stroke();
        }
      });
    });
  }

  function jointThreshold() {
    const value = parseFloat($("joint-thr").value);
    return Number.isFinite(value) ? value : 0.3;
  }

  function redraw(highlight = null) {
    const canvas = $("canvas");
    if (!state.image) return;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(state.image, 0, 0);
    const base = lineScale(canvas.width, canvas.height);
    if (state.result) {
      drawPersons(ctx, state.result.persons, canvas.width, canvas.height, "limb", jointThreshold(), highlight);
    }
    ctx.setLineDash([6 * base, 4 * base]);
    ctx.lineWidth = base;
    ctx.strokeStyle = "#ffeb3b";
    const boxes = state.drag ? [...state.boxes, state.drag.box] : state.boxes;
    for (const [x, y, w, h] of boxes) ctx.strokeRect(x, y, w, h);
    ctx.setLineDash([]);
  }

  // ------------------------------------------------------------------ image tab
  function loadFile(file) {
    if (!file) return;
    if (!/^image\/(jpeg|png|webp)$/.test(file.type)) {
      setStatus(`Not a JPEG, PNG or WebP image: ${file.name} (${file.type || "unknown type"})`, "error");
      return;
    }
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => {
      state.image = img;
      state.file = file;
      state.fileName = file.name || "image.jpg";
      state.boxes = [];
      state.result = null;
      const canvas = $("canvas");
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      canvas.hidden = false;
      $("drop-hint").hidden = true;
      for (const id of ["run", "clear-boxes", "render-png"]) $(id).disabled = false;
      $("png-figure").hidden = true;
      redraw();
      run();
    };
    img.onerror = () => setStatus(`The browser cannot read ${file.name}`, "error");
    img.src = url;
  }

  async function run() {
    if (!state.file) return;
    $("run").disabled = true;
    setStatus("Estimating…", "busy");
    const body = await estimate(state.file, state.fileName, state.boxes);
    $("run").disabled = false;
    if (body) {
      state.result = body;
      redraw();
    }
  }

  async function renderPng() {
    if (!state.file) return;
    const blob = await estimate(state.file, state.fileName, state.boxes, true);
    if (!blob) return;
    const img = $("png-result");
    if (img.src) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
    $("png-figure").hidden = false;
  }

  function canvasPoint(canvas, event) {
    const rect = canvas.getBoundingClientRect();
    return [
      ((event.clientX - rect.left) * canvas.width) / rect.width,
      ((event.clientY - rect.top) * canvas.height) / rect.height,
      canvas.width / rect.width,
    ];
  }

  function nearestJoint(x, y, radius) {
    if (!state.result) return null;
    let best = null;
    const thr = jointThreshold();
    state.result.persons.forEach((person, p) => {
      person.keypoints.forEach((k, j) => {
        if (k.score < thr) return;
        const d = Math.hypot(k.x - x, k.y - y);
        if (d <= radius && (!best || d < best.d)) best = { d, person: p, joint: j, k };
      });
    });
    return best;
  }

  function setupCanvas() {
    const canvas = $("canvas");
    const tip = $("tooltip");
    const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
    canvas.addEventListener("mousedown", (event) => {
      const [x, y] = canvasPoint(canvas, event);
      state.drag = { x0: clamp(x, canvas.width), y0: clamp(y, canvas.height), box: [x, y, 0, 0] };
      event.preventDefault();
    });
    canvas.addEventListener("mousemove", (event) => {
      const [x, y, scale] = canvasPoint(canvas, event);
      if (state.drag) {
        const x1 = clamp(x, canvas.width), y1 = clamp(y, canvas.height);
        const d = state.drag;
        d.box = [Math.min(d.x0, x1), Math.min(d.y0, y1), Math.abs(x1 - d.x0), Math.abs(y1 - d.y0)];
        tip.hidden = true;
        redraw();
        return;
      }
      const hit = nearestJoint(x, y, 12 * scale);
      if (hit) {
        tip.textContent = `person ${hit.person + 1} · ${hit.k.name} · score ${fmtScore(hit.k.score)}`
          + ` · (${hit.k.x.toFixed(1)}, ${hit.k.y.toFixed(1)})`;
        const stage = $("drop").getBoundingClientRect();
        tip.style.left = `${event.clientX - stage.left + 14}px`;
        tip.style.top = `${event.clientY - stage.top + 14}px`;
        tip.hidden = false;
        tip.dataset.joint = hit.k.name;
      } else {
        tip.hidden = true;
      }
      redraw(hit);
    });
    const finish = () => {
      if (!state.drag) return;
      const [x, y, w, h] = state.drag.box;
      state.drag = null;
      if (w >= 4 && h >= 4) {
        state.boxes.push([x, y, w, h].map((v) => Math.round(v * 10) / 10));
        document.body.dataset.boxes = String(state.boxes.length);
      }
      redraw();
    };
    canvas.addEventListener("mouseup", finish);
    canvas.addEventListener("mouseleave", () => {
      finish();
      tip.hidden = true;
    });

    const drop = $("drop");
    drop.addEventListener("dragover", (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      loadFile(event.dataTransfer.files[0]);
    });
    $("file").addEventListener("change", (event) => loadFile(event.target.files[0]));
    $("run").addEventListener("click", run);
    $("render-png").addEventListener("click", renderPng);
    $("clear-boxes").addEventListener("click", () => {
      state.boxes = [];
      document.body.dataset.boxes = "0";
      redraw();
    });
    $("joint-thr").addEventListener("input", () => redraw());
  }

  // ------------------------------------------------------------------ webcam tab
  async function startCamera() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      $("cam-stats").textContent = "No camera API here (browsers allow it only on https:// or localhost).";
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
    } catch (err) {
      $("cam-stats").textContent = `Camera refused: ${err.name || err}`;
      return;
    }
    const video = $("video");
    video.srcObject = stream;
    await video.play();
    const cam = { stream, inFlight: false, lastSent: 0, sent: 0, answered: 0, persons: [], size: null,
      lastTotal: null, started: performance.now(), running: true, grab: document.createElement("canvas") };
    state.camera = cam;
    $("cam-start").disabled = true;
    $("cam-stop").disabled = false;
    requestAnimationFrame(() => cameraFrame(cam));
  }

  function stopCamera() {
    const cam = state.camera;
    if (!cam) return;
    cam.running = false;
    for (const track of cam.stream.getTracks()) track.stop();
    $("video").srcObject = null;
    state.camera = null;
    $("cam-start").disabled = false;
    $("cam-stop").disabled = true;
  }

  function cameraFrame(cam) {
    if (!cam.running) return;
    const video = $("video");
    const canvas = $("cam-canvas");
    const w = video.videoWidth, h = video.videoHeight;
    if (w && h) {
      if (canvas.width !== w || canvas.height !== h) {
        canvas.width = w;
        canvas.height = h;
      }
      const ctx = canvas.getContext("2d");
      ctx.drawImage(video, 0, 0, w, h);
      if (cam.size && cam.size[0] === w && cam.size[1] === h) {
        drawPersons(ctx, cam.persons, w, h, "person", jointThreshold(), null);
      }
      const rate = Math.max(1, parseFloat($("cam-rate").value) || 5);
      const now = performance.now();
      if (!cam.inFlight && now - cam.lastSent >= 1000 / rate) sendFrame(cam, w, h, now);
    }
    requestAnimationFrame(() => cameraFrame(cam));
  }

  // One request in flight at a time: a slow server lowers the rate instead of queueing frames.
  function sendFrame(cam, w, h, now) {
    cam.inFlight = true;
    cam.lastSent = now;
    cam.grab.width = w;
    cam.grab.height = h;
    cam.grab.getContext("2d").drawImage($("video"), 0, 0, w, h);
    cam.grab.toBlob(async (blob) => {
      try {
        if (!blob || !cam.running) return;
        cam.sent += 1;
        const body = await estimate(blob, "frame.jpg", []);
        if (body && cam.running) {
          cam.answered += 1;
          cam.persons = body.persons;
          cam.size = [body.image.width, body.image.height];
          cam.lastTotal = body.timings.total_ms;
        }
        const secs = (performance.now() - cam.started) / 1000;
        $("cam-stats").textContent = `${cam.answered}/${cam.sent} frames answered, `
          + `${(cam.answered / secs).toFixed(1)} results/s, last ${cam.lastTotal != null ? cam.lastTotal.toFixed(0) : "–"} ms in the service`;
        $("cam-stats").dataset.answered = String(cam.answered);
      } finally {
        cam.inFlight = false;
      }
    }, "image/jpeg", 0.8);
  }

  // ------------------------------------------------------------------ jobs tab
  function jobsMessage(text) {
    const el = $("jobs-message");
    el.textContent = text;
    el.hidden = !text;
  }

  function mainMetric(metrics) {
    if (!metrics) return "";
    for (const key of ["AP", "PCKh"]) if (key in metrics) return `${key} ${Number(metrics[key]).toFixed(3)}`;
    return "";
  }

  async function loadJobs() {
    let resp, body;
    try {
      ({ resp, body } = await api("v1/jobs"));
    } catch (err) {
      jobsMessage(`Cannot reach the service: ${err}`);
      $("jobs-table").hidden = true;
      return;
    }
    const table = $("jobs-table");
    if (!resp.ok) {
      table.hidden = true;
      const text = resp.status === 404 ? "This server has no evaluation jobs API (GET /v1/jobs answered 404)."
        : resp.status === 503 ? `Evaluation jobs are unavailable right now (is Redis running?): ${errorText(resp, body)}`
          : resp.status === 401 ? "The jobs API needs an API key: type it at the top right."
            : `GET /v1/jobs failed: ${errorText(resp, body)}`;
      jobsMessage(text);
      $("panel-jobs").dataset.state = `error-${resp.status}`;
      return;
    }
    const jobs = body.jobs || [];
    $("panel-jobs").dataset.state = `ok-${jobs.length}`;
    jobsMessage(jobs.length ? "" : "No evaluation jobs yet. Start one with POST /v1/evaluate (see API docs).");
    table.hidden = !jobs.length;
    table.tBodies[0].innerHTML = jobs.map((job) => {
      const req = job.request || {};
      const pct = Math.max(0, Math.min(100, Number(job.progress) || 0));
      return `<tr data-id="${escapeHtml(job.id)}" class="job ${escapeHtml(job.state)}">`
        + `<td><code>${escapeHtml(job.id.slice(0, 12))}</code></td><td>${escapeHtml(job.state)}</td>`
        + `<td><progress max="100" value="${pct}"></progress> ${pct.toFixed(0)}%</td>`
        + `<td>${escapeHtml(req.dataset ?? "")}</td><td>${escapeHtml(req.model ?? req.checkpoint ?? "default")}</td>`
        + `<td>${escapeHtml((job.created_at || "").replace("T", " ").slice(0, 19))}</td>`
        + `<td>${escapeHtml(mainMetric(job.metrics))}</td></tr>`;
    }).join("");
    for (const row of table.tBodies[0].rows) row.addEventListener("click", () => showJob(row.dataset.id));
    if (state.openJob) {
      const open = jobs.find((j) => j.id === state.openJob);
      if (open) renderJob(open);
    }
  }

  async function showJob(id) {
    state.openJob = id;
    const { resp, body } = await api(`v1/jobs/${encodeURIComponent(id)}`);
    if (!resp.ok) {
      jobsMessage(`GET /v1/jobs/${id} failed: ${errorText(resp, body)}`);
      return;
    }
    renderJob(body);
  }

  // Per-joint values, wherever the job reports them: a `per_joint` object (in metrics or the
  // job), flat "per_joint.NAME" / "joint:NAME" keys, keys that are joint names of a served model,
  // or else the non-summary keys (MPII's Head ... Ankle groups).
  function perJoint(job, metrics) {
    const nested = (metrics.per_joint && typeof metrics.per_joint === "object" && metrics.per_joint)
      || (job.per_joint && typeof job.per_joint === "object" && job.per_joint);
    if (nested) return Object.entries(nested).filter(([, v]) => typeof v === "number");
    const numeric = Object.entries(metrics).filter(([, v]) => typeof v === "number");
    const prefixed = numeric.filter(([k]) => /^(per_joint[./]|joint:)/.test(k))
      .map(([k, v]) => [k.replace(/^(per_joint[./]|joint:)/, ""), v]);
    if (prefixed.length) return prefixed;
    const joints = new Set(Object.values(state.models).flatMap((m) => m.joints || []));
    const named = numeric.filter(([k]) => joints.has(k));
    if (named.length) return named;
    return numeric.filter(([k]) => !SUMMARY_KEYS.has(k));
  }

  function renderJob(job) {
    $("job-detail").hidden = false;
    const req = job.request || {};
    $("job-title").textContent = `Job ${job.id}: ${job.state}, ${Number(job.progress).toFixed(0)}%`
      + (req.dataset ? ` on ${req.dataset}` : "") + (job.error ? ` (${job.error})` : "");
    const metrics = job.metrics || {};
    const joints = perJoint(job, metrics);
    const flat = Object.entries(metrics)
      .filter(([k, v]) => typeof v === "number" && !/^(per_joint[./]|joint:)/.test(k));
    const extra = [["images", job.num_images], ["persons", job.num_persons],
      ["run (s)", job.timings && job.timings.run_s != null ? Number(job.timings.run_s).toFixed(1) : null]]
      .filter(([, v]) => v != null);
    const rows = [...flat.map(([k, v]) => [k, Number(v).toFixed(4)]), ...extra];
    $("job-metrics").tBodies[0].innerHTML = rows
      .map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(v)}</td></tr>`).join("")
      || "<tr><td>No metrics yet.</td></tr>";
    drawBars($("job-chart"), joints.length ? joints : flat,
      joints.length ? "Per joint" : "Metrics (this job reports no per-joint breakdown)");
  }

  function drawBars(canvas, entries, title) {
    const ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height;
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, W, H);
    ctx.fillStyle = "#222";
    ctx.font = "14px sans-serif";
    ctx.fillText(title, 10, 18);
    if (!entries.length) return;
    const top = Math.max(...entries.map(([, v]) => Number(v)));
    const scale = top > 1 ? 100 : 1; // AP-style 0..1 or PCKh-style percent
    const left = 40, bottom = H - 70, plotH = bottom - 30;
    const step = (W - left - 10) / entries.length;
    ctx.strokeStyle = "#999";
    ctx.font = "11px sans-serif";
    for (let t = 0; t <= 4; t++) {
      const y = bottom - (plotH * t) / 4;
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(W - 10, y);
      ctx.stroke();
      ctx.fillText(String((scale * t) / 4), 4, y + 4);
    }
    entries.forEach(([name, value], i) => {
      const v = Math.max(0, Number(value));
      const h = (plotH * Math.min(v, scale)) / scale;
      const x = left + i * step + step * 0.15;
      const s = side(name.toLowerCase());
      ctx.fillStyle = s === "center" ? "#4a7bd0" : rgb(JOINT_COLORS[s]);
      ctx.fillRect(x, bottom - h, step * 0.7, h);
      ctx.fillStyle = "#222";
      ctx.save();
      ctx.translate(x + step * 0.35, bottom + 6);
      ctx.rotate(Math.PI / 4);
      ctx.fillText(name, 0, 0);
      ctx.restore();
    });
    canvas.dataset.bars = String(entries.length);
  }

  function scheduleJobs() {
    clearInterval(state.jobsTimer);
    state.jobsTimer = setInterval(() => {
      if (!$("panel-jobs").hidden && $("jobs-auto").checked) loadJobs();
    }, 3000);
  }

  // ------------------------------------------------------------------ tabs and start-up
  function selectTab(name) {
    for (const button of document.querySelectorAll("#tabs button")) {
      button.classList.toggle("active", button.dataset.tab === name);
    }
    for (const tab of ["image", "webcam", "jobs"]) $(`panel-${tab}`).hidden = tab !== name;
    $("options").hidden = name === "jobs";
    document.querySelector("aside").hidden = name === "jobs";
    document.querySelector("main").classList.toggle("wide", name === "jobs");
    if (name !== "webcam") stopCamera();
    if (name === "jobs") loadJobs();
  }

  function init() {
    const saved = sessionStorage.getItem("ditepose.apiKey");
    if (saved) $("api-key").value = saved;
    $("api-key").addEventListener("change", () => {
      sessionStorage.setItem("ditepose.apiKey", apiKey());
      loadModels();
    });
    $("model").addEventListener("change", modelChanged);
    // A new option re-runs the loaded image, so the effect of flip test or decoder is visible at once.
    for (const id of ["model", "flip", "decoder", "detector"]) {
      $(id).addEventListener("change", () => {
        if (!$("panel-image").hidden && state.file) run();
      });
    }
    for (const button of document.querySelectorAll("#tabs button")) {
      button.addEventListener("click", () => selectTab(button.dataset.tab));
    }
    $("cam-start").addEventListener("click", startCamera);
    $("cam-stop").addEventListener("click", stopCamera);
    $("jobs-refresh").addEventListener("click", loadJobs);
    setupCanvas();
    scheduleJobs();
    loadModels();
    document.body.dataset.ready = "1";
  }

  init();
})();
