// The status page: polls /api/groups every second and updates the tables in place.
"use strict";

(function () {
  const REFRESH_MS = 1000;
  const COLUMNS = [
    ["name", "Upstream"],
    ["state", "State"],
    ["weight", "Weight"],
    ["active", "In flight"],
    ["rate", "Req/s"],
    ["requests", "Requests"],
    ["pinned", "Pinned"],
  ];

  let token = readToken();
  // a token pasted into the address bar of the open page counts too
  window.addEventListener("hashchange", () => {
    token = readToken();
  });
  // requests per upstream at the previous refresh, to turn totals into rates
  let previous = null;

  function readToken() {
    const match = /(?:^#|&)token=([^&]*)/.exec(window.location.hash);
    if (match) {
      sessionStorage.setItem("stickyproxy-token", decodeURIComponent(match[1]));
      // keep the token out of the address bar and the history
      history.replaceState(null, "", window.location.pathname);
    }
    return sessionStorage.getItem("stickyproxy-token");
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(kind, text) {
    const status = document.getElementById("status");
    status.className = "status-" + kind;
    status.textContent = text;
  }

  function groupSection(group) {
    const id = "group-" + group.name;
    let section = document.getElementById(id);
    if (section) return section;

    section = element("section", "group");
    section.id = id;
    section.dataset.group = group.name;
    const head = element("div", "group-head");
    head.append(element("h2", "", group.name), element("span", "facts"));
    const table = element("table");
    const row = element("tr");
    for (const [, title] of COLUMNS) row.append(element("th", "", title));
    table.append(element("thead"), element("tbody"));
    table.tHead.append(row);
    section.append(head, table);
    document.getElementById("groups").append(section);
    return section;
  }

  function upstreamRow(tbody, upstream) {
    for (const row of tbody.rows) {
      if (row.dataset.upstream === upstream.name) return row;
    }
    const row = element("tr");
    row.dataset.upstream = upstream.name;
    for (const [field] of COLUMNS) {
      const cell = element("td");
      cell.dataset.field = field;
      row.append(cell);
    }
    tbody.append(row);
    return row;
  }

  function renderFacts(facts, group, rate) {
    facts.textContent = "";
    facts.append(`policy ${group.policy} \u00b7 ${rate} req/s \u00b7 drift `);
    const drift = element("span", "drift", group.sticky ? String(group.drift) : "n/a");
    drift.dataset.field = "drift";
    if (group.drift > 0) drift.classList.add("drift-nonzero");
    facts.append(drift);
    if (group.redis) {
      const redis = group.redis.connected ? "connected" : "DISCONNECTED";
      facts.append(` \u00b7 Redis ${redis}, ${group.redis.errors} errors`);
    }
  }

  function renderState(cell, upstream) {
    const badge = element("span", "state state-" + upstream.state, upstream.state);
    cell.textContent = "";
    cell.append(badge);
    const tallies = Object.entries(upstream.states || {});
    if (tallies.length > 1) {
      const text = tallies.map(([state, count]) => `${count} ${state}`).join(", ");
      cell.append(element("span", "mixed", `workers: ${text}`));
    }
  }

  function render(data, now) {
    const totals = new Map();
    const seconds = previous ? (now - previous.time) / 1000 : 0;
    let requests = 0;

    for (const group of data.groups) {
      const section = groupSection(group);
      const tbody = section.querySelector("tbody");
      const names = new Set();
      let groupRate = 0;

      for (const upstream of group.upstreams) {
        const key = group.name + "/" + upstream.id;
        totals.set(key, upstream.requests);
        requests += upstream.requests;
        names.add(upstream.name);

        let rate = "\u2013";
        if (seconds > 0 && previous.totals.has(key)) {
          const perSecond = Math.max(0, upstream.requests - previous.totals.get(key)) / seconds;
          groupRate += perSecond;
          rate = perSecond.toFixed(1);
        }

        const row = upstreamRow(tbody, upstream);
        row.dataset.state = upstream.state;
        for (const cell of row.cells) {
          const field = cell.dataset.field;
          if (field === "state") renderState(cell, upstream);
          else if (field === "rate") cell.textContent = rate;
          else if (field === "pinned") cell.textContent = upstream.pinned ?? "\u2013";
          else cell.textContent = String(upstream[field]);
        }
      }
      for (const row of Array.from(tbody.rows)) {
        if (!names.has(row.dataset.upstream)) row.remove();
      }
      renderFacts(section.querySelector(".facts"), group, groupRate.toFixed(1));
    }

    const present = new Set(data.groups.map((group) => "group-" + group.name));
    for (const section of document.querySelectorAll("section.group")) {
      if (!present.has(section.id)) section.remove();
    }
    document.getElementById("summary").textContent =
      `${data.workers.length} worker(s) \u00b7 ${requests} requests since start`;
    previous = { time: now, totals };
  }

  async function refresh() {
    try {
      const headers = token ? { Authorization: "Bearer " + token } : {};
      const response = await fetch("api/groups", { headers, cache: "no-store" });
      if (response.status === 401) {
        throw new Error("a token is required: open this page as /#token=...");
      }
      if (!response.ok) throw new Error(`the API answered ${response.status}`);
      render(await response.json(), performance.now());
      setStatus("live", "live \u00b7 " + new Date().toLocaleTimeString());
    } catch (error) {
      setStatus("error", error.message);
    } finally {
      window.setTimeout(refresh, REFRESH_MS);
    }
  }

  refresh();
})();
