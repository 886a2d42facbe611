// The key workbench. The key lives only in the `key` variable of this closure: it is never
// written to localStorage, sessionStorage, cookies or the URL, and it is sent only in the
// Authorization header of requests to this relay (same origin). Reloading the page forgets it.
"use strict";

(() => {
  const { t, nodes } = window.RelayI18n;
  const PLACEHOLDER_KEY = "cr_…";
  const origin = window.location.origin;
  let key = null; // the key being looked at, or null
  let data = null; // the last answers, for redrawing the chart and the snippets
  let modelChosen = false; // the person picked a model for the snippets themselves

  const $ = (id) => document.getElementById(id);

  // -- formatting -------------------------------------------------------------------------

  function group(digits) {
    return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }

  /** Credits with six decimals and grouped thousands: 1,234.000015 */
  function fmtCredits(value) {
    const text = Number(value).toFixed(6);
    const negative = text.startsWith("-");
    const [whole, fraction] = (negative ? text.slice(1) : text).split(".");
    return (negative ? "-" : "") + group(whole) + "." + fraction;
  }

  /** Whole numbers grouped: 12,345 */
  function fmtInt(value) {
    return group(String(Math.round(Number(value))));
  }

  function fmtMs(value) {
    if (value === null || value === undefined) return "–";
    return value >= 1000 ? (value / 1000).toFixed(2) + " s" : Math.round(value) + " ms";
  }

  /** When a key stops working, in UTC to the minute: "Expires 2027-01-06 16:05 UTC (in 30
   * days)", or "Never expires" */
  function fmtExpiry(expiresAt) {
    if (expiresAt === null || expiresAt === undefined) return t("wb.neverExpires");
    const when = new Date(expiresAt * 1000).toISOString().slice(0, 16).replace("T", " ");
    const left = expiresAt - Date.now() / 1000;
    const days = Math.floor(left / 86400);
    const hours = Math.floor(left / 3600);
    const minutes = Math.max(1, Math.ceil(left / 60));
    const years = Math.floor(days / 365);
    const inText =
      years >= 2 ? t("wb.years", { n: years }) : days >= 2 ? t("wb.daysN", { n: days })
        : hours >= 2 ? t("wb.hoursN", { n: hours }) : t("wb.minutesN", { n: minutes });
    return t("wb.expires", { when, left: inText });
  }

  /** "refills fully in 12 s" for a rate limit that is in use, else "" */
  function refill(state) {
    const seconds = state.reset_s;
    if (!state.used || seconds === null || seconds === undefined) return "";
    const text = seconds < 1 ? Math.round(seconds * 1000) + " ms" : Math.ceil(seconds) + " s";
    return t("wb.refills", { time: text });
  }

  /** A short axis label: 0.0012, 1.5, 12k, 3.4M */
  function fmtAxis(value) {
    if (value === 0) return "0";
    const short = (number) => String(Number(number.toPrecision(3)));
    if (value >= 1e6) return short(value / 1e6) + "M";
    if (value >= 1e4) return short(value / 1e3) + "k";
    return short(value);
  }

  function setNumber(id, value, format) {
    const element = $(id);
    element.dataset.value = String(value);
    element.textContent = format(value);
  }

  function element(tag, attributes, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  // -- talking to the relay ---------------------------------------------------------------

  class RelayError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function get(path, withKey) {
    let response;
    try {
      response = await fetch(path, {
        headers: { Authorization: "Bearer " + withKey },
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
    } catch (error) {
      throw new RelayError(0, t("wb.unreachable", { error: error.message }));
    }
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    if (!response.ok) {
      const detail = body && body.error ? body.error : {};
      throw new RelayError(
        response.status,
        detail.message || t("wb.answered", { status: response.status }),
        detail.code,
      );
    }
    return body;
  }

  function showMessage(text, kind) {
    const message = $("message");
    message.textContent = text;
    message.className = "message " + (kind || "error");
    message.hidden = false;
  }

  function hideMessage() {
    $("message").hidden = true;
    $("message").textContent = "";
  }

  function daysAgo(days) {
    const now = new Date();
    const start = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() - days);
    return Math.floor(start / 1000);
  }

  async function load(candidate) {
    const hourStart = Math.floor(Date.now() / 3600000) * 3600 - 23 * 3600;
    // One request first: a wrong key is told at once, and costs one refused request.
    const balance = await get("/v1/balance", candidate);
    const [limits, models, days, hours, calls, catalog] = await Promise.all([
      get("/v1/limits", candidate),
      get("/v1/usage?from=0&group_by=model", candidate),
      get("/v1/usage?group_by=day&from=" + daysAgo(13), candidate),
      get("/v1/usage?group_by=hour&from=" + hourStart, candidate),
      get("/v1/calls?limit=20", candidate),
      get("/v1/models", candidate),
    ]);
    return { balance, limits, models, days, hours, calls, catalog, hourStart };
  }

  async function lookUp() {
    const candidate = $("key-input").value.trim();
    if (!candidate) {
      showMessage(t("wb.pasteFirst"));
      return;
    }
    $("lookup").disabled = true;
    showMessage(t("wb.lookingUp"), "info");
    try {
      data = await load(candidate);
    } catch (error) {
      forget(false);
      if (error.status === 401) {
        showMessage(t("wb.notAccepted", { error: error.message }));
      } else {
        showMessage(t("wb.couldNotLoad", { error: error.message }));
      }
      return;
    } finally {
      $("lookup").disabled = false;
    }
    key = candidate;
    hideMessage();
    render();
  }

  function forget(clearInput) {
    key = null;
    data = null;
    if (clearInput) $("key-input").value = "";
    $("dashboard").hidden = true;
    $("forget").hidden = true;
    document.body.classList.remove("has-key");
    renderSnippets();
  }

  // -- rendering --------------------------------------------------------------------------

  function render() {
    const { balance, limits, models, calls } = data;
    $("dashboard").hidden = false;
    $("forget").hidden = false;
    document.body.classList.add("has-key");
    const who = balance.key;
    $("key-identity").replaceChildren(
      element("span", { translate: "no", text: who.hint + (who.name ? " · " + who.name : "") }),
      " · ", ...nodes("wb.package", { name: who.package }));
    $("key-expiry").textContent = fmtExpiry(who.expires_at);

    setNumber("bal-remaining", balance.balance, fmtCredits);
    setNumber("bal-granted", balance.granted, fmtCredits);
    setNumber("bal-used", balance.used, fmtCredits);
    setNumber("bal-held", balance.held, fmtCredits);
    const share = balance.granted > 0 ? Math.max(0, balance.balance) / balance.granted : 0;
    $("bal-meter").style.width = Math.min(100, share * 100).toFixed(1) + "%";
    $("bal-remaining").classList.toggle("negative", balance.balance < 0);

    renderLimits(limits);

    const totals = models.totals;
    setNumber("sum-calls", totals.calls, fmtInt);
    setNumber("sum-errors", totals.errors, fmtInt);
    setNumber("sum-input", totals.input_tokens, fmtInt);
    setNumber("sum-cached", totals.cached_tokens, fmtInt);
    setNumber("sum-cache-write", totals.cache_write_tokens, fmtInt);
    setNumber("sum-output", totals.output_tokens, fmtInt);
    setNumber("sum-reasoning", totals.reasoning_tokens, fmtInt);
    setNumber("sum-credits", totals.credits, fmtCredits);

    renderModels(models);
    renderCalls(calls.data);
    renderChart();
    renderModelChoices();
    renderSnippets();
  }

  function renderLimits(limits) {
    const rows = $("limit-rows");
    rows.replaceChildren();
    if (!limits.pool) {
      $("limits-package").textContent = limits.message || "";
      return;
    }
    const overridden = limits.overridden && limits.overridden.length
      ? " · " + t("wb.ownLimits", { names: limits.overridden.join(", ") }) : "";
    $("limits-package").replaceChildren(...nodes("wb.package", { name: limits.package }), " · ",
      ...nodes("wb.pool", { name: limits.pool }), overridden);
    const entries = [
      ["tpm", t("wb.limit.tpm"), limits.tpm.limit, limits.tpm.used, refill(limits.tpm)],
      ["rpm", t("wb.limit.rpm"), limits.rpm.limit, limits.rpm.used, refill(limits.rpm)],
      ["concurrency", t("wb.limit.concurrency"), limits.concurrency.limit,
        limits.concurrency.in_flight, ""],
      ["queue", t("wb.limit.queue"), limits.queue.limit, limits.queue.queued,
        t("wb.timeout", { s: limits.queue.timeout_s })],
    ];
    for (const [name, label, limit, used, note] of entries) {
      const fill = element("div", { className: "meter-fill" });
      const ratio = limit ? Math.min(1, (used || 0) / limit) : 0;
      fill.style.width = (ratio * 100).toFixed(1) + "%";
      const value = limit === null
        ? fmtInt(used || 0) + " · " + t("wb.noLimit")
        : t("wb.usedOf", { used: fmtInt(used || 0), limit: fmtInt(limit) });
      rows.append(
        element("div", { className: "limit", "data-limit": name }, [
          element("div", { className: "limit-head" }, [
            element("span", { text: label }),
            element("span", { className: "limit-value", text: value }),
          ]),
          element("div", { className: "meter" }, [fill]),
          element("div", { className: "hint", text: note }),
        ]),
      );
    }
  }

  function renderModels(models) {
    const body = $("models-table").tBodies[0];
    body.replaceChildren();
    const total = models.totals.credits;
    const rows = [...models.data].sort((a, b) => b.credits - a.credits || b.calls - a.calls);
    if (!rows.length) {
      body.append(element("tr", {}, [element("td", { colspan: "9", className: "empty",
        text: t("wb.noCalls") })]));
    }
    for (const row of rows) {
      const share = total > 0 ? (row.credits / total) * 100 : 0;
      const cell = (cls, value, text) => element("td", { className: cls, "data-value":
        String(value), text });
      body.append(element("tr", { "data-model": row.model }, [
        element("td", { className: "model", translate: "no", text: row.model }),
        cell("num calls", row.calls, fmtInt(row.calls)),
        cell("num input", row.input_tokens, fmtInt(row.input_tokens)),
        cell("num cached", row.cached_tokens, fmtInt(row.cached_tokens)),
        cell("num cache-write", row.cache_write_tokens, fmtInt(row.cache_write_tokens)),
        cell("num output", row.output_tokens, fmtInt(row.output_tokens)),
        cell("num reasoning", row.reasoning_tokens, fmtInt(row.reasoning_tokens)),
        cell("num credits", row.credits, fmtCredits(row.credits)),
        cell("num share", share, share.toFixed(1) + "%"),
      ]));
    }
  }

  function renderCalls(calls) {
    const body = $("calls-table").tBodies[0];
    body.replaceChildren();
    if (!calls.length) {
      body.append(element("tr", {}, [element("td", { colspan: "8", className: "empty",
        text: t("wb.noCalls") })]));
    }
    for (const call of calls) {
      const ok = call.status >= 200 && call.status < 300 && !call.error;
      const status = String(call.status) + (call.error ? " " + call.error : "") +
        (call.client_disconnected ? " " + t("wb.clientLeft") : "");
      const cell = (cls, value, text) => element("td", { className: cls, "data-value":
        String(value), text });
      body.append(element("tr", { "data-request-id": call.request_id }, [
        element("td", { className: "time", text: call.time.replace("T", " ").slice(0, 19) }),
        element("td", { className: "model", translate: "no", text: call.model || "–" }),
        cell("num input", call.input_tokens, fmtInt(call.input_tokens)),
        cell("num output", call.output_tokens, fmtInt(call.output_tokens)),
        cell("num credits", call.credits, fmtCredits(call.credits)),
        element("td", { className: "status " + (ok ? "ok" : "bad"), translate: "no", text: status }),
        cell("num latency", call.latency_ms, fmtMs(call.latency_ms)),
        cell("num queue", call.queue_ms, fmtMs(call.queue_ms)),
      ]));
    }
  }

  // -- the chart (inline SVG, drawn here: no library) -----------------------------------

  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function chartBuckets() {
    const hours = $("chart-window").value === "hours";
    const source = hours ? data.hours : data.days;
    const byLabel = new Map(source.data.map((row) => [row[hours ? "hour" : "day"], row]));
    const buckets = [];
    for (let index = 0; index < (hours ? 24 : 14); index += 1) {
      let label;
      let short;
      if (hours) {
        const at = new Date((data.hourStart + index * 3600) * 1000);
        label = at.toISOString().slice(0, 13) + ":00:00Z";
        short = at.toISOString().slice(11, 13) + "h";
      } else {
        const at = new Date((daysAgo(13) + index * 86400) * 1000);
        label = at.toISOString().slice(0, 10);
        short = label.slice(5);
      }
      buckets.push({ label, short, row: byLabel.get(label) });
    }
    return buckets;
  }

  function renderChart() {
    const metric = $("chart-metric").value;
    const value = (row) => {
      if (!row) return 0;
      if (metric === "credits") return row.credits;
      if (metric === "calls") return row.calls;
      return row.total_tokens;
    };
    const format = metric === "credits" ? fmtCredits : fmtInt;
    const buckets = chartBuckets();
    const width = 720;
    const height = 220;
    const left = 64;
    const bottom = 28;
    const top = 12;
    const plotWidth = width - left - 8;
    const plotHeight = height - top - bottom;
    const max = Math.max(...buckets.map((bucket) => value(bucket.row)), 0);
    const chart = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, width: "100%", class: "chart-svg",
      "data-metric": metric, "data-max": String(max),
    });
    for (const fraction of [0, 0.5, 1]) {
      const y = top + plotHeight - fraction * plotHeight;
      chart.append(svg("line", { x1: left, x2: width - 8, y1: y, y2: y, class: "grid-line" }));
      chart.append(svg("text", { x: left - 6, y: y + 4, class: "axis", "text-anchor": "end" },
        fmtAxis(max * fraction)));
    }
    const slot = plotWidth / buckets.length;
    buckets.forEach((bucket, index) => {
      const amount = value(bucket.row);
      const barHeight = max ? (amount / max) * plotHeight : 0;
      const x = left + index * slot + slot * 0.15;
      const bar = svg("rect", {
        x, y: top + plotHeight - barHeight, width: slot * 0.7, height: Math.max(barHeight, 0),
        rx: 2, class: amount ? "bar" : "bar empty", "data-label": bucket.label,
        "data-value": String(amount),
      });
      bar.append(svg("title", {}, bucket.label + ": " + format(amount)));
      chart.append(bar);
      const every = buckets.length > 14 ? 3 : 1;
      if (index % every === 0) {
        chart.append(svg("text", { x: x + slot * 0.35, y: height - 8, class: "axis",
          "text-anchor": "middle" }, bucket.short));
      }
    });
    $("chart").replaceChildren(chart);
  }

  // -- setup snippets ---------------------------------------------------------------------

  function renderModelChoices() {
    const select = $("model-select");
    const current = select.value;
    const served = data.catalog.data.map((model) => model.id);
    const used = [...data.models.data].sort((a, b) => b.calls - a.calls).map((row) => row.model);
    const preferred = used.find((model) => served.includes(model)) || served[0] || current;
    select.replaceChildren(...served.map((model) => element("option", { value: model,
      text: model })));
    select.value = modelChosen && served.includes(current) ? current : preferred;
  }

  function snippets(shownKey, model) {
    return [
      {
        id: "codex",
        title: t("wb.snip.codex"),
        text: `model = "${model}"
model_provider = "relay"

[model_providers.relay]
# ${t("wb.snip.codexName")}
name = "OpenAI"
base_url = "${origin}/openai"
wire_api = "responses"
# ${t("wb.snip.codexSocket")}
supports_websockets = true
experimental_bearer_token = "${shownKey}"
# ${t("wb.snip.codexAuth1")}
# ${t("wb.snip.codexAuth2", { url: origin + "/openai/models" })}
# auth = { command = "printenv", args = ["RELAY_API_KEY"] }
`,
      },
      {
        id: "codex-openai",
        title: t("wb.snip.codexOpenai"),
        text: `# ~/.codex/config.toml
openai_base_url = "${origin}/v1"
model = "${model}"

# ${t("wb.snip.codexLogin")}
#   printf '%s' '${shownKey}' | codex login --with-api-key
`,
      },
      {
        id: "ide",
        title: t("wb.snip.ide"),
        text: `Provider:  OpenAI Compatible
Base URL:  ${origin}/openai/v1
API key:   ${shownKey}
Model:     ${model}
Endpoint:  chat/completions
`,
      },
      {
        id: "claude-code",
        title: t("wb.snip.claude"),
        text: `export ANTHROPIC_BASE_URL="${origin}"
export ANTHROPIC_AUTH_TOKEN="${shownKey}"
export ANTHROPIC_MODEL="${model}"
export ANTHROPIC_DEFAULT_HAIKU_MODEL="${model}"
export CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1
claude
`,
      },
      {
        id: "anthropic-python",
        title: "Anthropic SDK, Python",
        text: `import anthropic

client = anthropic.Anthropic(base_url="${origin}", api_key="${shownKey}")
reply = client.messages.create(
    model="${model}",
    max_tokens=1024,
    messages=[{"role": "user", "content": "Say hello"}],
)
print(reply.content[0].text)
`,
      },
      {
        id: "python",
        title: "OpenAI SDK, Python",
        text: `from openai import OpenAI

client = OpenAI(base_url="${origin}/v1", api_key="${shownKey}")
reply = client.chat.completions.create(
    model="${model}",
    messages=[{"role": "user", "content": "Say hello"}],
)
print(reply.choices[0].message.content)
`,
      },
      {
        id: "node",
        title: "OpenAI SDK, Node",
        text: `import OpenAI from "openai";

const client = new OpenAI({ baseURL: "${origin}/v1", apiKey: "${shownKey}" });
const reply = await client.chat.completions.create({
  model: "${model}",
  messages: [{ role: "user", content: "Say hello" }],
});
console.log(reply.choices[0].message.content);
`,
      },
      {
        id: "curl",
        title: "curl",
        text: `curl ${origin}/v1/chat/completions \\
  -H "Authorization: Bearer ${shownKey}" \\
  -H "Content-Type: application/json" \\
  -d '{"model": "${model}", "messages": [{"role": "user", "content": "Say hello"}]}'
`,
      },
      {
        id: "curl-balance",
        title: t("wb.snip.balance"),
        text: `curl ${origin}/v1/balance -H "Authorization: Bearer ${shownKey}"
`,
      },
    ];
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

  function renderSnippets() {
    renderTutorial();
    renderQueueOrder();
    const model = $("model-select").value;
    const container = $("snippets");
    container.replaceChildren();
    $("setup-key-note").textContent = key ? t("wb.keyFilled") : t("wb.keyNotFilled");
    for (const snippet of snippets(key || PLACEHOLDER_KEY, model)) {
      const button = element("button", { type: "button", className: "copy", text: t("common.copy") });
      button.addEventListener("click", () => copy(snippet.text, button));
      container.append(element("figure", { className: "snippet", "data-snippet": snippet.id }, [
        element("figcaption", {}, [element("span", { text: snippet.title }), button]),
        element("pre", { translate: "no" }, [element("code", { text: snippet.text })]),
      ]));
    }
  }

  // -- the Codex tutorial and the queue order --------------------------------------------

  function steps(id, items) {
    $(id).replaceChildren(...items.map(([text, code]) => element("li", {}, [
      typeof text === "string" ? element("span", { text }) : element("span", {}, text),
      ...(code ? [element("pre", { translate: "no" }, [element("code", { text: code })])] : []),
    ])));
  }

  function renderTutorial() {
    const model = $("model-select").value;
    const config = snippets(key || PLACEHOLDER_KEY, model)[0].text;
    steps("tutorial-steps", [
      [t("wb.tut.node"), "node --version   # v20 or later"],
      [t("wb.tut.install"), "npm install -g @openai/codex\ncodex --version"],
      [t("wb.tut.config"), "# ~/.codex/config.toml\n" + config],
      [t("wb.tut.run"), 'cd your-project\ncodex\ncodex exec "Explain this repository"'],
      [t("wb.tut.ide"), `Base URL:  ${origin}/openai/v1`],
      [t("wb.tut.sdk"), `from openai import OpenAI\nclient = OpenAI(base_url="${origin}/v1", api_key="${key || PLACEHOLDER_KEY}")`],
    ]);
  }

  function renderQueueOrder() {
    const limits = data && data.limits && data.limits.pool ? data.limits : null;
    let keyStep = t("wb.q.keyGeneric");
    if (limits) {
      const set = [];
      const unset = [];
      for (const [name, value] of [["tpm", limits.tpm.limit], ["rpm", limits.rpm.limit],
        ["concurrency", limits.concurrency.limit], ["queue", limits.queue.limit]]) {
        if (value === null || value === undefined) unset.push(t("wb.q.name." + name));
        else set.push(t("wb.q.part." + name, { n: fmtInt(value) }));
      }
      set.push(t("wb.q.part.timeout", { n: limits.queue.timeout_s }));
      if (unset.length) set.push(t("wb.q.part.none", { names: unset.join(t("common.sep")) }));
      keyStep = nodes("wb.q.key", { package: limits.package }).map((node) =>
        node.nodeType === Node.TEXT_NODE
          ? document.createTextNode(node.textContent.replace("{limits}", set.join(t("common.sep"))))
          : node);
    }
    steps("queue-steps", [
      [t("wb.q.global")],
      [nodes("wb.q.pool", { pool: limits ? limits.pool : "…", weight: limits ? limits.weight : "…" })],
      [keyStep],
      [t("wb.q.account")],
      [t("wb.q.credits")],
    ]);
  }

  function relabel() {
    // The language changed: draw everything shown again in it.
    if (data) render();
    else renderSnippets();
    const message = $("message");
    if (!message.hidden && message.dataset.i18n) message.textContent = t(message.dataset.i18n);
  }

  // -- wiring ------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("origin").textContent = origin;
    $("key-input").value = ""; // never restored by the browser's form memory
    $("lookup").addEventListener("click", lookUp);
    $("key-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter") lookUp();
    });
    $("forget").addEventListener("click", () => {
      forget(true);
      showMessage(t("wb.forgotten"), "info");
    });
    $("refresh").addEventListener("click", () => {
      if (key) {
        $("key-input").value = key;
        lookUp();
      }
    });
    $("toggle-mask").addEventListener("click", () => {
      const input = $("key-input");
      const masked = input.classList.toggle("masked");
      $("toggle-mask").textContent = masked ? t("wb.show") : t("wb.hide");
      $("toggle-mask").dataset.i18n = masked ? "wb.show" : "wb.hide";
      $("toggle-mask").setAttribute("aria-pressed", String(!masked));
    });
    $("chart-window").addEventListener("change", () => data && renderChart());
    $("chart-metric").addEventListener("change", () => data && renderChart());
    $("model-select").addEventListener("change", () => {
      modelChosen = true;
      renderSnippets();
    });
    window.RelayI18n.onChange(relabel);
    renderSnippets();
  });
})();
