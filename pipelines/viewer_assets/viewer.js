/* ms-temba viewer: per-class heat strips, segment boxes, ground truth, a playhead that follows the
 * video, click-to-seek, zoom and scroll along time, class filters. pipelines/viewer.py inlines this
 * file with the page's data (a JSON script element #viewer-data); no network access is needed.
 *
 * Data: {video_id, classes: [name], start: [s], end: [s] (per frame), duration, probs: [base64 of
 * uint8 per frame, one string per class (p * 255)], segments: [[class, start, end, score]],
 * truth: [[class, start, end]] or null, video: relative URL or null}.
 */
(function () {
  "use strict";

  var data = JSON.parse(document.getElementById("viewer-data").textContent);
  var ROW = 24, AXIS = 22, TRUTH_LANE = 7, MAX_SCALE = 400, TABLE_LIMIT = 5000;
  var numClasses = data.classes.length, numFrames = data.start.length;
  var duration = Math.max(data.duration || 0, numFrames ? data.end[numFrames - 1] : 0, 1e-3);

  function decode(text) {
    var binary = atob(text), out = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
    return out;
  }
  var probs = data.probs.map(decode);
  var peaks = probs.map(function (p) { var m = 0; for (var i = 0; i < p.length; i++) if (p[i] > m) m = p[i]; return m / 255; });
  var hasTruth = Array.isArray(data.truth);

  // A viridis-like colour map, 256 entries of [r, g, b].
  var STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  var LUT = [];
  for (var v = 0; v < 256; v++) {
    var x = v / 255 * (STOPS.length - 1), k = Math.min(Math.floor(x), STOPS.length - 2), f = x - k;
    LUT.push([0, 1, 2].map(function (c) { return Math.round(STOPS[k][c] * (1 - f) + STOPS[k + 1][c] * f); }));
  }

  var el = function (id) { return document.getElementById(id); };
  var video = el("video");
  var scroller = el("timeline-scroll"), inner = el("timeline-inner"), canvas = el("timeline-canvas");
  var labels = el("labels"), playhead = el("playhead"), readout = el("time-readout");
  var ctx = canvas.getContext("2d");
  var state = { time: 0, scale: null, rows: [], nameFilter: "", minScore: 0, follow: true };

  function fitScale() { return Math.max(scroller.clientWidth, 50) / duration; }
  function formatTime(t) {
    var h = Math.floor(t / 3600), m = Math.floor(t / 60) % 60, s = t - 60 * Math.floor(t / 60);
    var ss = (s < 10 ? "0" : "") + s.toFixed(2);
    return (h ? h + ":" + (m < 10 ? "0" : "") : "") + m + ":" + ss;
  }
  // Index of the last frame starting at or before t (-1 if none).
  function frameAt(t) {
    var lo = 0, hi = numFrames - 1, found = -1;
    while (lo <= hi) { var mid = (lo + hi) >> 1; if (data.start[mid] <= t) { found = mid; lo = mid + 1; } else hi = mid - 1; }
    return found;
  }

  // ---------------------------------------------------------------------------------- rows
  function selectRows() {
    var needle = state.nameFilter.trim().toLowerCase();
    state.rows = [];
    for (var c = 0; c < numClasses; c++) {
      if (needle && data.classes[c].toLowerCase().indexOf(needle) < 0) continue;
      if (peaks[c] < state.minScore) continue;
      state.rows.push(c);
    }
    var html = ['<div class="axis-spacer">' + state.rows.length + " of " + numClasses + " classes</div>"];
    state.rows.forEach(function (c) {
      html.push('<div class="label-row" data-class="' + c + '" title="' + escapeHtml(data.classes[c]) + '"><span class="name">' +
                escapeHtml(data.classes[c]) + '</span><span class="peak">' + peaks[c].toFixed(2) + "</span></div>");
    });
    labels.innerHTML = html.join("");
    el("empty-note").style.display = state.rows.length ? "none" : "block";
    layout();
    fillTable();
  }

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, function (ch) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[ch];
    });
  }

  // ---------------------------------------------------------------------------------- drawing
  function layout() {
    if (state.scale === null) state.scale = fitScale();
    state.scale = Math.min(Math.max(state.scale, fitScale()), MAX_SCALE);
    var height = AXIS + state.rows.length * ROW;
    // Never narrower than the view, so the whole video at "fit" needs no scroll bar.
    inner.style.width = Math.max(Math.floor(duration * state.scale), scroller.clientWidth) + "px";
    inner.style.height = height + "px";
    canvas.width = Math.max(scroller.clientWidth, 1);
    canvas.height = height;
    canvas.style.width = canvas.width + "px";
    canvas.style.height = height + "px";
    playhead.style.height = height + "px";
    draw();
    placePlayhead();
  }

  function visibleWindow() {
    var t0 = scroller.scrollLeft / state.scale;
    return [t0, t0 + canvas.width / state.scale];
  }

  function draw() {
    var width = canvas.width, height = canvas.height, scale = state.scale;
    var win = visibleWindow(), t0 = win[0];
    ctx.clearRect(0, 0, width, height);
    if (!state.rows.length) return;
    // Frames covered by every pixel column: [first, last] (max-pooled, so short peaks stay visible).
    var firstOf = new Int32Array(width), lastOf = new Int32Array(width);
    for (var px = 0; px < width; px++) {
      var a = t0 + px / scale, b = a + 1 / scale, first = Math.max(frameAt(a), 0), last = frameAt(b - 1e-9);
      while (first <= last && data.end[first] <= a) first++;
      firstOf[px] = first; lastOf[px] = last;
    }
    var image = ctx.createImageData(width, height - AXIS), pixels = image.data;
    var heatTop = hasTruth ? TRUTH_LANE + 1 : 1, heatHeight = ROW - heatTop - 2;
    state.rows.forEach(function (c, r) {
      var p = probs[c];
      for (var px = 0; px < width; px++) {
        if (firstOf[px] > lastOf[px]) continue;
        var value = 0;
        for (var i = firstOf[px]; i <= lastOf[px]; i++) if (p[i] > value) value = p[i];
        var colour = LUT[value];
        for (var y = 0; y < heatHeight; y++) {
          var o = ((r * ROW + heatTop + y) * width + px) * 4;
          pixels[o] = colour[0]; pixels[o + 1] = colour[1]; pixels[o + 2] = colour[2]; pixels[o + 3] = 255;
        }
      }
    });
    ctx.putImageData(image, 0, AXIS);
    var rowOf = {};
    state.rows.forEach(function (c, r) { rowOf[c] = r; });
    // Ground-truth instances: bars in the top lane of their class row.
    ctx.fillStyle = "#1a9850";
    (data.truth || []).forEach(function (t) {
      if (!(t[0] in rowOf) || t[2] < win[0] || t[1] > win[1]) return;
      var x = (t[1] - t0) * scale;
      ctx.fillRect(x, AXIS + rowOf[t[0]] * ROW + 1, Math.max((t[2] - t[1]) * scale, 1), TRUTH_LANE - 1);
    });
    // Detected segments: boxes around the heat strip.
    ctx.strokeStyle = "#ff7f0e"; ctx.lineWidth = 2;
    data.segments.forEach(function (s) {
      if (!(s[0] in rowOf) || s[3] < state.minScore || s[2] < win[0] || s[1] > win[1]) return;
      var x = (s[1] - t0) * scale;
      ctx.strokeRect(x + 1, AXIS + rowOf[s[0]] * ROW + heatTop, Math.max((s[2] - s[1]) * scale - 2, 1), heatHeight);
    });
    // Time axis with about one tick per 90 px.
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, width, AXIS);
    var step = niceStep(90 / scale);
    ctx.fillStyle = "#555"; ctx.strokeStyle = "#bbb"; ctx.lineWidth = 1; ctx.font = "11px sans-serif";
    for (var t = Math.ceil(t0 / step) * step; t <= win[1]; t += step) {
      var tx = Math.round((t - t0) * scale) + 0.5;
      ctx.beginPath(); ctx.moveTo(tx, AXIS - 6); ctx.lineTo(tx, AXIS); ctx.stroke();
      ctx.fillText(formatTime(t).replace(/\.00$/, ""), tx + 3, 13);
    }
    ctx.beginPath(); ctx.moveTo(0, AXIS - 0.5); ctx.lineTo(width, AXIS - 0.5); ctx.stroke();
  }

  function niceStep(seconds) {
    var steps = [0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];
    for (var i = 0; i < steps.length; i++) if (steps[i] >= seconds) return steps[i];
    return 7200;
  }

  // ---------------------------------------------------------------------------------- time
  function placePlayhead() {
    playhead.style.left = (state.time * state.scale) + "px";
    playhead.dataset.time = state.time.toFixed(3);
    readout.textContent = formatTime(state.time) + " / " + formatTime(duration);
    highlightRow();
  }

  function setTime(t, fromVideo) {
    state.time = Math.min(Math.max(t, 0), duration);
    placePlayhead();
    if (state.follow && fromVideo) ensureVisible(state.time);
  }

  function seek(t) {
    t = Math.min(Math.max(t, 0), duration);
    if (video && isFinite(t)) {
      try { video.currentTime = t; } catch (error) { /* not loaded yet: the playhead still moves */ }
    }
    setTime(t, false);
    ensureVisible(t);
  }

  function ensureVisible(t) {
    var win = visibleWindow();
    if (t < win[0] || t > win[1] - 0.05 * (win[1] - win[0])) {
      scroller.scrollLeft = Math.max(t * state.scale - 0.25 * canvas.width, 0);
    }
  }

  function zoom(factor, anchorTime) {
    var win = visibleWindow();
    var anchor = anchorTime === undefined ? (win[0] + win[1]) / 2 : anchorTime;
    var offset = anchor * state.scale - scroller.scrollLeft;
    state.scale = state.scale * factor;
    layout();
    scroller.scrollLeft = Math.max(anchor * state.scale - offset, 0);
    draw();
  }

  // ---------------------------------------------------------------------------------- table
  function fillTable() {
    var body = el("segment-table").tBodies[0], rows = [], shown = {};
    state.rows.forEach(function (c) { shown[c] = true; });
    var items = data.segments.filter(function (s) { return shown[s[0]] && s[3] >= state.minScore; })
      .map(function (s) { return { kind: "predicted", c: s[0], s: s[1], e: s[2], score: s[3] }; });
    if (hasTruth) {
      (data.truth || []).forEach(function (t) { if (shown[t[0]]) items.push({ kind: "truth", c: t[0], s: t[1], e: t[2], score: null }); });
    }
    items.sort(function (a, b) { return a.s - b.s || a.c - b.c || (a.kind < b.kind ? -1 : 1); });
    items.slice(0, TABLE_LIMIT).forEach(function (item) {
      rows.push('<tr data-start="' + item.s + '" data-end="' + item.e + '" data-class="' + item.c + '">' +
                "<td>" + escapeHtml(data.classes[item.c]) + "</td><td>" + formatTime(item.s) + "</td><td>" +
                formatTime(item.e) + "</td><td>" + (item.e - item.s).toFixed(2) + "</td><td>" +
                (item.score === null ? "" : item.score.toFixed(3)) + "</td>" +
                (hasTruth ? '<td class="kind-' + item.kind + '">' + (item.kind === "truth" ? "ground truth" : "predicted") + "</td>" : "") +
                "</tr>");
    });
    body.innerHTML = rows.join("");
    el("table-note").textContent = items.length > TABLE_LIMIT ? "first " + TABLE_LIMIT + " of " + items.length + " rows" :
      items.length + " row" + (items.length === 1 ? "" : "s");
    highlightRow();
  }

  function highlightRow() {
    var body = el("segment-table").tBodies[0];
    for (var i = 0; i < body.rows.length; i++) {
      var row = body.rows[i];
      var inside = +row.dataset.start <= state.time && state.time <= +row.dataset.end;
      if (inside !== row.classList.contains("current")) row.classList.toggle("current", inside);
    }
  }

  // ---------------------------------------------------------------------------------- events
  canvas.addEventListener("click", function (event) {
    var rect = canvas.getBoundingClientRect();
    seek(visibleWindow()[0] + (event.clientX - rect.left) / state.scale);
  });
  el("segment-table").tBodies[0].addEventListener("click", function (event) {
    var row = event.target.closest("tr");
    if (row) seek(+row.dataset.start);
  });
  scroller.addEventListener("scroll", draw);
  scroller.addEventListener("wheel", function (event) {
    if (!event.ctrlKey && !event.metaKey) return;  // plain wheel scrolls; ctrl + wheel zooms at the cursor
    event.preventDefault();
    var rect = canvas.getBoundingClientRect();
    zoom(event.deltaY < 0 ? 1.25 : 0.8, visibleWindow()[0] + (event.clientX - rect.left) / state.scale);
  }, { passive: false });
  el("zoom-in").addEventListener("click", function () { zoom(2); });
  el("zoom-out").addEventListener("click", function () { zoom(0.5); });
  el("zoom-fit").addEventListener("click", function () { state.scale = fitScale(); layout(); });
  el("class-filter").addEventListener("input", function (event) { state.nameFilter = event.target.value; selectRows(); });
  el("score-filter").addEventListener("input", function (event) {
    state.minScore = +event.target.value;
    el("score-value").textContent = state.minScore.toFixed(2);
    selectRows();
  });
  el("follow").addEventListener("change", function (event) { state.follow = event.target.checked; });
  window.addEventListener("resize", function () { layout(); });
  if (video) {
    var frame = null;
    var follow = function () { setTime(video.currentTime, true); frame = video.paused ? null : requestAnimationFrame(follow); };
    video.addEventListener("timeupdate", function () { setTime(video.currentTime, true); });
    video.addEventListener("seeked", function () { setTime(video.currentTime, true); });
    video.addEventListener("play", function () { if (frame === null) frame = requestAnimationFrame(follow); });
  }

  // For tests and the console: the viewer's state and actions.
  window.msTembaViewer = { seek: seek, zoom: zoom, state: state, visibleWindow: visibleWindow, duration: duration };
  selectRows();
  document.body.dataset.ready = "true";
})();
