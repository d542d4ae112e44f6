// Dashboard live update: polls the JSON endpoint every data-refresh seconds, updates the numbers,
// the lists and the SVG chart in place (the same bar geometry as dashboard.py's chart_bars).
"use strict";
(function () {
  var root = document.getElementById("dashboard");
  if (!root) { return; }
  var url = root.getAttribute("data-url");
  var refreshMs = Math.max(1, parseFloat(root.getAttribute("data-refresh") || "5")) * 1000;
  var SVG = "http://www.w3.org/2000/svg";

  function get(obj, path) {
    return path.split(".").reduce(function (o, k) { return o == null ? undefined : o[k]; }, obj);
  }

  function iso(ms) {
    return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  function setText(el, value) { if (el.textContent !== String(value)) { el.textContent = String(value); } }

  function drawChart(series) {
    var svg = document.getElementById("chart");
    if (!svg) { return 1; }
    var box = svg.viewBox.baseVal;
    var pad = parseFloat(svg.getAttribute("data-pad") || "24");
    var innerH = box.height - pad;
    var top = Math.max.apply(null, series.map(function (p) { return p.total; }).concat([1]));
    var step = box.width / Math.max(series.length, 1);
    var bars = svg.querySelector("g.bars");
    var axis = svg.querySelector("g.axis");
    while (bars.firstChild) { bars.removeChild(bars.firstChild); }
    while (axis.firstChild) { axis.removeChild(axis.firstChild); }
    series.forEach(function (p, i) {
      var hour = ("0" + Math.floor(p.hour / 3600000) % 24).slice(-2) + ":00";
      [[p.partial ? "bar-total partial" : "bar-total", p.total, hour + ": " + p.total + " attestations, " + p.failed + " failed"],
       ["bar-failed", p.failed, hour + ": " + p.failed + " failed"]].forEach(function (spec) {
        var h = innerH * spec[1] / top;
        var rect = document.createElementNS(SVG, "rect");
        rect.setAttribute("class", spec[0]);
        rect.setAttribute("x", (i * step + 1).toFixed(1));
        rect.setAttribute("y", (innerH - h).toFixed(1));
        rect.setAttribute("width", (step - 2).toFixed(1));
        rect.setAttribute("height", h.toFixed(1));
        var title = document.createElementNS(SVG, "title");
        title.textContent = spec[2];
        rect.appendChild(title);
        bars.appendChild(rect);
      });
      if (i % 3 === 0) {
        var text = document.createElementNS(SVG, "text");
        text.setAttribute("x", (i * step + 1).toFixed(1));
        text.setAttribute("y", String(box.height - 6));
        text.textContent = hour;
        axis.appendChild(text);
      }
    });
    return top;
  }

  function deviceLink(id) {
    var a = document.createElement("a");
    a.href = "/devices/" + encodeURIComponent(id);
    a.textContent = id;
    return a;
  }

  function fillList(id, items, render, empty) {
    var list = document.getElementById(id);
    if (!list) { return; }
    while (list.firstChild) { list.removeChild(list.firstChild); }
    if (!items.length) {
      var li = document.createElement("li");
      li.className = "muted";
      li.textContent = empty;
      list.appendChild(li);
      return;
    }
    items.forEach(function (item) { list.appendChild(render(item)); });
  }

  function update(data) {
    var scale = drawChart(data.series);
    var note = document.getElementById("series-partial");
    if (note) { note.hidden = !data.series_partial; }
    data.scale = scale;
    data.updated = iso(data.generated_at);
    root.querySelectorAll("[data-field]").forEach(function (el) {
      var value = get(data, el.getAttribute("data-field"));
      setText(el, value === undefined ? 0 : value);
    });
    fillList("alert-list", data.alerts.items, function (a) {
      var li = document.createElement("li");
      var sev = document.createElement("span");
      sev.className = "sev sev-" + a.severity;
      sev.textContent = a.severity;
      li.appendChild(sev);
      li.appendChild(document.createTextNode(" "));
      if (a.device_id) { li.appendChild(deviceLink(a.device_id)); li.appendChild(document.createTextNode(" ")); }
      li.appendChild(document.createTextNode(a.message + " "));
      var muted = document.createElement("span");
      muted.className = "muted";
      muted.textContent = "×" + a.count;
      li.appendChild(muted);
      return li;
    }, "No open alerts.");
    fillList("revocation-list", data.revocations, function (r) {
      var li = document.createElement("li");
      li.appendChild(deviceLink(r.device_id));
      li.appendChild(document.createTextNode(" " + iso(r.at) + " "));
      var muted = document.createElement("span");
      muted.className = "muted";
      muted.textContent = r.reason;
      li.appendChild(muted);
      return li;
    }, "No revoked devices.");
  }

  function poll() {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) {
        if (response.status === 401) { window.location.reload(); throw new Error("logged out"); }
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (data) { update(data); root.classList.remove("stale"); })
      .catch(function () { root.classList.add("stale"); })
      .then(function () { window.setTimeout(poll, refreshMs); });
  }

  window.setTimeout(poll, refreshMs);
}());
