// pdserve live dashboard: polls dashboard/data, keeps a rolling history, draws inline SVG.
//
// The server sends one snapshot per poll (window attainment/goodput, recent latency
// percentiles, pool load, cumulative counters). Rates (bytes/s, served_by/s, ...) are
// computed here from counter deltas over up to RATE_WINDOW_S of *server* time; the x-axis
// uses page time. For tests, the page writes sample counts into data-* attributes
// (body[data-samples], svg[data-points]).
"use strict";
(() => {
  const DATA_URL = "dashboard/data";
  const POLL_MS = 1000;
  const HISTORY_MAX = 900;     // samples kept (15 min at 1 s)
  const VIEW_S = 300;          // the charts show at most the last 5 min...
  const MIN_VIEW_S = 30;       // ...and at least 30 s, so a fresh page is not a sliver
  const RATE_WINDOW_S = 10;    // counter rates are averaged over this much server time

  const C = {
    good: "#1a9850", bad: "#d73027", warn: "#f46d43", accent: "#3b6fd8", grey: "#8a93a3",
    p50: "#9ecae1", p90: "#4292c6", p99: "#08306b",
    transferred: "#1a9850", recomputed: "#d73027", colocated: "#3b6fd8", prefill_only: "#a0a7b4",
  };
  const PALETTE = ["#3b6fd8", "#e08214", "#1a9850", "#8e44ad", "#c51b7d", "#17becf", "#7f6d2a",
                   "#d62728", "#2c3e50", "#66a61e"];
  const SERVED = ["transferred", "recomputed", "colocated", "prefill_only"];

  const history = [];  // {t: page ms, d: snapshot}
  const $ = (id) => document.getElementById(id);

  // -- formatting ---------------------------------------------------------------------
  function fmtDur(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    if (s === 0) return "0";
    if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
    if (s < 1) return (s * 1e3).toFixed(s < 0.01 ? 2 : s < 0.1 ? 1 : 0) + " ms";
    return s.toFixed(s < 10 ? 2 : 1) + " s";
  }
  function fmtNum(x, digits = 2) {
    if (x === null || x === undefined || !isFinite(x)) return "–";
    if (Math.abs(x) >= 1000) return x.toFixed(0);
    if (Math.abs(x) >= 100) return x.toFixed(1);
    return x.toFixed(digits);
  }
  // Axis labels: at most 3 significant digits, no trailing zeros (0.25, 1.5, 120).
  function fmtAxis(x) { return Number(x.toPrecision(3)).toString(); }
  function fmtPct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%"; }
  function fmtBytes(b) {
    if (b === null || b === undefined || !isFinite(b)) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(b) >= 1000 && i < units.length - 1) { b /= 1000; i++; }
    return (i === 0 ? b.toFixed(0) : b.toFixed(b < 10 ? 2 : 1)) + " " + units[i];
  }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
      '"': "&quot;", "'": "&#39;"}[c]));
  }

  // -- derived series -----------------------------------------------------------------
  // Per-second rate of a cumulative counter at history index i (null at the first sample).
  function rate(i, get) {
    const cur = history[i].d;
    let j = i;
    while (j > 0 && cur.now_s - history[j - 1].d.now_s <= RATE_WINDOW_S) j--;
    if (j === i) { if (i === 0) return null; j = i - 1; }
    const prev = history[j].d, dt = cur.now_s - prev.now_s;
    if (!(dt > 0)) return null;
    return Math.max(0, (get(cur) - get(prev)) / dt);  // a negative delta is a restart
  }
  // Ratio of two counters' increases over the same window (null when nothing happened).
  function deltaRatio(i, num, den) {
    const dn = rate(i, den);
    if (!dn) return null;
    return Math.min(1, rate(i, num) / dn);
  }

  // -- charts -------------------------------------------------------------------------
  // The top of a y-axis with 4 round ticks: 4 x (1, 2, 2.5 or 5 x 10^k).
  function niceMax(x) {
    if (!(x > 0)) return 1;
    const raw = x / 4, p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= raw) return 4 * m * p;
    return 40 * p;
  }

  // series: [{name, color, values (one per visible sample, null = gap), dash, width}]
  // refs: [{value, label, color}] horizontal lines (SLO targets). stacked: areas summed.
  function drawChart(id, view, series, opts = {}) {
    const svg = $(id);
    const W = Math.max(200, svg.clientWidth || 320), H = Math.max(80, svg.clientHeight || 170);
    const m = {l: 52, r: 10, t: 8, b: 18};
    const pw = W - m.l - m.r, ph = H - m.t - m.b;
    const fmt = opts.fmt || fmtAxis;
    const refs = opts.refs || [];
    let values = series.map((s) => s.values);
    if (opts.stacked) {
      const acc = view.times.map(() => 0);
      values = series.map((s) => s.values.map((v, k) => (acc[k] += v || 0)));
    }
    let ymax = 0;
    for (const vs of values) for (const v of vs) if (v !== null && isFinite(v)) ymax = Math.max(ymax, v);
    for (const r of refs) if (r.value !== null && isFinite(r.value)) ymax = Math.max(ymax, r.value * 1.15);
    // minYMax: the smallest full scale (an idle byte-rate chart should not read 0.25 B/s).
    ymax = opts.yMax !== undefined ? opts.yMax : niceMax(Math.max(ymax, opts.minYMax || 0));
    const X = (t) => m.l + pw * (t - view.t0) / (view.t1 - view.t0);
    const Y = (v) => m.t + ph * (1 - Math.min(v, ymax * 1.05) / ymax);
    const out = [];
    // grid and y labels
    for (let k = 0; k <= 4; k++) {
      const v = ymax * k / 4, y = Y(v).toFixed(1);
      out.push(`<line x1="${m.l}" x2="${W - m.r}" y1="${y}" y2="${y}" stroke="#e6e8ec"/>`);
      out.push(`<text x="${m.l - 5}" y="${+y + 3.5}" text-anchor="end">${esc(fmt(v))}</text>`);
    }
    // x ticks: relative time, "now" at the right edge
    const span = (view.t1 - view.t0) / 1000;
    const step = [5, 10, 15, 30, 60, 120, 300].find((s) => span / s <= 6) || 600;
    for (let s = 0; s <= span + 1e-9; s += step) {
      const x = X(view.t1 - s * 1000).toFixed(1);
      const label = s === 0 ? "now" : s % 60 === 0 ? `-${s / 60}m` : `-${s}s`;
      out.push(`<line x1="${x}" x2="${x}" y1="${m.t}" y2="${H - m.b}" stroke="#f0f1f4"/>`);
      out.push(`<text x="${x}" y="${H - 5}" text-anchor="${s === 0 ? "end" : "middle"}">${label}</text>`);
    }
    out.push(`<line x1="${m.l}" x2="${W - m.r}" y1="${H - m.b}" y2="${H - m.b}" stroke="#c4c9d2"/>`);
    let points = 0;
    if (opts.stacked) {
      for (let si = series.length - 1; si >= 0; si--) {
        const top = values[si], base = si ? values[si - 1] : top.map(() => 0);
        if (!top.some((v, k) => v > base[k])) continue;
        let d = "";
        view.times.forEach((t, k) => { d += `${k ? "L" : "M"}${X(t).toFixed(1)},${Y(top[k]).toFixed(1)}`; });
        for (let k = view.times.length - 1; k >= 0; k--) d += `L${X(view.times[k]).toFixed(1)},${Y(base[k]).toFixed(1)}`;
        out.push(`<path d="${d}Z" fill="${series[si].color}" fill-opacity="0.55" stroke="${series[si].color}" stroke-width="1"/>`);
      }
      points = view.times.length;
    } else {
      series.forEach((s, si) => {
        let d = "", pen = false;
        values[si].forEach((v, k) => {
          if (v === null || v === undefined || !isFinite(v)) { pen = false; return; }
          d += `${pen ? "L" : "M"}${X(view.times[k]).toFixed(1)},${Y(v).toFixed(1)}`;
          pen = true;
          if (si === 0) points++;
        });
        if (d) {
          out.push(`<path d="${d}" fill="none" stroke="${s.color}" stroke-width="${s.width || 1.8}"` +
                   `${s.dash ? ` stroke-dasharray="${s.dash}"` : ""} stroke-linejoin="round"/>`);
        }
      });
    }
    for (const r of refs) {
      if (r.value === null || !isFinite(r.value)) continue;
      const y = Y(r.value).toFixed(1);
      out.push(`<line x1="${m.l}" x2="${W - m.r}" y1="${y}" y2="${y}" stroke="${r.color}" stroke-width="1.3" stroke-dasharray="6 4"/>`);
      out.push(`<text class="refl" x="${W - m.r - 2}" y="${+y - 3}" text-anchor="end" style="fill:${r.color}">${esc(r.label)}</text>`);
    }
    if (!view.times.length || (!opts.stacked && points === 0 && series.every((s) => s.values.every((v) => v === null)))) {
      out.push(`<text class="empty" x="${m.l + pw / 2}" y="${m.t + ph * 0.3}" text-anchor="middle">${esc(opts.empty || "no data yet")}</text>`);
    }
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.innerHTML = out.join("");
    svg.dataset.points = String(points);
  }

  function legend(id, items) {
    $(id).innerHTML = items.map((it) =>
      `<span><i class="swatch" style="background:${it.color}${it.dash ? ";opacity:.6" : ""}"></i>` +
      `${esc(it.name)} <b>${esc(it.value)}</b></span>`).join("");
  }
  const last = (vs) => { for (let k = vs.length - 1; k >= 0; k--) if (vs[k] !== null) return vs[k]; return null; };

  function tile(id, value, sub, state) {
    const el = $(id);
    el.querySelector(".value").textContent = value;
    el.querySelector(".sub").textContent = sub;
    el.classList.toggle("ok", state === "ok");
    el.classList.toggle("bad", state === "bad");
  }

  // -- render -------------------------------------------------------------------------
  function render() {
    if (!history.length) return;
    const now = history[history.length - 1].t;
    const first = history.findIndex((h) => h.t >= now - VIEW_S * 1000);
    const idx = [];
    for (let i = first; i < history.length; i++) idx.push(i);
    const t0 = Math.min(history[first].t, now - MIN_VIEW_S * 1000);
    const view = {t0: Math.max(t0, now - VIEW_S * 1000), t1: now, times: idx.map((i) => history[i].t)};
    const d = history[history.length - 1].d;
    const slo = d.slo;
    const col = (f) => idx.map((i) => { const v = f(history[i].d, i); return v === undefined ? null : v; });

    $("slo").textContent = `SLO: TTFT ≤ ${fmtDur(slo.ttft_s)}, TPOT ≤ ${fmtDur(slo.tpot_s)}, ` +
      `attainment ≥ ${fmtPct(slo.attainment)} · ${d.num_units} ${d.unit}${d.num_units === 1 ? "" : "s"}`;

    // goodput
    const goodput = col((s) => s.goodput_rps), thr = col((s) => s.throughput_rps);
    drawChart("ch-goodput", view, [
      {name: "goodput", color: C.good, values: goodput, width: 2.2},
      {name: "throughput", color: C.grey, values: thr, dash: "4 3"}]);
    legend("lg-goodput", [
      {name: "goodput", color: C.good, value: fmtNum(d.goodput_rps) + " req/s"},
      {name: "per " + d.unit, color: C.good, value: fmtNum(d.goodput_per_unit_rps)},
      {name: "throughput", color: C.grey, value: fmtNum(d.throughput_rps) + " req/s", dash: true}]);

    // attainment
    const att = col((s) => (s.throughput_rps > 0 ? s.attainment : null));
    const ttftMet = col((s, i) => deltaRatio(i, (x) => x.totals.slo_ttft_met, (x) => x.totals.slo_requests));
    const tpotMet = col((s, i) => deltaRatio(i, (x) => x.totals.slo_tpot_met, (x) => x.totals.slo_requests));
    drawChart("ch-attainment", view, [
      {name: "both (60 s)", color: C.accent, values: att, width: 2.2},
      {name: "TTFT met (10 s)", color: C.p50, values: ttftMet, dash: "3 3", width: 1.4},
      {name: "TPOT met (10 s)", color: C.warn, values: tpotMet, dash: "3 3", width: 1.4}],
      {yMax: 1, fmt: (v) => (100 * v).toFixed(0) + "%",
       refs: [{value: slo.attainment, label: "target " + fmtPct(slo.attainment), color: C.bad}],
       empty: "no requests judged yet"});
    legend("lg-attainment", [
      {name: "both, 60 s", color: C.accent, value: d.throughput_rps > 0 ? fmtPct(d.attainment) : "–"},
      {name: "TTFT met", color: C.p50, value: fmtPct(last(ttftMet)), dash: true},
      {name: "TPOT met", color: C.warn, value: fmtPct(last(tpotMet)), dash: true}]);

    // latency percentiles
    for (const [key, chartId, legendId, target] of [
      ["ttft_s", "ch-ttft", "lg-ttft", slo.ttft_s], ["tpot_s", "ch-tpot", "lg-tpot", slo.tpot_s]]) {
      const ps = ["p50", "p90", "p99"].map((p) => ({
        name: p, color: C[p], values: col((s) => s.latency[key][p]), width: p === "p90" ? 2.2 : 1.6}));
      drawChart(chartId, view, ps, {fmt: fmtDur, empty: "no recent requests",
        refs: [{value: target, label: "SLO " + fmtDur(target), color: C.bad}]});
      const lat = d.latency[key];
      legend(legendId, ps.map((s) => ({name: s.name, color: s.color, value: fmtDur(lat[s.name])}))
        .concat([{name: "n", color: "transparent", value: String(lat.num_samples)}]));
    }

    // served_by: rates (stacked), totals bar, fallback notice
    const served = SERVED.map((k) => ({name: k, color: C[k],
      values: col((s, i) => rate(i, (x) => x.totals.served_by[k]))}));
    drawChart("ch-served", view, served, {stacked: true});
    const tot = d.totals.served_by;
    const all = SERVED.reduce((a, k) => a + tot[k], 0);
    legend("lg-served", SERVED.map((k) => ({name: k.replace("_", " "), color: C[k],
      value: `${tot[k]}${all ? ` (${(100 * tot[k] / all).toFixed(0)}%)` : ""}`})));
    $("served-bar").innerHTML = all ? SERVED.filter((k) => tot[k] > 0).map((k) =>
      `<span style="width:${(100 * tot[k] / all).toFixed(2)}%;background:${C[k]}" title="${k}: ${tot[k]}"></span>`).join("") : "";
    const recentRecompute = last(served[1].values) || 0;
    const recomputedTotal = tot.recomputed;
    $("served-notice").textContent = recentRecompute > 0
      ? `⚠ KV transfer fallback: ${fmtNum(recentRecompute)} req/s recomputed on decode`
      : recomputedTotal > 0 ? `${recomputedTotal} recomputed on decode since start` : "";
    $("panel-served").classList.toggle("alert", recentRecompute > 0);
    document.body.dataset.recomputed = String(recomputedTotal);

    // transfers
    const bw = col((s, i) => rate(i, (x) => x.totals.transfer_bytes));
    drawChart("ch-bandwidth", view, [{name: "bytes/s", color: C.accent, values: bw, width: 2}],
      {fmt: (v) => fmtBytes(v).replace(" ", ""), minYMax: 1000});
    const tt = d.totals;
    const meanS = tt.transfers_by_outcome.ok ? tt.transfer_seconds / tt.transfers_by_outcome.ok : null;
    legend("lg-bandwidth", [
      {name: "now", color: C.accent, value: fmtBytes(last(bw)) + "/s"},
      {name: "total", color: "transparent", value: fmtBytes(tt.transfer_bytes)},
      {name: "mean time", color: "transparent", value: fmtDur(meanS)}]);
    const outcomes = [["ok", C.good], ["failed", C.bad], ["expired", C.warn]].map(([k, color]) => ({
      name: k, color, values: col((s, i) => rate(i, (x) => x.totals.transfers_by_outcome[k])),
      width: k === "ok" ? 1.8 : 2.2}));
    drawChart("ch-transfers", view, outcomes);
    legend("lg-transfers", outcomes.map((s) => ({name: s.name, color: s.color,
      value: String(tt.transfers_by_outcome[s.name])})));
    $("panel-transfers").classList.toggle("alert", (last(outcomes[1].values) || 0) + (last(outcomes[2].values) || 0) > 0);

    // request outcomes
    const reqs = [["finished", C.good], ["aborted", C.grey], ["failed", C.bad]].map(([k, color]) => ({
      name: k, color, values: col((s, i) => rate(i, (x) => x.totals.requests_by_outcome[k] || 0))}));
    drawChart("ch-outcomes", view, reqs);
    legend("lg-outcomes", reqs.map((s) => ({name: s.name, color: s.color,
      value: String(tt.requests_by_outcome[s.name] || 0)})));

    // pool
    const ids = d.pool.map((p) => p.instance_id);
    const colorOf = (id) => PALETTE[ids.indexOf(id) % PALETTE.length];
    const byInstance = (field) => ids.map((id) => col((s) => {
      const row = s.pool.find((p) => p.instance_id === id);
      return row ? row[field] : null;
    }));
    const waiting = byInstance("num_waiting_reqs"), running = byInstance("num_running_reqs");
    const kv = byInstance("kv_cache_usage");
    drawChart("ch-queue", view, ids.flatMap((id, k) => [
      {name: id + " waiting", color: colorOf(id), values: waiting[k], width: 2},
      {name: id + " running", color: colorOf(id), values: running[k], dash: "4 3", width: 1.3}]),
      {});
    legend("lg-queue", ids.map((id, k) => ({name: id, color: colorOf(id),
      value: `w ${fmtNum(last(waiting[k]), 0)} · r ${fmtNum(last(running[k]), 0)}`})));
    drawChart("ch-kv", view, ids.map((id, k) => ({name: id, color: colorOf(id), values: kv[k]})),
      {yMax: 1, fmt: (v) => (100 * v).toFixed(0) + "%"});
    legend("lg-kv", ids.map((id, k) => ({name: id, color: colorOf(id), value: fmtPct(last(kv[k]))})));
    $("pool-rows").innerHTML = d.pool.map((p) => {
      const health = !p.is_healthy ? C.bad : p.is_available ? C.good : C.warn;
      const state = !p.is_healthy ? "unhealthy" : p.is_available ? "ready" : "starting";
      const kvu = p.kv_cache_usage === null ? null : p.kv_cache_usage;
      const n = (v) => (v === null ? "–" : String(v));
      return `<tr><td><i class="health" style="background:${health}" title="${state}"></i>${esc(p.instance_id)}</td>` +
        `<td>${esc(p.role)}</td><td>${n(p.num_running_reqs)}</td><td>${n(p.num_waiting_reqs)}</td>` +
        `<td>${n(p.queued_prompt_tokens)}</td><td>${p.role === "prefill" ? n(p.num_staged_segments) : "–"}</td>` +
        `<td>${p.inflight_requests}</td><td class="kv"><div class="kvbar"><span style="width:${kvu === null ? 0 : (100 * kvu).toFixed(1)}%;` +
        `background:${colorOf(p.instance_id)}"></span><em>${fmtPct(kvu)}</em></div></td></tr>`;
    }).join("") || `<tr><td colspan="8">no instances</td></tr>`;

    $("replan-rows").innerHTML = (d.replan || []).map((r) =>
      `<tr><td>${esc(new Date(r.time_s * 1000).toLocaleTimeString())}</td>` +
      `<td>${esc(r.action)}${r.applied ? "" : r.action === "resize" ? " (observe only)" : ""}</td>` +
      `<td>${r.prefill[0]} → ${r.prefill[1]}</td><td>${r.decode[0]} → ${r.decode[1]}</td>` +
      `<td>×${r.correction.toFixed(2)}</td><td>${esc(r.reason)}</td></tr>`
    ).join("") || `<tr><td colspan="6">no re-planning loop</td></tr>`;

    const e2e = d.latency.e2e_s;
    const pctOf = (n, total) => (total ? ` (${(100 * n / total).toFixed(1)}%)` : "");
    $("totals").innerHTML = [
      ["End-to-end latency p50 · p90 · p99", `${fmtDur(e2e.p50)} · ${fmtDur(e2e.p90)} · ${fmtDur(e2e.p99)}`],
      ["Judged against the SLO since start", `${tt.slo_requests}: both met ${tt.slo_met}${pctOf(tt.slo_met, tt.slo_requests)}, ` +
        `TTFT met ${tt.slo_ttft_met}${pctOf(tt.slo_ttft_met, tt.slo_requests)}, TPOT met ${tt.slo_tpot_met}${pctOf(tt.slo_tpot_met, tt.slo_requests)}`],
      ["KV transfers since start", `${tt.transfers_by_outcome.ok} ok, ${tt.transfers_by_outcome.failed} failed, ` +
        `${tt.transfers_by_outcome.expired} expired · ${fmtBytes(tt.transfer_bytes)}`],
    ].map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("");

    // tiles
    const judged = d.throughput_rps > 0;
    tile("tile-goodput", fmtNum(d.goodput_rps) + " req/s",
      `${fmtNum(d.goodput_per_unit_rps)} per ${d.unit} (${d.num_units})`, judged ? "ok" : null);
    tile("tile-attainment", judged ? fmtPct(d.attainment) : "–", `target ${fmtPct(slo.attainment)}`,
      judged ? (d.attainment >= slo.attainment ? "ok" : "bad") : null);
    tile("tile-throughput", fmtNum(d.throughput_rps) + " req/s",
      `${tt.slo_requests} judged · ${tt.slo_met} met since start`, null);
    for (const [key, tileId, target] of [["ttft_s", "tile-ttft", slo.ttft_s], ["tpot_s", "tile-tpot", slo.tpot_s]]) {
      const p90 = d.latency[key].p90;
      tile(tileId, fmtDur(p90), `SLO ${fmtDur(target)} · p99 ${fmtDur(d.latency[key].p99)}`,
        p90 === null ? null : p90 <= target ? "ok" : "bad");
    }
    const ready = d.pool.filter((p) => p.is_available).length;
    tile("tile-inflight", String(d.num_in_flight), `${ready}/${d.pool.length} instances ready`,
      ready === d.pool.length ? "ok" : "bad");
    const share = all ? recomputedTotal / all : 0;
    tile("tile-fallback", String(recomputedTotal), all ? `${fmtPct(share)} of served requests` : "none yet",
      recentRecompute > 0 ? "bad" : "ok");
  }

  // -- polling ------------------------------------------------------------------------
  function setStatus(ok, text) {
    const el = $("status");
    el.classList.toggle("down", !ok);
    el.innerHTML = `<span class="dot"></span>${esc(text)}`;
  }

  async function poll() {
    try {
      const resp = await fetch(DATA_URL, {cache: "no-store"});
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      const d = await resp.json();
      history.push({t: Date.now(), d});
      if (history.length > HISTORY_MAX) history.splice(0, history.length - HISTORY_MAX);
      document.body.dataset.samples = String(history.length);
      setStatus(true, `live · ${history.length} samples · ${new Date(d.now_s * 1000).toLocaleTimeString()}`);
      render();
    } catch (err) {
      setStatus(false, `disconnected (${err.message}) · retrying`);
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(render, 150);
  });
  poll();
})();
