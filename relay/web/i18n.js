// English and Chinese for the relay's pages: a dictionary and the few functions that use it.
//
// The language is the first of the browser's languages (navigator.languages) that is English or
// Chinese (zh, zh-CN, zh-TW… → 简体中文), English otherwise; `?lang=zh` or `?lang=en` in the
// address, or the switch on the page, choose another. The choice is not stored anywhere (the
// pages keep nothing in the browser). Static text carries `data-i18n="key"` (its text) or
// `data-i18n-attr="placeholder:key;aria-label:key"`; scripts call `t(key, {name: value})`.
// The relay's API error messages stay English (clients parse them): the pages translate what
// they say about them, and quote the relay's message as it is.
"use strict";

window.RelayI18n = (() => {
  // key: [English, 简体中文]. {name} is replaced by t()'s values.
  const STRINGS = {
    // -- both pages --------------------------------------------------------------------------
    "common.skip": ["Skip to content", "跳到正文"],
    "common.language": ["Language", "语言"],
    "common.copy": ["Copy", "复制"],
    "common.copied": ["Copied", "已复制"],
    "common.copyFailed": ["Copy failed", "复制失败"],
    "common.refresh": ["Refresh", "刷新"],
    "common.cancel": ["Cancel", "取消"],
    "common.save": ["Save", "保存"],

    // -- the operator console ------------------------------------------------------------------
    "console.title": ["Operator console · relay", "运维控制台 · relay"],
    "console.heading": ["Operator console", "运维控制台"],
    "console.lead": ["Accounts, queues, keys and usage of this relay, through its admin API.",
      "通过管理 API 查看和管理本中转站的上游账号、队列、密钥与用量。"],
    "console.token": ["Admin token", "管理令牌"],
    "console.signIn": ["Sign in", "登录"],
    "console.signOut": ["Sign out", "退出"],
    "console.signingIn": ["Signing in…", "正在登录…"],
    "console.signedOut": ["Signed out: the token was forgotten.", "已退出：令牌已从页面中清除。"],
    "console.privacyStrong": ["The token stays in this page's memory only.",
      "令牌只保存在本页面的内存中。"],
    "console.privacyRest": [
      "It is never saved in localStorage, sessionStorage or cookies and never put in a URL; it " +
        "is sent only in the Authorization header of this page's requests to this relay. " +
        "Reloading or closing the page forgets it.",
      "它不会写入 localStorage、sessionStorage 或 Cookie，也不会出现在网址中；只在本页面发往本中转站的请求的 " +
        "Authorization 请求头中发送。刷新或关闭页面即会清除。"],
    "console.views": ["Views", "视图"],
    "console.tab.overview": ["Overview", "概览"],
    "console.tab.accounts": ["Accounts", "上游账号"],
    "console.tab.keys": ["Keys", "密钥"],
    "console.tab.usage": ["Usage", "用量"],
    "console.live.updated": ["Updated {time}", "更新于 {time}"],
    "console.live.unreachable": ["Relay unreachable: retrying…", "无法连接中转站，正在重试…"],
    "console.err.noToken": ["Enter the admin token first.", "请先输入管理令牌。"],
    "console.err.wrongToken": [
      "The admin token was not accepted: check it against the relay's RELAY_ADMIN_TOKEN " +
        "(or the variable server.admin_token_env names).",
      "管理令牌不正确：请与中转站的 RELAY_ADMIN_TOKEN（或 server.admin_token_env 指定的环境变量）核对。"],
    "console.err.disabled": [
      "The admin API is disabled on this relay: set the variable server.admin_token_env names " +
        "(RELAY_ADMIN_TOKEN by default) and restart it.",
      "本中转站未启用管理 API：请设置 server.admin_token_env 指定的环境变量（默认 RELAY_ADMIN_TOKEN）后重启。"],
    "console.err.unreachable": [
      "The relay could not be reached: is it running, and is this its address?",
      "无法连接中转站：请确认它正在运行，且这是它的地址。"],
    "console.err.refused": ["The relay refused ({status}):", "中转站拒绝了请求（{status}）："],
    "console.unlimited": ["no limit", "不限"],
    "console.ov.traffic": ["Traffic (last minute)", "流量（最近一分钟）"],
    "console.ov.rps": ["Requests per second", "每秒请求数"],
    "console.ov.tpm": ["Tokens per minute", "每分钟 Token 数"],
    "console.ov.requests": ["Requests", "请求数"],
    "console.ov.errors": ["Errors", "错误数"],
    "console.ov.credits": ["Credits charged", "扣除额度"],
    "console.ov.keys": ["Active keys", "有效密钥"],
    "console.ov.now": ["Right now", "当前"],
    "console.ov.inFlight": ["In flight", "处理中"],
    "console.ov.queued": ["Queued", "排队中"],
    "console.ov.accountsOk": ["Accounts OK", "正常账号"],
    "console.ov.accountsCooling": ["Cooling down", "冷却中"],
    "console.ov.accountsOut": ["Out of service", "已停用"],
    "console.ov.pools": ["Pools", "账号池"],
    "console.ov.noPools": ["No pools configured.", "未配置账号池。"],
    "console.ov.processes": ["Relay processes (shared through Redis)", "中转进程（通过 Redis 共享）"],
    "console.ov.noRedis": [
      "This relay runs alone: no Redis is configured (server.redis_url), so there is one process.",
      "本中转站单独运行：未配置 Redis（server.redis_url），只有一个进程。"],
    "console.ov.processCount": ["{n} live processes share the limits and queues.",
      "{n} 个在线进程共享限额与队列。"],
    "console.ov.processQueued": ["{n} queued", "排队 {n} 个"],
    "console.ov.degraded": ["Redis is unreachable: each process applies its limits alone.",
      "无法连接 Redis：各进程暂时各自执行限额。"],
    "console.col.pool": ["Pool", "账号池"],
    "console.col.inFlight": ["In flight", "处理中"],
    "console.col.capacity": ["Capacity", "并发上限"],
    "console.col.queued": ["Queued", "排队中"],
    "console.col.oldestWait": ["Oldest wait", "最长等待"],
    "console.col.account": ["Account", "账号"],
    "console.col.provider": ["Provider", "类型"],
    "console.col.health": ["Health", "状态"],
    "console.col.failures": ["Failures", "失败次数"],
    "console.col.lastError": ["Last error", "最近错误"],
    "console.col.action": ["Action", "操作"],
    "console.col.actions": ["Actions", "操作"],
    "console.col.name": ["Name", "名称"],
    "console.col.key": ["Key", "密钥"],
    "console.col.package": ["Package", "套餐"],
    "console.col.credits": ["Credits left", "剩余额度"],
    "console.col.calls": ["Calls", "调用次数"],
    "console.col.lastUsed": ["Last used", "最近使用"],
    "console.col.status": ["Status", "状态"],
    "console.acc.title": ["Upstream accounts", "上游账号"],
    "console.acc.none": ["No accounts configured.", "未配置上游账号。"],
    "console.acc.ok": ["OK", "正常"],
    "console.acc.cooling": ["Cooling down until {time} ({s} s)", "冷却中，至 {time}（{s} 秒）"],
    "console.acc.missing": ["Out of service: its credential is missing (the environment variable is not set)",
      "已停用：缺少凭据（环境变量未设置）"],
    "console.acc.outBecause": ["Out of service: {error}", "已停用：{error}"],
    "console.acc.outOperator": ["Out of service: taken out by the operator", "已停用：由运维人员停用"],
    "console.acc.takeOut": ["Take out of service", "停用"],
    "console.acc.putBack": ["Put back in service", "恢复使用"],
    "console.acc.takeOutDone": ["{name} was taken out of service.", "已停用 {name}。"],
    "console.acc.putBackDone": ["{name} is back in service.", "{name} 已恢复使用。"],
    "console.keys.create": ["Create a key", "创建密钥"],
    "console.keys.package": ["Package", "套餐"],
    "console.keys.name": ["Name", "名称"],
    "console.keys.credits": ["Credits", "额度"],
    "console.keys.creditsDefault": ["the package's", "默认套餐额度"],
    "console.keys.expiresIn": ["Expires in", "有效期"],
    "console.keys.expiresHint": ["For example 30d, 12h; empty: never", "例如 30d、12h；留空为永不过期"],
    "console.keys.createButton": ["Create key", "创建密钥"],
    "console.keys.newTitle": ["The new key: copy it now", "新密钥：请立即复制"],
    "console.keys.newNote": [
      "It is shown this once: the relay keeps only its hash. Hiding this panel forgets it.",
      "密钥只显示这一次：中转站只保存它的哈希值。隐藏此面板后页面也不再保留它。"],
    "console.keys.hide": ["I have saved it: hide", "我已保存，隐藏"],
    "console.keys.workbench": ["Its holder can see its usage and set-up on the key workbench:",
      "持有者可在密钥工作台查看用量与配置方法："],
    "console.keys.title": ["Keys", "密钥"],
    "console.keys.search": ["Search name, key, package", "搜索名称、密钥、套餐"],
    "console.keys.none": ["No keys yet: create one above.", "还没有密钥：请在上方创建。"],
    "console.keys.noMatch": ["No key matches the search.", "没有符合搜索条件的密钥。"],
    "console.keys.never": ["never", "从未使用"],
    "console.keys.active": ["active", "有效"],
    "console.keys.revoked": ["revoked", "已吊销"],
    "console.keys.expired": ["expired", "已过期"],
    "console.keys.topUp": ["Top up", "充值"],
    "console.keys.limits": ["Limits", "限额"],
    "console.keys.revoke": ["Revoke", "吊销"],
    "console.keys.topUpDone": ["{key} was topped up.", "{key} 已充值。"],
    "console.keys.limitsDone": ["The limits of {key} were changed.", "{key} 的限额已修改。"],
    "console.keys.revokeDone": ["{key} was revoked: it no longer works.", "{key} 已吊销，不能再使用。"],
    "console.dlg.topUpTitle": ["Top up credits", "充值额度"],
    "console.dlg.amount": ["Credits (negative takes back)", "额度（负数为扣回）"],
    "console.dlg.note": ["Note", "备注"],
    "console.dlg.limitsTitle": ["Change limits", "修改限额"],
    "console.dlg.limitsHint": ["an empty field follows the package", "留空则使用套餐的限额"],
    "console.dlg.fromPackage": ["package: {value}", "套餐：{value}"],
    "console.dlg.revokeTitle": ["Revoke this key?", "吊销此密钥？"],
    "console.dlg.revokeText": ["it stops working at once, and this cannot be undone.",
      "它会立即失效，且无法撤销。"],
    "console.limit.tpm": ["Tokens per minute", "每分钟 Token 数"],
    "console.limit.rpm": ["Requests per minute", "每分钟请求数"],
    "console.limit.max_concurrency": ["Concurrent requests", "并发请求数"],
    "console.limit.max_queue": ["Queue places", "排队名额"],
    "console.limit.queue_timeout_s": ["Queue timeout (seconds)", "排队超时（秒）"],
    "console.limit.weight": ["Weight in the pool's queue", "在账号池队列中的权重"],
    "console.usage.title": ["Usage", "用量"],
    "console.usage.window": ["Window", "时间范围"],
    "console.usage.measure": ["Measure", "指标"],
    "console.usage.key": ["Key", "密钥"],
    "console.usage.days7": ["Last 7 days", "最近 7 天"],
    "console.usage.days14": ["Last 14 days", "最近 14 天"],
    "console.usage.days30": ["Last 30 days", "最近 30 天"],
    "console.usage.tokens": ["Tokens", "Token 数"],
    "console.usage.credits": ["Credits", "额度"],
    "console.usage.calls": ["Calls", "调用次数"],
    "console.usage.allKeys": ["All keys", "全部密钥"],
    "console.usage.empty": [
      "No usage yet in this window: calls show up here as soon as keys are used.",
      "该时间范围内还没有用量：密钥被使用后，调用会立即显示在这里。"],
    "console.usage.none": ["No usage yet.", "暂无用量。"],
    "console.usage.perDay": ["Per day (UTC)", "按天（UTC）"],
    "console.usage.perModel": ["Per model", "按模型"],
    "console.usage.perKey": ["Per key", "按密钥"],
    "console.usage.export": ["Export as CSV:", "导出 CSV："],
    "console.usage.exportDay": ["per day", "按天"],
    "console.usage.exportModel": ["per model", "按模型"],
    "console.usage.exportKey": ["per key", "按密钥"],
    "console.snip.codex": ["Codex — ~/.codex/config.toml", "Codex — ~/.codex/config.toml"],
    "console.snip.env": ["Environment (OpenAI and Anthropic SDKs, Claude Code)",
      "环境变量（OpenAI 与 Anthropic SDK、Claude Code）"],
    "console.snip.curl": ["curl — the key's balance", "curl — 查询密钥余额"],
    "console.footer": [
      "relay · the console works offline and loads nothing from other sites; every action " +
        "goes through the admin API.",
      "relay · 控制台可离线使用，不加载任何外部资源；所有操作都通过管理 API 完成。"],
  };

  const listeners = [];
  let lang = chooseLanguage();

  function chooseLanguage() {
    const asked = new URLSearchParams(window.location.search).get("lang");
    if (asked === "zh" || asked === "en") return asked;
    for (const tag of navigator.languages || [navigator.language || ""]) {
      if (/^zh\b/i.test(tag)) return "zh";
      if (/^en\b/i.test(tag)) return "en";
    }
    return "en";
  }

  /** The text of `key` in the page's language, with `{name}` replaced from `values`. */
  function t(key, values) {
    const entry = STRINGS[key];
    let text = entry ? entry[lang === "zh" ? 1 : 0] : key;
    for (const [name, value] of Object.entries(values || {})) {
      text = text.split("{" + name + "}").join(String(value));
    }
    return text;
  }

  /** Every static text and attribute of the page, in the page's language. */
  function apply() {
    document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
    for (const node of document.querySelectorAll("[data-i18n]")) {
      node.textContent = t(node.dataset.i18n);
    }
    for (const node of document.querySelectorAll("[data-i18n-attr]")) {
      for (const pair of node.dataset.i18nAttr.split(";")) {
        const [attribute, key] = pair.split(":");
        node.setAttribute(attribute, t(key));
      }
    }
    for (const button of document.querySelectorAll("[data-lang]")) {
      button.setAttribute("aria-pressed", String(button.dataset.lang === lang));
    }
  }

  function setLanguage(next) {
    if (next === lang) return;
    lang = next;
    apply();
    for (const listener of listeners) listener(lang);
  }

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

  /** Unix seconds in UTC: "2026-12-08 14:05 UTC", or "14:05:09 UTC" with `timeOnly`. */
  function fmtUtc(seconds, timeOnly) {
    const text = new Date(seconds * 1000).toISOString();
    return (timeOnly ? text.slice(11, 19) : text.slice(0, 16).replace("T", " ")) + " UTC";
  }

  document.addEventListener("DOMContentLoaded", () => {
    apply();
    for (const button of document.querySelectorAll("[data-lang]")) {
      button.addEventListener("click", () => setLanguage(button.dataset.lang));
    }
  });

  return {
    t, apply, fmtCredits, fmtInt, fmtUtc, STRINGS,
    get lang() { return lang; },
    setLanguage,
    onChange(listener) { listeners.push(listener); },
  };
})();
