// DitePose demo page, jobs tab: GET /v1/jobs and GET /v1/jobs/{id}, a metric table and a bar chart.
// Degrades to a sentence when the server has no jobs API (404) or its Redis is down (503).
"use strict";

(() => {
  const { $, state, api, errorText, escapeHtml, rgb, side, JOINT_COLORS, SUMMARY_KEYS } = window.DitePose;

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


  window.DitePose.jobs = { load: loadJobs, schedule: scheduleJobs };
})();
