// metergate console: one script, no build step. Every figure comes from GET /admin/... (the admin API), read with
// the session cookie; changes send the session's CSRF token. Text is always set with textContent, never as HTML.
"use strict";

(() => {
  const CSRF = document.querySelector('meta[name="csrf-token"]').content;
  const TZ = document.querySelector('meta[name="timezone"]').content;
  const app = document.getElementById("app");
  const live = document.getElementById("live");
  const REFRESH_MS = 10000;
  const COLORS = ["#2563eb", "#d97706", "#059669", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569"];

  // --- formatting ----------------------------------------------------------------------------------------------

  const usd = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const int = new Intl.NumberFormat("en-US");
  const pct = new Intl.NumberFormat("en-US", { style: "percent", maximumFractionDigits: 1 });
  const when = new Intl.DateTimeFormat("en-GB", { timeZone: TZ, dateStyle: "medium", timeStyle: "medium" });
  const money = (v) => (v === null || v === undefined ? "—" : usd.format(v));
  const seconds = (v) => (v === null || v === undefined ? "—" : v < 1 ? `${Math.round(v * 1000)} ms` : `${v.toFixed(2)} s`);
  const isoDay = (d) => d.toLocaleDateString("en-CA", { timeZone: TZ });

  // --- DOM helpers ---------------------------------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function empty(text) {
    return el("p", { class: "empty" }, text);
  }

  // A sortable table. columns: [{key, label, num, fmt, title}]; rows: objects. Click or Enter on a header sorts.
  function table(id, columns, rows, caption) {
    const state = { key: null, dir: 1 };
    const tbody = el("tbody");
    const render = () => {
      const sorted = [...rows];
      if (state.key !== null) {
        sorted.sort((a, b) => {
          const x = a[state.key], y = b[state.key];
          if (x === y) return 0;
          if (x === null || x === undefined) return 1;
          if (y === null || y === undefined) return -1;
          return (x < y ? -1 : 1) * state.dir;
        });
      }
      tbody.replaceChildren(
        ...sorted.map((r) =>
          el("tr", r.__attrs || {}, columns.map((c) => {
            const value = c.fmt ? c.fmt(r[c.key], r) : r[c.key] ?? "—";
            return el("td", { class: c.num ? "num" : null, title: c.title ? c.title(r) : null }, value);
          }))
        )
      );
    };
    const head = el("tr", {}, columns.map((c) => {
      const th = el("th", { scope: "col", class: c.num ? "num" : null, tabindex: "0", "aria-sort": "none" }, c.label);
      const sort = () => {
        state.dir = state.key === c.key ? -state.dir : c.num ? -1 : 1;
        state.key = c.key;
        head.querySelectorAll("th").forEach((h) => h.setAttribute("aria-sort", "none"));
        th.setAttribute("aria-sort", state.dir > 0 ? "ascending" : "descending");
        render();
      };
      th.addEventListener("click", sort);
      th.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } });
      return th;
    }));
    render();
    return el("div", { class: "table-wrap" },
      el("table", { id }, caption ? el("caption", {}, caption) : null, el("thead", {}, head), tbody));
  }

  // --- the admin API -------------------------------------------------------------------------------------------

  async function api(path, options = {}) {
    const headers = { accept: "application/json", ...(options.headers || {}) };
    if (options.method && options.method !== "GET") {
      headers["x-csrf-token"] = CSRF;
      headers["content-type"] = "application/json";
    }
    // The admin API as the console calls it: under /console/, where the session cookie goes (and only there).
    const resp = await fetch(`/console${path}`, { credentials: "same-origin", ...options, headers });
    if (resp.status === 401) {
      location.reload(); // the session ended: the login form
      throw new Error("logged out");
    }
    const body = resp.headers.get("content-type")?.includes("json") ? await resp.json() : await resp.text();
    if (!resp.ok) throw new Error(body?.error?.message || `${resp.status}`);
    return body;
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
    return q.toString();
  }

  // --- charts (uPlot) ------------------------------------------------------------------------------------------

  // points: [{ts, <by>: group, cost_usd}] -> a stacked area chart by group, with the table of its numbers.
  function stackedChart(series, by, title) {
    const points = series.points;
    const times = series.buckets;
    const groups = [...new Set(points.map((p) => p[by] ?? "(none)"))].sort();
    const value = new Map(points.map((p) => [`${p.ts}|${p[by] ?? "(none)"}`, p.cost_usd]));
    const own = groups.map((g) => times.map((t) => value.get(`${t}|${g}`) || 0));
    const stacked = own.map((_, i) => times.map((_, j) => own.slice(0, i + 1).reduce((s, row) => s + row[j], 0)));
    const box = el("figure", { class: "chart" }, el("figcaption", {}, title));
    if (!points.length) {
      box.append(empty("No spend in this period yet."));
      return box;
    }
    const plot = el("div", { class: "plot", role: "img", "aria-label": `${title}: chart; the table below has the figures` });
    box.append(plot);
    const draw = () => {
      if (!window.uPlot) return;
      plot.replaceChildren();
      const width = Math.max(280, plot.clientWidth || 600);
      // Stacked areas: the running totals, drawn from the top of the stack down so each fill shows its own band.
      const order = groups.map((_, i) => i).reverse();
      // eslint-disable-next-line no-new
      new window.uPlot({
        width,
        height: 240,
        tzDate: (ts) => window.uPlot.tzDate(new Date(ts * 1000), TZ),
        scales: { x: { time: true } },
        axes: [{}, { values: (u, vals) => vals.map((v) => usd.format(v)), size: 70 }],
        series: [{}, ...order.map((i) => ({
          label: String(groups[i]),
          stroke: COLORS[i % COLORS.length],
          fill: COLORS[i % COLORS.length] + "55",
          value: (u, v, si, idx) => (idx === null ? "—" : usd.format(own[i][idx])),
        }))],
      }, [times, ...order.map((i) => stacked[i])], plot);
    };
    requestAnimationFrame(draw);
    const rows = points.map((p) => ({ time: p.t, group: p[by] ?? "(none)", cost: p.cost_usd, requests: p.requests }));
    box.append(el("details", {}, el("summary", {}, "The figures behind this chart"),
      table(`${title.replace(/\W+/g, "-").toLowerCase()}-data`, [
        { key: "time", label: "From" },
        { key: "group", label: by },
        { key: "cost", label: "Cost (USD)", num: true, fmt: money },
        { key: "requests", label: "Requests", num: true, fmt: (v) => int.format(v) },
      ], rows)));
    return box;
  }

  // --- pages ---------------------------------------------------------------------------------------------------

  const overviewState = { by: "team", bucket: "day" };

  async function overview() {
    const o = await api("/admin/overview");
    const month = o.periods.month;
    const span = overviewState.bucket === "hour" ? { from: month.to, to: month.to } : { from: month.from, to: month.to };
    const series = await api(`/admin/series?${query({ ...span, bucket: overviewState.bucket, by: overviewState.by })}`);
    const chartControls = el("form", { class: "controls", id: "chart-controls", onchange: (e) => {
      const f = new FormData(e.currentTarget);
      overviewState.by = f.get("by");
      overviewState.bucket = f.get("bucket");
      route(true);
    }, onsubmit: (e) => e.preventDefault() },
    el("label", {}, "Stack by ", el("select", { name: "by" }, ["team", "app", "model"].map((b) => el("option", { value: b, selected: b === overviewState.by }, b)))),
    el("label", {}, "Show ", el("select", { name: "bucket" }, [["day", "this month, by day"], ["hour", "today, by hour"]].map(([v, l]) => el("option", { value: v, selected: v === overviewState.bucket }, l)))));
    const chartTitle = overviewState.bucket === "hour" ? `Hourly spend today, stacked by ${overviewState.by}` : `Daily spend this month, stacked by ${overviewState.by}`;
    const sum = (k) => o.teams.reduce((s, t) => s + t[k], 0);
    const t = o.traffic || {};
    const cards = el("section", { class: "cards", "aria-label": "Totals" },
      card("Today", money(sum("today_usd"))),
      card("This week", money(sum("week_usd"))),
      card("Month to date", money(sum("month_usd"))),
      card("Month-end forecast", money(sum("forecast_month_usd"))),
      card("Error rate", t.requests ? pct.format(t.error_rate) : "—", `${int.format(t.errors || 0)} of ${int.format(t.requests || 0)} requests`),
      card("Latency p50 / p95", `${seconds(t.latency_p50_s)} / ${seconds(t.latency_p95_s)}`, t.source),
    );
    const teams = o.teams.map((r) => ({ ...r, __attrs: { "data-team": r.team } }));
    const teamTable = teams.length ? table("team-spend", [
      { key: "team", label: "Team", fmt: (v) => el("a", { href: `#/team/${encodeURIComponent(v)}` }, v) },
      { key: "today_usd", label: "Today", num: true, fmt: money },
      { key: "week_usd", label: "This week", num: true, fmt: money },
      { key: "month_usd", label: "Month to date", num: true, fmt: money, title: (r) => `$${r.month_usd}` },
      { key: "forecast_month_usd", label: "Forecast (month end)", num: true, fmt: money },
      { key: "budget_month_usd", label: "Monthly budget", num: true, fmt: (v, r) => (v === null ? "—" : `${money(v)} (${r.budget_action})`) },
    ], teams, `Spend by team, ${month.from} to ${month.to} (${TZ})`) : empty("No spend recorded yet. Create a key on the Keys page, point an SDK at the gateway, and spend shows here within seconds.");
    return [
      el("h1", {}, "Overview"),
      cards,
      el("h2", {}, "Spend by team"), teamTable,
      el("h2", {}, "Spend over time"), chartControls,
      stackedChart(series, overviewState.by, chartTitle),
      el("div", { class: "two" },
        el("section", {}, el("h2", {}, "Top models this month"), o.top_models.length ? table("top-models", [
          { key: "model", label: "Model" }, { key: "provider", label: "Provider" },
          { key: "cost_usd", label: "Cost", num: true, fmt: money },
          { key: "requests", label: "Requests", num: true, fmt: (v) => int.format(v) },
        ], o.top_models) : empty("No requests this month.")),
        el("section", {}, el("h2", {}, "Top apps this month"), o.top_apps.length ? table("top-apps", [
          { key: "team", label: "Team" }, { key: "app", label: "App" },
          { key: "cost_usd", label: "Cost", num: true, fmt: money },
          { key: "requests", label: "Requests", num: true, fmt: (v) => int.format(v) },
        ], o.top_apps) : empty("No requests this month."))),
    ];
  }

  function card(label, value, note) {
    return el("div", { class: "card" }, el("div", { class: "label" }, label), el("div", { class: "value num" }, value),
      note ? el("div", { class: "note" }, note) : null);
  }

  async function teams() {
    const o = await api("/admin/overview");
    return [el("h1", {}, "Teams"), o.teams.length ? el("ul", { class: "team-list" }, o.teams.map((t) =>
      el("li", {}, el("a", { href: `#/team/${encodeURIComponent(t.team)}` }, t.team), " ", el("span", { class: "num" }, money(t.month_usd)), " this month")))
      : empty("No teams have spent yet.")];
  }

  const teamState = { by: "app" };

  async function team(name) {
    const o = await api("/admin/overview");
    const from = teamState.from || o.periods.month.from;
    const to = teamState.to || o.periods.month.to;
    const range = { from, to, team: name };
    const dims = ["app", "model", "user", ...o.tag_keys.map((k) => `tag.${k}`)];
    const [series, ...reports] = await Promise.all([
      api(`/admin/series?${query({ ...range, bucket: "day", by: teamState.by })}`),
      ...dims.map((d) => api(`/admin/reports?${query({ ...range, by: d })}`)),
    ]);
    const controls = el("form", { class: "controls", onsubmit: (e) => { e.preventDefault(); const f = new FormData(e.target); teamState.from = f.get("from"); teamState.to = f.get("to"); teamState.by = f.get("by"); route(); } },
      el("label", {}, "From ", el("input", { type: "date", name: "from", value: from })),
      el("label", {}, "To ", el("input", { type: "date", name: "to", value: to })),
      el("label", {}, "Stack by ", el("select", { name: "by" }, ["app", "model"].map((b) => el("option", { value: b, selected: b === teamState.by }, b)))),
      el("button", { type: "submit" }, "Show"));
    const sections = dims.map((d, i) => {
      const rows = reports[i];
      const csv = `/console/admin/reports?${query({ ...range, by: d, format: "csv" })}`;
      return el("section", {}, el("h2", {}, `By ${d}`),
        rows.length ? table(`team-by-${d.replace(".", "-")}`, [
          { key: d, label: d, fmt: (v) => v ?? "(none)" },
          { key: "requests", label: "Requests", num: true, fmt: (v) => int.format(v) },
          { key: "errors", label: "Errors", num: true, fmt: (v) => int.format(v) },
          { key: "tokens_in", label: "Tokens in", num: true, fmt: (v) => int.format(v) },
          { key: "tokens_out", label: "Tokens out", num: true, fmt: (v) => int.format(v) },
          { key: "cost_usd", label: "Cost (USD)", num: true, fmt: money },
        ], rows) : empty("Nothing in this period."),
        el("a", { class: "download", href: csv, download: `${name}-by-${d}-${from}-${to}.csv` }, "Download CSV"));
    });
    return [el("h1", {}, `Team ${name}`), controls,
      stackedChart(series, teamState.by, `Daily spend of ${name}, stacked by ${teamState.by}`), ...sections];
  }

  async function budgets() {
    const [rows, adjustments] = await Promise.all([api("/admin/budgets"), api("/admin/budgets/adjustments")]);
    const active = adjustments.filter((a) => a.kind === "override" && !a.ended_at && a.until * 1000 > Date.now());
    const state = (b) => (b.spent_usd >= b.limit_usd ? "over" : b.spent_usd + b.reserved_usd >= b.limit_usd * b.warn_at ? "warn" : "ok");
    const shaped = rows.map((b) => ({ ...b, state: state(b), __attrs: { class: `state-${state(b)}`, "data-budget": b.id } }));
    return [el("h1", {}, "Budgets"), shaped.length ? table("budgets", [
      { key: "scope", label: "Scope" },
      { key: "user", label: "User", fmt: (v) => v ?? "" },
      { key: "period", label: "Period" },
      { key: "action", label: "Kind", fmt: (v) => (v === "block" ? "hard limit (blocks)" : "alert only") },
      { key: "limit_usd", label: "Limit", num: true, fmt: (v, r) => (r.override ? `${money(v)} (override)` : money(v)) },
      { key: "spent_usd", label: "Spent", num: true, fmt: money },
      { key: "reserved_usd", label: "Reserved", num: true, fmt: money },
      { key: "forecast_usd", label: "Forecast", num: true, fmt: money },
      { key: "state", label: "State", fmt: (v) => el("span", { class: `badge ${v}` }, { ok: "within", warn: "near the limit", over: "over" }[v]) },
      { key: "resets_at", label: "Resets", fmt: (v) => when.format(new Date(v)) },
    ], shaped) : empty("No budgets configured. Add a budgets: section to the config (see the README's Budgets)."),
    el("h2", {}, "Active overrides"), active.length ? table("overrides", [
      { key: "budget", label: "Budget" }, { key: "limit_usd", label: "Limit", num: true, fmt: money },
      { key: "until", label: "Until", fmt: (v) => when.format(new Date(v * 1000)) },
      { key: "created_by", label: "By" }, { key: "reason", label: "Why" },
    ], active) : empty("No override in force.")];
  }

  async function keys() {
    const rows = await api("/admin/keys");
    const result = el("div", { id: "key-result", "aria-live": "polite" });
    const form = el("form", { class: "controls", id: "create-key", onsubmit: async (e) => {
      e.preventDefault();
      const f = new FormData(e.target);
      try {
        const made = await api("/admin/keys", { method: "POST", body: JSON.stringify({ team: f.get("team"), app: f.get("app"), name: f.get("name") }) });
        showKey(result, made);
        e.target.reset();
        refreshTable();
      } catch (err) {
        result.replaceChildren(el("p", { class: "error", role: "alert" }, `Not created: ${err.message}`));
      }
    } },
    el("label", {}, "Team ", el("input", { name: "team", required: true, pattern: "[A-Za-z0-9_.:/-]{1,64}" })),
    el("label", {}, "App ", el("input", { name: "app", required: true, pattern: "[A-Za-z0-9_.:/-]{1,64}" })),
    el("label", {}, "Note ", el("input", { name: "name", maxlength: "200" })),
    el("button", { type: "submit" }, "Create key"));
    const holder = el("div");
    const refreshTable = async () => holder.replaceChildren(keyTable(await api("/admin/keys"), refreshTable));
    holder.replaceChildren(keyTable(rows, refreshTable));
    return [el("h1", {}, "Keys"), form, result, holder];
  }

  function keyTable(rows, refresh) {
    if (!rows.length) return empty("No keys in the ledger yet: create one above.");
    return table("keys", [
      { key: "id", label: "Key id" }, { key: "team", label: "Team" }, { key: "app", label: "App" }, { key: "name", label: "Note" },
      { key: "created_at", label: "Created", fmt: (v) => (v ? when.format(new Date(v * 1000)) : "—") },
      { key: "revoked_at", label: "State", fmt: (v, r) => (v ? "revoked" : revokeButton(r, refresh)) },
    ], rows.map((r) => ({ ...r, __attrs: { "data-key": r.id } })));
  }

  function revokeButton(row, refresh) {
    const cell = el("span");
    const ask = el("button", { type: "button", class: "danger", onclick: () => {
      cell.replaceChildren(
        el("span", {}, `Revoke ${row.id}? `),
        el("button", { type: "button", class: "danger", "data-confirm": row.id, onclick: async () => {
          try { await api(`/admin/keys/${encodeURIComponent(row.id)}`, { method: "DELETE" }); refresh(); }
          catch (err) { cell.replaceChildren(el("span", { class: "error" }, err.message)); }
        } }, "Yes, revoke"),
        " ",
        el("button", { type: "button", onclick: () => cell.replaceChildren(ask) }, "Cancel"));
      cell.querySelector("[data-confirm]").focus();
    } }, "Revoke");
    cell.append(ask);
    return cell;
  }

  function showKey(holder, made) {
    const base = `${location.origin}/v1`;
    const snippet = `from openai import OpenAI\nclient = OpenAI(base_url="${base}", api_key="${made.key}")\nclient.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])`;
    const code = el("code", { id: "new-key" }, made.key);
    const copy = el("button", { type: "button", onclick: async () => {
      try { await navigator.clipboard.writeText(made.key); copy.textContent = "Copied"; } catch { copy.textContent = "Select and copy it"; }
    } }, "Copy");
    holder.replaceChildren(el("div", { class: "notice" },
      el("p", {}, `Key ${made.id} for ${made.team}/${made.app}. It is shown this once: copy it now.`),
      el("p", {}, code, " ", copy),
      el("pre", {}, snippet)));
  }

  const requestState = {};

  async function requests() {
    const params = { limit: 100, ...requestState };
    const rows = await api(`/admin/requests?${query(params)}`);
    const field = (name, label, type = "text") => el("label", {}, `${label} `, el("input", { name, type, value: requestState[name] || "" }));
    const form = el("form", { class: "controls", onsubmit: (e) => {
      e.preventDefault();
      const f = new FormData(e.target);
      for (const k of ["team", "app", "model", "status", "from", "to"]) requestState[k] = f.get(k) || "";
      route();
    } },
    field("team", "Team"), field("app", "App"), field("model", "Model"),
    el("label", {}, "Status ", el("select", { name: "status" }, [["", "any"], ["ok", "ok"], ["error", "error"]].map(([v, l]) => el("option", { value: v, selected: (requestState.status || "") === v }, l)))),
    field("from", "From", "date"), field("to", "To", "date"),
    el("button", { type: "submit" }, "Filter"));
    return [el("h1", {}, "Requests"), form, rows.length ? table("requests", [
      { key: "time", label: "Time", fmt: (v, r) => when.format(new Date(r.started_at * 1000)) },
      { key: "team", label: "Team" }, { key: "app", label: "App" }, { key: "model", label: "Model" },
      { key: "code", label: "Status", num: true },
      { key: "tokens_in", label: "Tokens in", num: true, fmt: (v) => int.format(v) },
      { key: "tokens_out", label: "Tokens out", num: true, fmt: (v) => int.format(v) },
      { key: "cost_usd", label: "Cost", num: true, fmt: (v) => `$${v.toFixed(6)}` },
      { key: "latency_s", label: "Latency", num: true, fmt: seconds },
      { key: "error_type", label: "Error", fmt: (v) => v || "" },
    ], rows) : empty("No requests match. Requests through the gateway appear here as they finish.")];
  }

  // --- routing and live refresh --------------------------------------------------------------------------------

  const pages = { overview, teams, budgets, keys, requests };

  async function route(quiet = false) {
    const [, page = "overview", arg] = location.hash.replace(/^#/, "").split("/");
    const render = page === "team" && arg ? () => team(decodeURIComponent(arg)) : pages[page] || overview;
    document.querySelectorAll("nav a").forEach((a) => {
      const current = a.dataset.page === page || (page === "team" && a.dataset.page === "teams");
      if (current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    });
    try {
      const content = await render();
      app.replaceChildren(...content);
      app.dataset.page = page;
      live.textContent = `Updated ${new Date().toLocaleTimeString("en-GB", { timeZone: TZ })} (${TZ})`;
      if (!quiet) app.focus();
    } catch (err) {
      if (err.message !== "logged out") app.replaceChildren(el("p", { class: "error", role: "alert" }, `Could not load: ${err.message}`));
    }
  }

  window.addEventListener("hashchange", () => route());
  let refreshing = false;
  setInterval(async () => {
    // Live figures, but never under a person typing or confirming something, and never two refreshes at once.
    const busy = app.contains(document.activeElement) && ["INPUT", "SELECT", "BUTTON"].includes(document.activeElement.tagName);
    if (refreshing || busy || document.hidden || ["keys"].includes(app.dataset.page)) return;
    refreshing = true;
    try { await route(true); } finally { refreshing = false; }
  }, REFRESH_MS);
  route(true);
})();
