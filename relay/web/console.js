// The operator console. The admin token lives only in the `token` variable of this closure: it
// is never written to localStorage, sessionStorage, cookies or the URL, and it is sent only in
// the Authorization header of requests to this relay's admin API. Reloading forgets it. A new
// key is held in `shownKey` while its panel is open, and forgotten when it is hidden.
"use strict";

(() => {
  const { t, nodes, fmtInt, fmtCredits, fmtUtc } = window.RelayI18n;
  const origin = window.location.origin;
  const REFRESH_MS = 3000;
  let token = null;
  let view = "overview";
  let timer = null;
  let keys = []; // the last GET /admin/keys
  let packages = [];
  let accounts = [];
  let overview = null;
  let usage = null;
  let shownKey = null; // a key just created, until its panel is hidden
  let lastUpdate = null;
  let unreachable = false;

  const $ = (id) => document.getElementById(id);

  function element(tag, attributes, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else if (value !== undefined && value !== null) node.setAttribute(name, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  // -- talking to the admin API -------------------------------------------------------------

  class AdminError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body, withToken) {
    const headers = { Authorization: "Bearer " + (withToken || token) };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (error) {
      throw new AdminError(0, t("console.err.unreachable"));
    }
    if (path.includes("format=csv") && response.ok) return response.blob();
    let answer = null;
    try {
      answer = await response.json();
    } catch (error) {
      answer = null;
    }
    if (!response.ok) {
      const detail = answer && answer.error ? answer.error : {};
      throw new AdminError(response.status, detail.message || String(response.status), detail.code);
    }
    return answer;
  }

  function show(id, text, kind) {
    const node = $(id);
    node.textContent = text;
    node.className = "message " + (kind || "error");
    node.hidden = false;
  }

  function hide(id) {
    $(id).hidden = true;
    $(id).textContent = "";
  }

  /** What went wrong, in the page's language (the relay's own message stays English). */
  function explain(error) {
    if (error.status === 0) return t("console.err.unreachable");
    if (error.status === 401) return t("console.err.wrongToken");
    if (error.code === "admin_disabled") return t("console.err.disabled");
    return t("console.err.refused", { status: error.status }) + " " + error.message;
  }

  // -- signing in and out -------------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    const candidate = $("token-input").value.trim();
    if (!candidate) {
      show("login-message", t("console.err.noToken"));
      return;
    }
    $("sign-in").disabled = true;
    show("login-message", t("console.signingIn"), "info");
    try {
      overview = await api("GET", "/admin/overview", undefined, candidate);
    } catch (error) {
      show("login-message", explain(error));
      return;
    } finally {
      $("sign-in").disabled = false;
    }
    token = candidate;
    $("token-input").value = "";
    hide("login-message");
    $("login").hidden = true;
    $("app").hidden = false;
    lastUpdate = new Date();
    try {
      packages = (await api("GET", "/admin/packages")).data;
    } catch (error) {
      packages = [];
      show("app-message", explain(error));
    }
    renderPackages();
    select("overview");
    timer = setInterval(tick, REFRESH_MS);
  }

  function signOut(reason) {
    token = null;
    shownKey = null;
    keys = [];
    accounts = [];
    overview = null;
    usage = null;
    clearInterval(timer);
    timer = null;
    $("app").hidden = true;
    $("login").hidden = false;
    $("new-key").hidden = true;
    $("new-key-value").textContent = "";
    $("new-key-snippets").replaceChildren();
    for (const body of document.querySelectorAll("#app tbody")) body.replaceChildren();
    for (const id of ["chart-day", "chart-model", "chart-key", "usage-key", "processes"]) {
      $(id).replaceChildren();
    }
    $("key-search").value = "";
    hide("app-message");
    if (reason) show("login-message", reason);
    else show("login-message", t("console.signedOut"), "info");
    $("token-input").focus();
  }

  // -- views --------------------------------------------------------------------------------

  function select(name) {
    view = name;
    for (const tab of document.querySelectorAll("[role=tab]")) {
      const on = tab.dataset.view === name;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
      $("view-" + tab.dataset.view).hidden = !on;
    }
    refresh();
  }

  async function refresh() {
    if (!token) return;
    try {
      if (view === "overview") {
        overview = await api("GET", "/admin/overview");
        renderOverview();
      } else if (view === "accounts") {
        accounts = (await api("GET", "/admin/accounts")).data;
        renderAccounts();
      } else if (view === "keys") {
        keys = (await api("GET", "/admin/keys")).data;
        renderKeys();
      } else if (view === "usage") {
        await loadUsage();
      }
      unreachable = false;
      lastUpdate = new Date();
      hide("app-message");
    } catch (error) {
      if (error.status === 401 || error.code === "admin_disabled") {
        signOut(explain(error));
        return;
      }
      unreachable = error.status === 0;
      show("app-message", explain(error));
    }
    renderLiveStatus();
  }

  function tick() {
    // The live views follow by themselves; keys and usage when asked (or after an action).
    if (view === "overview" || view === "accounts") refresh();
  }

  function renderLiveStatus() {
    const node = $("live-status");
    node.className = "live" + (unreachable ? " bad" : "");
    if (unreachable) node.textContent = t("console.live.unreachable");
    else if (lastUpdate) node.textContent = t("console.live.updated", { time: fmtUtc(lastUpdate / 1000, true) });
  }

  function figure(id, value, format) {
    const node = $(id);
    node.dataset.value = String(value);
    node.textContent = format(value);
  }

  function emptyRow(body, columns, text) {
    body.append(element("tr", {}, [element("td", { colspan: String(columns), className: "empty",
      text })]));
  }

  function renderOverview() {
    const data = overview;
    const recent = data.recent;
    figure("ov-rps", recent.calls / data.window_s, (v) => v.toFixed(2));
    figure("ov-tpm", recent.total_tokens * (60 / data.window_s), fmtInt);
    figure("ov-requests", recent.calls, fmtInt);
    figure("ov-errors", recent.errors, fmtInt);
    figure("ov-credits", recent.credits, fmtCredits);
    figure("ov-keys", data.keys, fmtInt);
    figure("ov-in-flight", data.active_requests, fmtInt);
    figure("ov-queued", data.queued, fmtInt);
    figure("ov-acc-ok", data.accounts.ok, fmtInt);
    figure("ov-acc-cooling", data.accounts.cooling, fmtInt);
    figure("ov-acc-out", data.accounts.out_of_service, fmtInt);
    $("ov-acc-cooling").classList.toggle("warn", data.accounts.cooling > 0);
    $("ov-acc-out").classList.toggle("negative", data.accounts.out_of_service > 0);
    const body = $("pools-table").tBodies[0];
    body.replaceChildren();
    const pools = Object.entries(data.pools);
    if (!pools.length) emptyRow(body, 5, t("console.ov.noPools"));
    for (const [name, pool] of pools) {
      body.append(element("tr", { "data-pool": name }, [
        element("td", { className: "name", translate: "no", text: name }),
        element("td", { className: "num in-flight", text: fmtInt(pool.in_flight) }),
        element("td", { className: "num capacity", text: pool.max_concurrency === null ||
          pool.max_concurrency === undefined ? t("console.unlimited") : fmtInt(pool.max_concurrency) }),
        element("td", { className: "num queued", text: fmtInt(pool.queued) }),
        element("td", { className: "num wait", text: pool.oldest_wait_s.toFixed(1) + " s" }),
      ]));
    }
    const processes = $("processes");
    if (!data.shared) {
      processes.replaceChildren(element("p", { className: "empty-state",
        text: t("console.ov.noRedis") }));
    } else {
      const list = element("ul", { className: "processes" });
      for (const owner of data.shared.processes) {
        const depths = data.shared.queued_per_process[owner] || {};
        const waiting = Object.values(depths).reduce((sum, n) => sum + Number(n || 0), 0);
        list.append(element("li", {}, [
          element("code", { translate: "no", text: owner }),
          element("span", { text: " · " + t("console.ov.processQueued", { n: waiting }) }),
        ]));
      }
      processes.replaceChildren(
        element("p", { className: data.shared.degraded ? "message error" : "subtitle",
          text: data.shared.degraded ? t("console.ov.degraded")
            : t("console.ov.processCount", { n: data.shared.processes.length }) }),
        list,
      );
    }
  }

  /** "ok", "cooling until 12:03:04 UTC (598 s)", or "out of service: why": the kind, and the
   * text as nodes (the upstream's error, quoted as it is, marked as not to translate). */
  function health(account) {
    if (account.missing_credentials) return { kind: "out", text: nodes("console.acc.missing") };
    if (account.disabled) {
      const refused = /^(401|403)\b/.exec(account.last_error || "");
      if (refused) return { kind: "out", text: nodes("console.acc.outRefused", { status: refused[1] }) };
      return { kind: "out", text: account.last_error
        ? nodes("console.acc.outBecause", { error: account.last_error })
        : nodes("console.acc.outOperator") };
    }
    if (account.cooling_down_s) {
      const until = Date.now() / 1000 + account.cooling_down_s;
      return { kind: "cooling", text: nodes("console.acc.cooling", { time: fmtUtc(until, true),
        s: Math.ceil(account.cooling_down_s) }) };
    }
    return { kind: "ok", text: nodes("console.acc.ok") };
  }

  /** A ChatGPT-plan account's usage windows as its backend reported them ("5 h: 42% used,
   * resets 14:00:00 UTC · 7 d: …"); "–" for accounts that report none. */
  function usageWindows(account) {
    const windows = Object.values((account.oauth && account.oauth.usage_windows) || {});
    if (!windows.length) return "–";
    return windows.map((w) => {
      const minutes = w.window_minutes || 0;
      const span = minutes >= 1440 ? t("console.acc.days", { n: Math.round(minutes / 1440) })
        : t("console.acc.hours", { n: Math.round(minutes / 60) });
      return t("console.acc.window", { span, used: Math.round(w.used_percent),
        time: w.resets_at ? fmtUtc(w.resets_at, true) : "–" });
    }).join(" · ");
  }

  function renderAccounts() {
    const body = $("accounts-table").tBodies[0];
    body.replaceChildren();
    if (!accounts.length) emptyRow(body, 9, t("console.acc.none"));
    for (const account of accounts) {
      const state = health(account);
      const failures = Object.entries(account.failures || {});
      const out = state.kind !== "ok"; // out of service or cooling down: put it back
      // An account without its credential cannot be put back from here: its variable is unset.
      const action = account.missing_credentials
        ? element("span", { className: "hint", text: t("console.acc.setVariable") })
        : element("button", { type: "button", className: "small",
          "data-action": out ? "enable" : "disable",
          text: out ? t("console.acc.putBack") : t("console.acc.takeOut") });
      if (!account.missing_credentials) {
        action.addEventListener("click", () => setService(account, out ? "enable" : "disable"));
      }
      body.append(element("tr", { "data-account": account.name, "data-health": state.kind }, [
        element("td", { className: "name", translate: "no", text: account.name }),
        element("td", { translate: "no", text: account.provider }),
        element("td", { translate: "no", text: account.pool }),
        element("td", { className: "health " + state.kind }, [
          element("span", { className: "badge " + state.kind }, state.text)]),
        element("td", { className: "num in-flight", text: fmtInt(account.in_flight || 0) }),
        element("td", { className: "windows", text: usageWindows(account) }),
        element("td", { className: "failures", translate: "no",
          text: failures.length ? failures.map(([code, n]) => code + "×" + n).join(" ") : "–" }),
        element("td", { className: "last-error", translate: "no",
          text: account.last_error || "–" }),
        element("td", {}, [action]),
      ]));
    }
  }

  async function setService(account, action) {
    try {
      await api("POST", "/admin/accounts/" + encodeURIComponent(account.name) + "/" + action);
      show("app-message", t(action === "enable" ? "console.acc.putBackDone"
        : "console.acc.takeOutDone", { name: account.name }), "info");
      accounts = (await api("GET", "/admin/accounts")).data;
      renderAccounts();
    } catch (error) {
      show("app-message", explain(error));
    }
  }

  // -- keys ---------------------------------------------------------------------------------

  function renderPackages() {
    const choice = $("create-package");
    choice.replaceChildren(...packages.map((p) => element("option", { value: p.name,
      translate: "no", text: p.name })));
  }

  function keyStatus(key) {
    if (key.revoked_at) return { kind: "out", text: t("console.keys.revoked") };
    if (key.expired) return { kind: "out", text: t("console.keys.expired") };
    return { kind: "ok", text: t("console.keys.active") };
  }

  function renderKeys() {
    const body = $("keys-table").tBodies[0];
    body.replaceChildren();
    const needle = $("key-search").value.trim().toLowerCase();
    const shown = keys.filter((key) => !needle || [key.name, key.hint, key.id, key.package]
      .some((field) => (field || "").toLowerCase().includes(needle)));
    if (!keys.length) emptyRow(body, 8, t("console.keys.none"));
    else if (!shown.length) emptyRow(body, 8, t("console.keys.noMatch"));
    for (const key of shown) {
      const state = keyStatus(key);
      const buttons = element("div", { className: "buttons" });
      const actions = element("td", { className: "actions" }, [buttons]);
      if (!key.revoked_at) {
        for (const [action, label] of [["topup", "console.keys.topUp"],
          ["limits", "console.keys.limits"], ["revoke", "console.keys.revoke"]]) {
          const button = element("button", { type: "button", className: "small",
            "data-action": action, text: t(label) });
          button.addEventListener("click", () => openDialog(action, key));
          buttons.append(button);
        }
      }
      body.append(element("tr", { "data-key-id": key.id, "data-status": state.kind }, [
        element("td", { className: "name", translate: "no", text: key.name || "–" }),
        element("td", { className: "hint", translate: "no", title: key.id, text: key.hint }),
        element("td", { translate: "no", text: key.package }),
        element("td", { className: "num credits", "data-value": String(key.credits.remaining),
          text: fmtCredits(key.credits.remaining) }),
        element("td", { className: "num calls", text: fmtInt(key.usage.calls) }),
        element("td", { className: "last-used", text: key.usage.last_used_at
          ? fmtUtc(key.usage.last_used_at) : t("console.keys.never") }),
        element("td", {}, [element("span", { className: "badge " + state.kind, text: state.text })]),
        actions,
      ]));
    }
  }

  async function createKey(event) {
    event.preventDefault();
    const body = { package: $("create-package").value, name: $("create-name").value.trim() };
    const credits = $("create-credits").value.trim();
    if (credits) body.credits = Number(credits);
    const expires = $("create-expires").value.trim();
    if (expires) body.expires_in = expires;
    try {
      const created = await api("POST", "/admin/keys", body);
      shownKey = created.key;
      $("create-form").reset();
      renderNewKey(created);
      keys = (await api("GET", "/admin/keys")).data;
      renderKeys();
      hide("app-message");
      $("new-key-copy").focus();
    } catch (error) {
      show("app-message", explain(error));
    }
  }

  function newKeySnippets(key) {
    return [
      { id: "codex", title: t("console.snip.codex"), text: `model_provider = "relay"

[model_providers.relay]
name = "OpenAI"
base_url = "${origin}/openai"
wire_api = "responses"
supports_websockets = true
experimental_bearer_token = "${key}"
` },
      { id: "env", title: t("console.snip.env"), text: `export OPENAI_BASE_URL="${origin}/v1"
export OPENAI_API_KEY="${key}"
export ANTHROPIC_BASE_URL="${origin}"
export ANTHROPIC_AUTH_TOKEN="${key}"
` },
      { id: "curl", title: t("console.snip.curl"), text: `curl ${origin}/v1/balance -H "Authorization: Bearer ${key}"
` },
    ];
  }

  function renderNewKey(created) {
    $("new-key").hidden = false;
    $("new-key").dataset.keyId = created.id;
    $("new-key-value").textContent = shownKey;
    const container = $("new-key-snippets");
    container.replaceChildren();
    for (const snippet of newKeySnippets(shownKey)) {
      const button = element("button", { type: "button", className: "copy", text: t("common.copy") });
      button.addEventListener("click", () => copy(snippet.text, button));
      container.append(element("figure", { className: "snippet", "data-snippet": snippet.id }, [
        element("figcaption", {}, [element("span", { text: snippet.title }), button]),
        element("pre", { translate: "no" }, [element("code", { text: snippet.text })]),
      ]));
    }
    const more = element("p", { className: "subtitle" }, [
      element("span", { text: t("console.keys.workbench") + " " }),
      element("a", { href: "/workbench", text: origin + "/workbench", translate: "no" }),
    ]);
    container.append(more);
  }

  function hideNewKey() {
    shownKey = null;
    $("new-key").hidden = true;
    $("new-key-value").textContent = "";
    $("new-key-snippets").replaceChildren();
  }

  async function copy(text, button) {
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
      } else {
        const area = element("textarea", { class: "offscreen", readonly: "" });
        area.value = text;
        document.body.append(area);
        area.select();
        document.execCommand("copy");
        area.remove();
      }
      button.textContent = t("common.copied");
    } catch (error) {
      button.textContent = t("common.copyFailed");
    }
    setTimeout(() => { button.textContent = t("common.copy"); }, 1500);
  }

  // -- the dialog (top up, limits, revoke) ----------------------------------------------------

  const LIMITS = ["tpm", "rpm", "max_concurrency", "max_queue", "queue_timeout_s", "weight"];
  let dialogAction = null;

  function field(name, label, attributes) {
    return element("label", { className: "field" }, [
      element("span", { text: label }),
      element("input", { name, id: "dialog-" + name, ...attributes }),
    ]);
  }

  function openDialog(action, key) {
    dialogAction = { action, key };
    const fields = $("dialog-fields");
    fields.replaceChildren();
    hide("dialog-message");
    const who = (key.name ? key.name + " · " : "") + key.hint;
    const describe = (extra) => $("dialog-text").replaceChildren(
      element("span", { translate: "no", text: who }), extra ? " · " + extra : "");
    describe();
    if (action === "topup") {
      $("dialog-title").textContent = t("console.dlg.topUpTitle");
      fields.append(field("credits", t("console.dlg.amount"),
        { type: "number", step: "any", required: "", inputmode: "decimal" }));
      fields.append(field("note", t("console.dlg.note"), { type: "text", maxlength: "200" }));
      $("dialog-ok").textContent = t("console.keys.topUp");
    } else if (action === "limits") {
      $("dialog-title").textContent = t("console.dlg.limitsTitle");
      const own = key.limits || {};
      const pkg = packages.find((p) => p.name === key.package);
      for (const name of LIMITS) {
        const inherited = pkg ? pkg.limits[name] : null;
        fields.append(field(name, t("console.limit." + name), {
          type: "number", step: "any", min: "0", value: own[name] ?? "",
          placeholder: t("console.dlg.fromPackage", { value: inherited ?? t("console.unlimited") }),
        }));
      }
      describe(t("console.dlg.limitsHint"));
      $("dialog-ok").textContent = t("common.save");
    } else {
      $("dialog-title").textContent = t("console.dlg.revokeTitle");
      describe(t("console.dlg.revokeText"));
      $("dialog-ok").textContent = t("console.keys.revoke");
    }
    $("dialog-ok").classList.toggle("danger", action === "revoke");
    $("dialog").showModal();
    const first = fields.querySelector("input");
    (first || $("dialog-ok")).focus();
  }

  async function confirmDialog(event) {
    event.preventDefault();
    const { action, key } = dialogAction;
    const path = "/admin/keys/" + encodeURIComponent(key.id);
    try {
      if (action === "topup") {
        const credits = Number($("dialog-credits").value);
        await api("POST", path + "/topup", { credits, note: $("dialog-note").value });
      } else if (action === "limits") {
        const body = { clear: true };
        for (const name of LIMITS) {
          const text = $("dialog-" + name).value.trim();
          if (text) body[name] = Number(text);
        }
        await api("POST", path + "/limits", body);
      } else {
        await api("POST", path + "/revoke");
      }
    } catch (error) {
      show("dialog-message", explain(error));
      return;
    }
    $("dialog").close();
    const done = { topup: "console.keys.topUpDone", limits: "console.keys.limitsDone",
      revoke: "console.keys.revokeDone" }[action];
    show("app-message", t(done, { key: key.hint }), "info");
    keys = (await api("GET", "/admin/keys")).data;
    renderKeys();
  }

  // -- usage charts (inline SVG, drawn here: no library) --------------------------------------

  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmtAxis(value) {
    if (value === 0) return "0";
    const short = (number) => String(Number(number.toPrecision(3)));
    if (value >= 1e6) return short(value / 1e6) + "M";
    if (value >= 1e4) return short(value / 1e3) + "k";
    return short(value);
  }

  function fmtMetric(metric, value) {
    return metric === "credits" ? fmtCredits(value) : fmtInt(value);
  }

  function dayStart(daysBack) {
    const now = new Date();
    return Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() - daysBack) / 1000;
  }

  async function loadUsage() {
    const days = Number($("usage-days").value);
    const from = dayStart(days - 1);
    const chosen = $("usage-key").value;
    const filter = chosen ? "&key_id=" + encodeURIComponent(chosen) : "";
    const base = "/admin/usage?from=" + from + filter + "&group_by=";
    const [perDay, perModel, perKey, keyList] = await Promise.all([
      api("GET", base + "day"), api("GET", base + "model"), api("GET", base + "key"),
      api("GET", "/admin/keys"),
    ]);
    keys = keyList.data;
    usage = { perDay, perModel, perKey, days, from };
    renderKeyChoices();
    renderUsage();
  }

  function renderKeyChoices() {
    const choice = $("usage-key");
    const current = choice.value;
    choice.replaceChildren(element("option", { value: "", text: t("console.usage.allKeys") }),
      ...keys.map((key) => element("option", { value: key.id, translate: "no",
        text: (key.name ? key.name + " · " : "") + key.hint })));
    choice.value = keys.some((key) => key.id === current) ? current : "";
  }

  function renderUsage() {
    if (!usage) return;
    const metric = $("usage-metric").value;
    $("usage-empty").hidden = usage.perDay.totals.calls > 0;
    const byDay = new Map(usage.perDay.data.map((row) => [row.day, row]));
    const buckets = [];
    for (let index = 0; index < usage.days; index += 1) {
      const label = new Date((usage.from + index * 86400) * 1000).toISOString().slice(0, 10);
      const row = byDay.get(label);
      buckets.push({ label, short: label.slice(5), value: row ? row[metric] : 0 });
    }
    $("chart-day").replaceChildren(columns(buckets, metric));
    $("chart-model").replaceChildren(bars(usage.perModel.data.map((row) => ({
      label: row.model, value: row[metric] })), metric));
    $("chart-key").replaceChildren(bars(usage.perKey.data.map((row) => ({
      label: (row.name ? row.name + " · " : "") + row.hint, value: row[metric] })), metric));
  }

  function columns(buckets, metric) {
    const width = 720;
    const height = 200;
    const left = 64;
    const bottom = 26;
    const top = 10;
    const plotWidth = width - left - 8;
    const plotHeight = height - top - bottom;
    const max = Math.max(...buckets.map((bucket) => bucket.value), 0);
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%",
      class: "chart-svg", "data-metric": metric, "data-max": String(max) });
    for (const fraction of [0, 0.5, 1]) {
      const y = top + plotHeight - fraction * plotHeight;
      chart.append(svg("line", { x1: left, x2: width - 8, y1: y, y2: y, class: "grid-line" }));
      chart.append(svg("text", { x: left - 6, y: y + 4, class: "axis", "text-anchor": "end" },
        fmtAxis(max * fraction)));
    }
    const slot = plotWidth / buckets.length;
    buckets.forEach((bucket, index) => {
      const barHeight = max ? (bucket.value / max) * plotHeight : 0;
      const x = left + index * slot + slot * 0.15;
      const bar = svg("rect", { x, y: top + plotHeight - barHeight, width: slot * 0.7,
        height: barHeight, rx: 2, class: bucket.value ? "bar" : "bar empty",
        "data-label": bucket.label, "data-value": String(bucket.value) });
      bar.append(svg("title", {}, bucket.label + ": " + fmtMetric(metric, bucket.value)));
      chart.append(bar);
      if (index % (buckets.length > 14 ? 3 : 1) === 0) {
        chart.append(svg("text", { x: x + slot * 0.35, y: height - 8, class: "axis",
          "text-anchor": "middle" }, bucket.short));
      }
    });
    return chart;
  }

  function bars(rows, metric) {
    if (!rows.length) return element("p", { className: "empty-state", text: t("console.usage.none") });
    rows = [...rows].sort((a, b) => b.value - a.value);
    const max = Math.max(...rows.map((row) => row.value), 0);
    const rowHeight = 26;
    const width = 360;
    const labelWidth = 130;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${rows.length * rowHeight}`,
      width: "100%", class: "chart-svg bars", "data-metric": metric });
    rows.forEach((row, index) => {
      const y = index * rowHeight;
      const length = max ? (row.value / max) * (width - labelWidth - 90) : 0;
      chart.append(svg("text", { x: labelWidth - 6, y: y + 17, class: "axis label",
        "text-anchor": "end" }, row.label.length > 20 ? row.label.slice(0, 19) + "…" : row.label));
      const bar = svg("rect", { x: labelWidth, y: y + 5, width: Math.max(length, 1), height: 16,
        rx: 2, class: "bar", "data-label": row.label, "data-value": String(row.value) });
      bar.append(svg("title", {}, row.label + ": " + fmtMetric(metric, row.value)));
      chart.append(bar);
      chart.append(svg("text", { x: labelWidth + length + 6, y: y + 17, class: "axis" },
        fmtAxis(row.value)));
    });
    return chart;
  }

  async function exportCsv(group) {
    if (!usage) return;
    const chosen = $("usage-key").value;
    const filter = chosen ? "&key_id=" + encodeURIComponent(chosen) : "";
    try {
      const blob = await api("GET", "/admin/usage?format=csv&group_by=" + group + "&from=" +
        usage.from + filter);
      const link = element("a", { href: URL.createObjectURL(blob),
        download: "relay-usage-" + group + ".csv" });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    } catch (error) {
      show("app-message", explain(error));
    }
  }

  // -- wiring -------------------------------------------------------------------------------

  function rerender() {
    // The language changed: draw what is shown again in it.
    if (!token) return;
    if (overview) renderOverview();
    renderAccounts();
    renderKeys();
    if (usage) {
      renderKeyChoices();
      renderUsage();
    }
    if (shownKey) renderNewKey({ id: $("new-key").dataset.keyId });
    renderLiveStatus();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("token-input").value = "";
    $("login-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut());
    const tabs = [...document.querySelectorAll("[role=tab]")];
    for (const tab of tabs) {
      tab.addEventListener("click", () => select(tab.dataset.view));
      tab.addEventListener("keydown", (event) => {
        const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
        if (!step) return;
        const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
        next.focus();
        select(next.dataset.view);
      });
    }
    $("create-form").addEventListener("submit", createKey);
    $("new-key-copy").addEventListener("click", () => copy(shownKey, $("new-key-copy")));
    $("new-key-hide").addEventListener("click", hideNewKey);
    $("key-search").addEventListener("input", renderKeys);
    $("keys-refresh").addEventListener("click", refresh);
    $("usage-refresh").addEventListener("click", refresh);
    $("usage-days").addEventListener("change", refresh);
    $("usage-key").addEventListener("change", refresh);
    $("usage-metric").addEventListener("change", renderUsage);
    for (const button of document.querySelectorAll("[data-export]")) {
      button.addEventListener("click", () => exportCsv(button.dataset.export));
    }
    $("dialog-form").addEventListener("submit", confirmDialog);
    $("dialog-cancel").addEventListener("click", () => $("dialog").close());
    window.RelayI18n.onChange(rerender);
  });
})();
