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

    // -- the key workbench ----------------------------------------------------------------------
    "wb.title": ["API key workbench · relay", "API 密钥工作台 · relay"],
    "wb.heading": ["API key workbench", "API 密钥工作台"],
    "wb.lead": [
      "Paste an API key to see its calls, quota and consumption per model, and how to set up " +
        "your tools for this relay.",
      "粘贴 API 密钥，查看它的调用记录、额度和各模型的消耗，以及如何为本中转站配置你的工具。"],
    "wb.key": ["API key", "API 密钥"],
    "wb.show": ["Show", "显示"],
    "wb.hide": ["Hide", "隐藏"],
    "wb.lookUp": ["Look up", "查询"],
    "wb.forget": ["Forget key", "清除密钥"],
    "wb.privacyStrong": ["The key stays in this page's memory only.", "密钥只保存在本页面的内存中。"],
    "wb.privacyRest": [
      "It is never saved in localStorage, sessionStorage or cookies and never put in a URL: it " +
        "is sent only in the Authorization header of this page's requests to this relay, which " +
        "does not write keys to its logs. Reloading or closing the page forgets it.",
      "它不会写入 localStorage、sessionStorage 或 Cookie，也不会出现在网址中：只在本页面发往本中转站的请求的 " +
        "Authorization 请求头中发送，中转站也不会把密钥写进日志。刷新或关闭页面即会清除。"],
    "wb.quota": ["Quota", "额度"],
    "wb.creditsLeft": ["Credits left", "剩余额度"],
    "wb.granted": ["Granted", "已发放"],
    "wb.used": ["Used", "已使用"],
    "wb.held": ["Held by requests in progress", "进行中请求预占"],
    "wb.limitsTitle": ["Limits and current use", "限额与当前占用"],
    "wb.callsTotal": ["Calls (all time)", "调用统计（全部）"],
    "wb.calls": ["Calls", "调用次数"],
    "wb.errors": ["Errors", "错误数"],
    "wb.inputTokens": ["Input tokens", "输入 Token"],
    "wb.ofCached": ["of which cached", "其中缓存命中"],
    "wb.ofCacheWrites": ["of which cache writes", "其中缓存写入"],
    "wb.outputTokens": ["Output tokens", "输出 Token"],
    "wb.ofReasoning": ["of which reasoning", "其中推理"],
    "wb.credits": ["Credits", "额度"],
    "wb.tokens": ["Tokens", "Token 数"],
    "wb.chartTitle": ["Usage over time", "用量趋势"],
    "wb.chartOptions": ["Chart options", "图表选项"],
    "wb.window": ["Window", "时间范围"],
    "wb.measure": ["Measure", "指标"],
    "wb.days14": ["Last 14 days", "最近 14 天"],
    "wb.hours24": ["Last 24 hours", "最近 24 小时"],
    "wb.utc": ["Times in UTC.", "时间均为 UTC。"],
    "wb.modelsTitle": ["Consumption per model (all time)", "各模型消耗（全部）"],
    "wb.col.model": ["Model", "模型"],
    "wb.col.input": ["Input", "输入"],
    "wb.col.cached": ["Cached", "缓存命中"],
    "wb.col.cacheWrites": ["Cache writes", "缓存写入"],
    "wb.col.output": ["Output", "输出"],
    "wb.col.reasoning": ["Reasoning", "推理"],
    "wb.col.share": ["Share", "占比"],
    "wb.col.time": ["Time (UTC)", "时间（UTC）"],
    "wb.col.status": ["Status", "状态"],
    "wb.col.latency": ["Latency", "耗时"],
    "wb.col.queueWait": ["Queue wait", "排队等待"],
    "wb.recentTitle": ["Recent calls", "最近调用"],
    "wb.setupTitle": ["Set up your tools", "配置你的工具"],
    "wb.forRelay": ["For this relay, at", "适用于本中转站，地址："],
    "wb.keyFilled": ["Your key is filled in (on this page only: it is not stored anywhere).",
      "已填入你的密钥（仅在本页面中，不会保存到任何地方）。"],
    "wb.keyNotFilled": ["Look up your key above and it is filled in below (on this page only).",
      "在上方查询你的密钥后，下面会自动填入（仅在本页面中）。"],
    "wb.footer": ["relay · the key workbench works offline and loads nothing from other sites.",
      "relay · 密钥工作台可离线使用，不加载任何外部资源。"],
    "wb.neverExpires": ["Never expires", "永不过期"],
    "wb.expires": ["Expires {when} UTC (in {left})", "{when} UTC 到期（还有 {left}）"],
    "wb.years": ["{n} years", "{n} 年"],
    "wb.daysN": ["{n} days", "{n} 天"],
    "wb.hoursN": ["{n} hours", "{n} 小时"],
    "wb.minutesN": ["{n} minutes", "{n} 分钟"],
    "wb.refills": ["refills fully in {time}", "{time} 后完全恢复"],
    "wb.unreachable": ["The relay could not be reached ({error}).", "无法连接中转站（{error}）。"],
    "wb.answered": ["The relay answered {status}.", "中转站返回了 {status}。"],
    "wb.pasteFirst": ["Paste an API key first.", "请先粘贴 API 密钥。"],
    "wb.lookingUp": ["Looking up the key…", "正在查询密钥…"],
    "wb.notAccepted": [
      "This key was not accepted: {error} Check that you pasted the whole key; a revoked or " +
        "expired key no longer works.",
      "密钥未被接受：{error} 请检查是否粘贴了完整的密钥；已吊销或已过期的密钥不能再使用。"],
    "wb.couldNotLoad": ["Could not load the key's data: {error}", "无法加载密钥的数据：{error}"],
    "wb.forgotten": ["The key was forgotten.", "密钥已从页面中清除。"],
    "wb.package": ["package {name}", "套餐 {name}"],
    "wb.pool": ["pool {name}", "账号池 {name}"],
    "wb.ownLimits": ["own limits: {names}", "单独设置的限额：{names}"],
    "wb.limit.tpm": ["Tokens per minute", "每分钟 Token 数"],
    "wb.limit.rpm": ["Requests per minute", "每分钟请求数"],
    "wb.limit.concurrency": ["Requests in flight", "并发请求"],
    "wb.limit.queue": ["Requests queued", "排队请求"],
    "wb.timeout": ["timeout {s} s", "超时 {s} 秒"],
    "wb.noLimit": ["no limit", "不限"],
    "wb.usedOf": ["{used} of {limit}", "{used} / {limit}"],
    "wb.noCalls": ["No calls yet.", "还没有调用。"],
    "wb.clientLeft": ["(client left)", "（客户端已断开）"],
    "wb.snip.codex": ["Codex CLI / IDE extension — ~/.codex/config.toml (Responses API)",
      "Codex CLI / IDE 插件 — ~/.codex/config.toml（Responses API）"],
    "wb.snip.codexName": [
      "Codex sends remote compaction (/responses/compact) only to a provider named OpenAI.",
      "Codex 只对名为 OpenAI 的提供方使用远程压缩（/responses/compact）。"],
    "wb.snip.codexSocket": [
      "The turns over one WebSocket per session (Codex falls back to HTTP if it is refused).",
      "每个会话的多轮对话走同一个 WebSocket（被拒绝时 Codex 会改用 HTTP）。"],
    "wb.snip.codexAuth1": [
      "Or, instead of experimental_bearer_token, a command that prints the key: Codex then also",
      "或者不用 experimental_bearer_token，改用一条输出密钥的命令：这样 Codex 还会"],
    "wb.snip.codexAuth2": [
      "reads the relay's model list (reasoning levels, context window) from {url}.",
      "从 {url} 读取中转站的模型列表（推理等级、上下文窗口）。"],
    "wb.snip.codexOpenai": [
      "Codex CLI, alternative — Codex's built-in OpenAI provider pointed at the relay",
      "Codex CLI 另一种方式 — 让 Codex 内置的 OpenAI 提供方指向本中转站"],
    "wb.snip.codexLogin": ["Then log Codex in with the key, once:", "然后用密钥登录 Codex（只需一次）："],
    "wb.snip.ide": ["IDE plugins (Cursor, Continue, Cline, Roo…) — OpenAI compatible",
      "IDE 插件（Cursor、Continue、Cline、Roo 等）— OpenAI 兼容"],
    "wb.snip.claude": ["Claude Code — environment (Anthropic Messages API)",
      "Claude Code — 环境变量（Anthropic Messages API）"],
    "wb.snip.balance": ["curl — the key's balance", "curl — 查询密钥余额"],
    "wb.tut.title": ["Set up Codex, step by step", "Codex 配置教程"],
    "wb.tut.node": ["Install Node.js 20 or later (from nodejs.org, or your system's package manager), then check it:",
      "安装 Node.js 20 或更高版本（从 nodejs.org 下载，或用系统的包管理器），然后检查："],
    "wb.tut.install": ["Install the Codex CLI with npm:", "用 npm 安装 Codex CLI："],
    "wb.tut.config": [
      "Write ~/.codex/config.toml (on Windows %USERPROFILE%\\.codex\\config.toml) with this relay's address; once you look up your key above it is filled in:",
      "创建 ~/.codex/config.toml（Windows 上为 %USERPROFILE%\\.codex\\config.toml），写入本中转站的地址；在上方查询密钥后会自动填入密钥："],
    "wb.tut.run": ["Run Codex in your project's folder (interactive), or give it one task:",
      "在项目目录中运行 Codex（交互模式），或直接交给它一个任务："],
    "wb.tut.ide": [
      "IDE plugins: the Codex extension for VS Code, Cursor and Windsurf reads the same config.toml; other OpenAI-compatible plugins take this base URL and your key:",
      "IDE 插件：VS Code、Cursor、Windsurf 的 Codex 插件读取同一个 config.toml；其他 OpenAI 兼容插件填写下面的地址和你的密钥："],
    "wb.tut.sdk": ["SDK: the OpenAI SDKs take the relay's /v1 address and your key (more examples below):",
      "SDK：OpenAI 的各语言 SDK 填写中转站的 /v1 地址和你的密钥（下方有更多示例）："],
    "wb.queue.title": ["Limits and queue order", "限额与排队顺序"],
    "wb.queue.lead": [
      "Every request passes these checks in this order; the first that is full makes it wait in the queue or refuses it.",
      "每个请求按下面的顺序依次检查；哪一层满了，请求就在队列中等待，或被拒绝。"],
    "wb.q.global": [
      "The relay's global capacity: how many requests of all keys run at once (set by the operator).",
      "中转站的全局容量：所有密钥同时进行的请求总数上限（由运维人员设置）。"],
    "wb.q.pool": [
      "The pool {pool}: the capacity its accounts share. When it is full, requests wait in the pool's fair queue, where keys take turns in proportion to their weight (this key's: {weight}), so one busy key cannot hold up the others.",
      "账号池 {pool}：池内账号共享的容量。满了以后请求进入该池的公平队列，各密钥按权重轮流（本密钥的权重：{weight}），一个繁忙的密钥不会拖住其他密钥。"],
    "wb.q.key": [
      "Your key (package {package}): {limits}. Past these the answer is 429, with the time to retry.",
      "你的密钥（套餐 {package}）：{limits}。超出时返回 429，并告知多久后重试。"],
    "wb.q.part.tpm": ["{n} tokens per minute", "每分钟 {n} 个 Token"],
    "wb.q.part.rpm": ["{n} requests per minute", "每分钟 {n} 个请求"],
    "wb.q.part.concurrency": ["{n} requests at once", "同时最多 {n} 个请求"],
    "wb.q.part.queue": ["at most {n} waiting", "最多 {n} 个排队"],
    "wb.q.part.timeout": ["each waiting up to {n} s", "每个最多等待 {n} 秒"],
    "wb.q.part.none": ["no limit on {names}", "不限{names}"],
    "wb.q.name.tpm": ["tokens per minute", "每分钟 Token 数"],
    "wb.q.name.rpm": ["requests per minute", "每分钟请求数"],
    "wb.q.name.concurrency": ["requests at once", "并发数"],
    "wb.q.name.queue": ["queue places", "排队名额"],
    "common.sep": [", ", "，"],
    "common.and": [" and ", "和"],
    "wb.q.keyGeneric": [
      "Your key's own limits (tokens and requests per minute, requests at once, queue places and wait): look up your key above to see them.",
      "你的密钥自己的限额（每分钟 Token 数与请求数、并发数、排队名额与等待时间）：在上方查询密钥即可看到。"],
    "wb.q.account": [
      "The account scheduler: it picks a healthy account of the pool that serves the model; an account resting after an upstream rate limit (429) is skipped until it recovers, and a conversation stays on its account while it can (for the prompt cache).",
      "账号调度：选择池中可用且支持该模型的账号；因上游限流（429）而冷却的账号会被跳过，直到恢复；同一会话尽量留在同一个账号上（以利用提示缓存）。"],
    "wb.q.credits": [
      "Credits: a request holds its estimated cost while it runs and is charged what it used; with no credits left it is refused.",
      "额度：请求进行中会预占估算费用，结束后按实际用量扣费；额度用完后请求会被拒绝。"],

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
    "console.acc.outRefused": ["Out of service: the upstream refused its credential ({status}); fix it, then put it back",
      "已停用：上游拒绝了它的凭据（{status}）；修正后再恢复使用"],
    "console.col.windows": ["Usage windows", "用量窗口"],
    "console.acc.window": ["{span}: {used}% used, resets {time}", "{span}：已用 {used}%，{time} 重置"],
    "console.acc.hours": ["{n} h", "{n} 小时"],
    "console.acc.days": ["{n} d", "{n} 天"],
    "console.acc.setVariable": ["Set its variable and restart the relay", "设置其环境变量后重启中转站"],
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

  /** t(key) as nodes, each value in a `translate="no"` span (a name, not prose): for text
   * that shows a package, pool or key name. */
  function nodes(key, values) {
    const entry = STRINGS[key];
    const text = entry ? entry[lang === "zh" ? 1 : 0] : key;
    return text.split(/(\{\w+\})/).filter(Boolean).map((part) => {
      const name = /^\{(\w+)\}$/.exec(part);
      if (!name || !values || !(name[1] in values)) return document.createTextNode(part);
      const span = document.createElement("span");
      span.setAttribute("translate", "no");
      span.textContent = String(values[name[1]]);
      return span;
    });
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
    t, nodes, apply, fmtCredits, fmtInt, fmtUtc, STRINGS,
    get lang() { return lang; },
    setLanguage,
    onChange(listener) { listeners.push(listener); },
  };
})();
