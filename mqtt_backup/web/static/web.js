// The device page's plots (uPlot) and the copy buttons. Data comes from the page's JSON element;
// nothing here builds HTML from it, so stored text can never become markup.
"use strict";

(function () {
  const GAP_FILL = "rgba(220, 60, 60, 0.15)";

  function gapShading(gaps) {
    return function (u) {
      const ctx = u.ctx;
      const top = u.bbox.top;
      const height = u.bbox.height;
      ctx.save();
      ctx.fillStyle = GAP_FILL;
      for (const g of gaps) {
        const x0 = Math.max(u.valToPos(g.since_s, "x", true), u.bbox.left);
        const x1 = Math.min(u.valToPos(g.until_s, "x", true), u.bbox.left + u.bbox.width);
        if (x1 > x0) {
          ctx.fillRect(x0, top, x1 - x0, height);
        }
      }
      ctx.restore();
    };
  }

  // uPlot hides points where the x axis is dense, and a value between two empty buckets has no
  // line to either: a sparse device's plot came out blank. Such lone values are drawn as points.
  function lonePoints(u, seriesIdx, show) {
    if (show) {
      return null; // every point is drawn already
    }
    const ys = u.data[seriesIdx];
    const lone = [];
    for (let i = 0; i < ys.length; i++) {
      if (ys[i] != null && (i === 0 || ys[i - 1] == null) && (i === ys.length - 1 || ys[i + 1] == null)) {
        lone.push(i);
      }
    }
    return lone.length ? lone : null;
  }

  function plot(container, title, series, data, gaps, width) {
    for (const s of series) {
      s.points = { filter: lonePoints };
    }

    const box = document.createElement("div");
    box.className = "plot";
    box.dataset.field = title;
    container.appendChild(box);
    const opts = {
      title: title,
      width: width,
      height: 180,
      scales: { x: { time: true } },
      // The pages say times are UTC; so do the axes, whatever the browser's zone.
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); },
      series: [{}].concat(series),
      hooks: { drawClear: [gapShading(gaps)] },
      legend: { live: true },
    };
    return new uPlot(opts, data, box);
  }

  function drawPlots() {
    const source = document.getElementById("series");
    const container = document.getElementById("plots");
    if (!source || !container || typeof uPlot === "undefined") {
      return;
    }
    const s = JSON.parse(source.textContent);
    const width = Math.max(320, Math.min(container.clientWidth || 900, 1100));
    plot(container, "messages per minute", [
      { label: "per minute", stroke: "#2b6cb0", width: 1.5, fill: "rgba(43,108,176,0.1)" },
    ], [s.t, s.per_minute], s.gaps, width);
    for (const name of Object.keys(s.fields)) {
      const f = s.fields[name];
      plot(container, name, [
        { label: "min", stroke: "#9ab", width: 1 },
        { label: "mean", stroke: "#c05621", width: 2 },
        { label: "max", stroke: "#9ab", width: 1 },
      ], [s.t, f.min, f.mean, f.max], s.gaps, width);
    }
    container.dataset.drawn = "true";
  }

  function copyButtons() {
    for (const button of document.querySelectorAll("button.copy")) {
      button.addEventListener("click", function () {
        const text = button.dataset.b64 || "";
        const done = function () { button.textContent = "copied"; };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(text).then(done, function () { fallback(text); done(); });
        } else {
          fallback(text);
          done();
        }
      });
    }
  }

  function fallback(text) {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawPlots();
    copyButtons();
  });
})();
