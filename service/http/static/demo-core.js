// DitePose demo page, shared part: colours, API calls, the request panel, skeleton drawing.
// Vanilla JS, no build step. The page uses only the public API (GET /v1/models, POST /v1/pose,
// GET /v1/jobs), so reading these files shows how to call the service. URLs are relative to the
// page, so it also works behind a proxy that mounts the service on a path.
// Load order: demo-core.js, demo-jobs.js, demo.js (which starts the page).
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
    const quality = m && m.quality;
    if (m && m.demo_weights) {
      showBanner(`Model ${m.name} runs with RANDOM weights (no checkpoint was found): the poses are meaningless. `
        + "Serve a trained checkpoint with `ditepose serve --model NAME=CHECKPOINT`.", "warn");
    } else if (quality) {
      // The checkpoint's recorded evaluation (or "not evaluated"), as /v1/models says it: a demo
      // checkpoint or an unevaluated one is a warning, a recorded evaluation is information.
      const warn = quality.demo_checkpoint || !quality.evaluated;
      showBanner(`Model ${m.name}: ${quality.note}`, warn ? "warn" : "info");
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
    if (!boxes.length && $("detector").value) fields.detector = $("detector").value;
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

  window.DitePose = {
    $, state, api, apiKey, errorText, escapeHtml, fmtScore, showBanner, setStatus, rgb, side,
    JOINT_COLORS, SUMMARY_KEYS, loadModels, currentModel, modelChanged, estimate, lineScale,
    drawPersons, jointThreshold,
  };
})();
