// The job pages' one script (no build step, no other origin): the login form's cookie path, and
// the throughput chart, an inline SVG drawn from the points the page carries in data-points.
// Only textContent and attributes are set: nothing from the page is parsed as HTML.
"use strict";
(function () {
  var SVG = "http://www.w3.org/2000/svg";

  // Behind the apiserver's service proxy the pages live under a prefix the API never sees: the
  // cookie must cover it (and only it), so the login and logout forms tell the API where the
  // pages are (data-here is the page's path as the API saw it).
  Array.prototype.forEach.call(document.querySelectorAll("form[data-here]"), function (form) {
    var here = form.getAttribute("data-here") || "";
    var path = window.location.pathname;
    var base = form.querySelector('input[name="base"]');
    if (base && here && path.slice(-here.length) === here) {
      base.value = path.slice(0, path.length - here.length) + "/";
    }
  });

  var figure = document.getElementById("throughput");
  if (figure && figure.getAttribute("data-points")) {
    draw(figure, JSON.parse(figure.getAttribute("data-points")));
  }

  function node(name, attrs, parent) {
    var n = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { n.setAttribute(k, String(attrs[k])); });
    if (parent) parent.appendChild(n);
    return n;
  }

  function text(parent, x, y, label, anchor) {
    var t = node("text", { x: x, y: y, "text-anchor": anchor || "start" }, parent);
    t.textContent = label;
    return t;
  }

  function seconds(s) {
    if (s < 120) return s + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  // The axis' top: the peak rounded up to 1, 2 or 5 times a power of ten.
  function nice(peak) {
    if (!(peak > 0)) return 1;
    var ten = Math.pow(10, Math.floor(Math.log10(peak)));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * ten >= peak) return steps[i] * ten;
    return 10 * ten;
  }

  function draw(figure, data) {
    var points = data.points, width = data.bucket;
    var W = 720, H = 220, left = 52, right = 8, top = 10, bottom = 28;
    var plotW = W - left - right, plotH = H - top - bottom;
    var peak = 0;
    points.forEach(function (p) { peak = Math.max(peak, (p.succeeded + p.failed) / width); });
    var ymax = nice(peak);
    var svg = node("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "results per second" });
    var axis = node("g", { "class": "axis" }, svg);
    [0, 0.5, 1].forEach(function (f) {
      var y = top + plotH - f * plotH;
      node("line", { x1: left, x2: W - right, y1: y, y2: y, "class": "grid" }, axis);
      var v = ymax * f;
      text(axis, left - 6, y + 4, (v >= 10 || v === 0 ? v.toFixed(0) : v.toFixed(1)) + "/s", "end");
    });
    var step = plotW / Math.max(points.length, 1);
    var bars = node("g", { "class": "bars" }, svg);
    points.forEach(function (p, i) {
      var ok = p.succeeded / width, bad = p.failed / width;
      var x = left + i * step, w = Math.max(step - (step > 4 ? 1 : 0), 0.5);
      var hOk = (ok / ymax) * plotH, hBad = (bad / ymax) * plotH;
      var g = node("g", {}, bars);
      node("title", {}, g).textContent =
        "+" + seconds(i * width) + ": " + p.succeeded + " succeeded, " + p.failed + " failed (" +
        ((p.succeeded + p.failed) / width).toFixed(1) + "/s)";
      node("rect", { x: x, y: top + plotH - hOk, width: w, height: hOk, "class": "ok" }, g);
      node("rect", { x: x, y: top + plotH - hOk - hBad, width: w, height: hBad, "class": "bad" }, g);
    });
    text(axis, left, H - 8, "0 s");
    text(axis, W - right, H - 8, "+" + seconds(points.length * width), "end");
    var legend = node("g", { "class": "legend" }, svg);
    node("rect", { x: left + 150, y: H - 18, width: 10, height: 10, "class": "ok" }, legend);
    text(legend, left + 164, H - 9, "succeeded");
    node("rect", { x: left + 250, y: H - 18, width: 10, height: 10, "class": "bad" }, legend);
    text(legend, left + 264, H - 9, "failed");
    var holder = figure.querySelector(".chart");
    holder.textContent = "";
    holder.appendChild(svg);
  }
})();
