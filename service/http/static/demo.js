// DitePose demo page: the image tab (upload, mouse-drawn boxes, hover), the webcam tab, start-up.
// Needs demo-core.js and demo-jobs.js loaded first.
"use strict";

(() => {
  const {
    $, state, apiKey, estimate, setStatus, fmtScore, lineScale, drawPersons, jointThreshold,
    loadModels, modelChanged,
  } = window.DitePose;
  const loadJobs = () => window.DitePose.jobs.load();
  const scheduleJobs = () => window.DitePose.jobs.schedule();

  // ------------------------------------------------------------------ image tab
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
