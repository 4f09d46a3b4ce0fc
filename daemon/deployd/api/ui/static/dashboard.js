// The dashboard's only script: live updates and confirmations. No inline script anywhere
// (the Content-Security-Policy forbids it); no polling: the page listens to the daemon's
// event stream and fetches its own server-rendered fragment again when something happened.
"use strict";
(function () {
  // Buttons that change things ask first: <form data-confirm="…">.
  document.addEventListener("submit", function (ev) {
    var text = ev.target.getAttribute("data-confirm");
    if (text && !window.confirm(text)) {
      ev.preventDefault();
    }
  });

  var live = document.getElementById("live");
  var state = document.getElementById("live-state");
  var url = live && live.getAttribute("data-fragment");
  if (!url || !window.EventSource) {
    return;
  }

  function show(text, cls) {
    if (state) {
      state.textContent = text;
      state.className = "badge " + cls;
    }
  }

  var busy = false;
  var again = false;
  var timer = null;

  function editing() {
    var el = document.activeElement;
    return el && live.contains(el) && /^(INPUT|SELECT|TEXTAREA)$/.test(el.tagName);
  }

  function refresh() {
    if (busy) {
      again = true;
      return;
    }
    if (editing()) {  // do not replace a field someone is typing in; later
      schedule(500);
      return;
    }
    busy = true;
    fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (res) {
        if (!res.ok) {
          throw new Error("HTTP " + res.status);
        }
        return res.text();
      })
      .then(function (html) {
        var open = [];
        live.querySelectorAll("details[open][id]").forEach(function (d) { open.push(d.id); });
        live.innerHTML = html;
        open.forEach(function (id) {
          var d = document.getElementById(id);
          if (d) { d.open = true; }
        });
        live.setAttribute("data-updated", String(Date.now()));
      })
      .catch(function () { show("update failed", "failed"); })
      .then(function () {
        busy = false;
        if (again) {
          again = false;
          refresh();
        }
      });
  }

  function schedule(ms) {
    if (timer === null) {
      timer = window.setTimeout(function () { timer = null; refresh(); }, ms);
    }
  }

  var after = live.getAttribute("data-last-event") || "";
  var stream = new EventSource("/api/v1/events/stream" + (after ? "?after=" + encodeURIComponent(after) : ""));
  stream.onopen = function () { show("live", "ok"); };
  stream.onerror = function () { show("reconnecting", "warning"); };
  stream.onmessage = function () { schedule(50); };  // a burst of events: one fetch
})();
