// Drives the operator console in headless Chromium (Debian's package) with playwright-core, as an
// operator would: a wrong token, the right one, every view, a key created, used, topped up and
// revoked, an account put back, the usage chart and its CSV, the relay unreachable, Chinese.
// Prints one JSON object for tests/test_console.py to check.
//
// usage: node console_check.mjs RELAY_URL ADMIN_TOKEN SCREENSHOT_DIR IDLE_KEY_ID
import fs from "node:fs";
import path from "node:path";
import { englishLeft, filesHolding, launch, lowContrast, NAMES, storage } from "./page_tools.mjs";

const [relayUrl, adminToken, shots, idleKeyId] = process.argv.slice(2);
const { profile, context } = await launch("console", "en-US");
const result = { requests: [], errors: [], consoleErrors: [], zh: {} };
let newKey = null;

const chat = (key, content, model) => fetch(relayUrl + "/v1/chat/completions", {
  method: "POST",
  headers: { authorization: "Bearer " + key, "content-type": "application/json" },
  body: JSON.stringify({ model, messages: [{ role: "user", content }] }),
});

try {
  const page = context.pages()[0] || (await context.newPage());
  page.on("request", (request) => result.requests.push({
    url: request.url(), authorization: request.headers().authorization || null }));
  page.on("pageerror", (error) => result.errors.push(String(error)));
  page.on("console", (message) => {
    if (message.type() === "error") result.consoleErrors.push(message.text());
  });
  const text = (selector) => page.textContent(selector);
  result.lowContrast = {};
  const shot = async (name) => {
    result.lowContrast[name] = await lowContrast(page);
    await page.screenshot({ path: path.join(shots, name + ".png"), fullPage: true });
  };
  const tab = async (name) => {
    await page.click("#tab-" + name);
    await page.waitForSelector("#view-" + name + ":not([hidden])");
  };

  await page.goto(relayUrl + "/console", { waitUntil: "load" });
  result.lang = await page.evaluate(() => document.documentElement.lang);
  result.title = await page.title();

  // -- no token, a wrong token --------------------------------------------------------------
  await page.click("#sign-in");
  result.noToken = await text("#login-message");
  await page.fill("#token-input", adminToken + "-wrong");
  await page.press("#token-input", "Enter");
  await page.waitForFunction(() => document.getElementById("login-message").className.includes("error")
    && !document.getElementById("login-message").textContent.includes("…"));
  result.wrongToken = {
    message: await text("#login-message"),
    appHidden: await page.$eval("#app", (node) => node.hidden),
  };
  await shot("console-login-en");

  // -- signed in: the overview, refreshing by itself ------------------------------------------
  await page.fill("#token-input", adminToken);
  await page.click("#sign-in");
  await page.waitForSelector("#app:not([hidden])");
  await page.waitForSelector("#pools-table tbody tr[data-pool]");
  result.tokenInputAfter = await page.inputValue("#token-input");
  const overviewRequests = () => result.requests.filter((r) => r.url.endsWith("/admin/overview")).length;
  const before = overviewRequests();
  await page.waitForTimeout(3500);
  result.overviewRefreshes = overviewRequests() - before;
  result.overview = await page.evaluate(() => {
    const value = (id) => document.getElementById(id).dataset.value;
    return {
      requests: value("ov-requests"), errors: value("ov-errors"), cooling: value("ov-acc-cooling"),
      out: value("ov-acc-out"),
      pools: [...document.querySelectorAll("#pools-table tbody tr")].map((row) => row.dataset.pool),
      processes: document.getElementById("processes").textContent,
    };
  });
  await shot("console-overview-en");

  // -- accounts: the one that answered 429 is cooling down; put it back -------------------------
  await page.focus("#tab-overview"); // the tabs by keyboard: arrows move between them
  await page.keyboard.press("ArrowRight");
  await page.waitForSelector("#view-accounts:not([hidden])");
  result.focusedTab = await page.evaluate(() => document.activeElement.id);
  await page.waitForSelector("#accounts-table tbody tr[data-account]");
  const accountRows = () => page.$$eval("#accounts-table tbody tr[data-account]", (rows) =>
    Object.fromEntries(rows.map((row) => [row.dataset.account,
      { health: row.dataset.health, text: row.querySelector(".health").textContent,
        action: row.querySelector("button") ? row.querySelector("button").dataset.action : null,
        lastError: row.querySelector(".last-error").textContent }])));
  result.accounts = await accountRows();
  await shot("console-accounts-en");
  await page.click('tr[data-account="sim-chat"] button[data-action="disable"]');
  await page.waitForSelector('tr[data-account="sim-chat"][data-health="out"]');
  result.accountTakenOut = (await accountRows())["sim-chat"];
  await page.click('tr[data-account="sim-chat"] button[data-action="enable"]');
  await page.waitForSelector('tr[data-account="sim-chat"][data-health="ok"]');
  await page.click('tr[data-account="flaky"] button[data-action="enable"]');
  await page.waitForSelector('tr[data-account="flaky"][data-health="ok"]');
  result.accountsAfter = await accountRows();

  // -- keys: create one (shown once), use it, top it up ----------------------------------------
  await tab("keys");
  await page.selectOption("#create-package", "paid");
  await page.fill("#create-name", "console test");
  await page.fill("#create-credits", "5");
  await page.click("#create-key");
  await page.waitForSelector("#new-key:not([hidden])");
  newKey = await text("#new-key-value");
  result.newKey = newKey;
  result.newKeyId = await page.$eval("#new-key", (node) => node.dataset.keyId);
  result.newKeySnippets = await page.$$eval("#new-key-snippets [data-snippet]", (figures) =>
    Object.fromEntries(figures.map((f) => [f.dataset.snippet, f.querySelector("code").textContent])));
  await shot("console-keys-en");
  result.storageWhileShown = await storage(page, context);
  await page.click("#new-key-hide");
  result.keyInPageAfterHide = await page.evaluate((secret) =>
    document.documentElement.outerHTML.includes(secret), newKey);
  const row = `#keys-table tr[data-key-id="${result.newKeyId}"]`;
  result.createdRow = await page.$eval(row, (tr) => ({
    credits: tr.querySelector(".credits").dataset.value, calls: tr.querySelector(".calls").textContent,
    status: tr.dataset.status, lastUsed: tr.querySelector(".last-used").textContent }));
  await page.fill("#key-search", "no such key anywhere");
  result.searchEmpty = await text("#keys-table tbody");
  await page.fill("#key-search", "console test");
  result.searchRows = await page.$$eval("#keys-table tbody tr[data-key-id]", (rows) => rows.length);

  for (const [content, model] of [["one #sim tokens=30", "gpt-5"], ["two #sim tokens=12", "gpt-5.5"]]) {
    const answer = await chat(newKey, content, model);
    result.calls = (result.calls || []).concat(answer.status);
  }
  await page.click(`${row} button[data-action="topup"]`);
  await page.fill("#dialog-credits", "20");
  await page.fill("#dialog-note", "from the console");
  await page.click("#dialog-ok");
  await page.waitForSelector("#dialog", { state: "hidden" });
  await page.waitForFunction((selector) => Number(document.querySelector(selector + " .credits")
    .dataset.value) > 20, row);
  result.afterTopUp = await page.$eval(row, (tr) => ({
    credits: tr.querySelector(".credits").dataset.value, calls: tr.querySelector(".calls").textContent,
    lastUsed: tr.querySelector(".last-used").textContent }));
  result.topUpMessage = await text("#app-message");

  await page.click(`${row} button[data-action="limits"]`);
  await page.fill("#dialog-rpm", "abc").catch(() => {});
  await page.fill("#dialog-rpm", "-5");
  await page.click("#dialog-ok");
  await page.waitForSelector("#dialog-message:not([hidden])").catch(() => {});
  result.badLimit = await page.$eval("#dialog", (node) => node.open);
  await page.fill("#dialog-rpm", "");
  await page.fill("#dialog-tpm", "50000");
  await page.click("#dialog-ok");
  await page.waitForSelector("#dialog", { state: "hidden" });

  // -- usage: the calls just made, as charts and CSV --------------------------------------------
  await tab("usage");
  await page.waitForSelector("#chart-day rect.bar", { state: "attached" });
  await page.waitForFunction(() => document.querySelectorAll("#chart-model rect.bar").length > 0);
  const bars = (selector) => page.$$eval(selector + " rect.bar", (rects) =>
    rects.map((rect) => ({ label: rect.dataset.label, value: Number(rect.dataset.value) })));
  result.usage = { day: await bars("#chart-day"), model: await bars("#chart-model"),
    key: await bars("#chart-key"), emptyHidden: await page.$eval("#usage-empty", (n) => n.hidden) };
  await page.selectOption("#usage-metric", "credits");
  result.usage.modelCredits = await bars("#chart-model");
  await shot("console-usage-en");
  const [download] = await Promise.all([page.waitForEvent("download"), page.click('[data-export="model"]')]);
  result.csv = fs.readFileSync(await download.path(), "utf8");
  result.csvName = download.suggestedFilename();

  // -- revoke --------------------------------------------------------------------------------
  await tab("keys");
  await page.click(`${row} button[data-action="revoke"]`);
  await page.click("#dialog-ok");
  await page.waitForSelector(`${row}[data-status="out"]`);
  result.revokedRow = await page.$eval(row, (tr) => ({ status: tr.querySelector(".badge").textContent,
    buttons: tr.querySelectorAll("button").length }));
  result.afterRevoke = (await chat(newKey, "three #sim tokens=2", "gpt-5")).status;
  await page.fill("#key-search", "");

  // -- the relay unreachable (the browser offline), then back ----------------------------------
  await tab("overview");
  await context.setOffline(true);
  await page.waitForSelector("#live-status.bad", { timeout: 10000 });
  result.unreachable = { live: await text("#live-status"), message: await text("#app-message") };
  await context.setOffline(false);
  await page.waitForSelector("#live-status:not(.bad)", { timeout: 10000 });

  // -- in Chinese: every view, no English left in the labels -----------------------------------
  await page.click('[data-lang="zh"]');
  result.zh.lang = await page.evaluate(() => document.documentElement.lang);
  result.zh.title = await page.title();
  for (const name of ["overview", "accounts", "keys", "usage"]) {
    await tab(name);
    await page.waitForTimeout(300);
    result.zh[name] = { english: await englishLeft(page, NAMES), heading: await text("#view-" + name + " h2") };
    await shot("console-" + name + "-zh");
  }
  await tab("keys");
  await page.click('#keys-table tbody tr[data-status="ok"] button[data-action="topup"]');
  result.zh.dialog = { english: await englishLeft(page, NAMES), title: await text("#dialog-title") };
  await page.click("#dialog-cancel");
  await page.click("#sign-out");
  result.zh.login = { english: await englishLeft(page, NAMES), message: await text("#login-message") };
  await shot("console-login-zh");

  result.storageAtEnd = await storage(page, context);
  await page.reload({ waitUntil: "load" });
  result.afterReload = await page.evaluate((secret) => ({
    appHidden: document.getElementById("app").hidden,
    input: document.getElementById("token-input").value,
    tokenInPage: document.documentElement.outerHTML.includes(secret),
  }), adminToken);
  result.storageAfterReload = await storage(page, context);

  // -- a Chinese browser gets the Chinese page by itself, at phone width -----------------------
  const { profile: zhProfile, context: zhContext } = await launch("console-zh", "zh-CN",
    { width: 390, height: 844 });
  try {
    const zhPage = zhContext.pages()[0] || (await zhContext.newPage());
    await zhPage.goto(relayUrl + "/console", { waitUntil: "load" });
    result.zhBrowser = {
      lang: await zhPage.evaluate(() => document.documentElement.lang),
      heading: await zhPage.textContent("h1"),
      overflow: await zhPage.evaluate(() => document.documentElement.scrollWidth > window.innerWidth),
      english: await englishLeft(zhPage, NAMES),
    };
    await zhPage.fill("#token-input", adminToken);
    await zhPage.click("#sign-in");
    await zhPage.waitForSelector("#pools-table tbody tr[data-pool]");
    result.zhBrowser.signedInOverflow = await zhPage.evaluate(() =>
      document.documentElement.scrollWidth > window.innerWidth);
    await zhPage.screenshot({ path: path.join(shots, "console-overview-zh-phone.png"), fullPage: true });
    // a key never used: the usage view's empty state
    await zhPage.click("#tab-usage");
    await zhPage.waitForSelector(`#usage-key option[value="${idleKeyId}"]`, { state: "attached" });
    await zhPage.selectOption("#usage-key", idleKeyId);
    await zhPage.waitForSelector("#usage-empty:not([hidden])");
    result.zhBrowser.emptyUsage = {
      text: await zhPage.textContent("#usage-empty"),
      model: await zhPage.textContent("#chart-model"),
      english: await englishLeft(zhPage, NAMES),
    };
    await zhPage.screenshot({ path: path.join(shots, "console-usage-empty-zh-phone.png"), fullPage: true });
  } finally {
    await zhContext.close();
    fs.rmSync(zhProfile, { recursive: true, force: true });
  }
} finally {
  await context.close();
}
result.profileFilesWithSecrets = filesHolding(profile, [adminToken, newKey]);
fs.rmSync(profile, { recursive: true, force: true });
console.log(JSON.stringify(result));
