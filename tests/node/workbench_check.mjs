// Drives the key workbench page in headless Chromium (Debian's package) with playwright-core,
// as a person would: paste a key, look it up, read what the page shows, take a screenshot,
// reload, try a wrong key. Prints one JSON object for tests/test_workbench.py to check.
//
// usage: node workbench_check.mjs RELAY_URL KEY WRONG_KEY SCREENSHOT_PATH
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";
import { englishLeft, filesHolding, launch, lowContrast, NAMES } from "./page_tools.mjs";

const [relayUrl, key, wrongKey, screenshot] = process.argv.slice(2);
const executablePath = process.env.RELAY_TEST_CHROMIUM || "/usr/bin/chromium";
const profile = fs.mkdtempSync(path.join(os.tmpdir(), "relay-workbench-"));

const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  viewport: { width: 1280, height: 900 },
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const result = { requests: [], errors: [], consoleErrors: [] };
try {
  const page = context.pages()[0] || (await context.newPage());
  page.on("request", (request) => {
    result.requests.push({
      url: request.url(),
      method: request.method(),
      authorization: request.headers().authorization || null,
    });
  });
  page.on("pageerror", (error) => result.errors.push(String(error)));
  page.on("console", (message) => {
    if (message.type() === "error") result.consoleErrors.push(message.text());
  });

  await page.goto(relayUrl + "/", { waitUntil: "load" });
  result.title = await page.title();
  result.privacyNote = await page.textContent("#privacy-note");
  result.placeholderSnippet = await page.textContent('[data-snippet="curl"] code');

  await page.fill("#key-input", key);
  await page.click("#lookup");
  await page.waitForSelector("#dashboard:not([hidden])", { timeout: 15000 });

  const figure = async (id) =>
    page.$eval("#" + id, (element) => ({ text: element.textContent, value: element.dataset.value }));
  result.balance = {};
  for (const name of ["remaining", "granted", "used", "held"]) {
    result.balance[name] = await figure("bal-" + name);
  }
  result.totals = {};
  for (const name of ["calls", "errors", "input", "cached", "cache-write", "output", "reasoning",
    "credits"]) {
    result.totals[name] = await figure("sum-" + name);
  }
  const table = (selector, keyAttribute) =>
    page.$$eval(selector, (rows, attribute) => rows.map((row) => {
      const cells = {};
      for (const cell of row.querySelectorAll("td")) {
        const name = [...cell.classList].find((c) => c !== "num") || "cell";
        cells[name] = { text: cell.textContent, value: cell.dataset.value ?? null };
      }
      return { id: row.getAttribute(attribute), cells };
    }), keyAttribute);
  result.models = await table("#models-table tbody tr[data-model]", "data-model");
  result.calls = await table("#calls-table tbody tr[data-request-id]", "data-request-id");
  result.limits = await page.$$eval("#limit-rows .limit", (rows) =>
    rows.map((row) => ({ name: row.dataset.limit, text: row.textContent })));
  result.chart = await page.$$eval("#chart rect.bar", (bars) =>
    bars.map((bar) => ({ label: bar.dataset.label, value: Number(bar.dataset.value) })));
  result.snippets = await page.$$eval("[data-snippet]", (figures) =>
    Object.fromEntries(figures.map((f) => [f.dataset.snippet, f.querySelector("code").textContent])));
  result.keyIdentity = await page.textContent("#key-identity");
  result.keyExpiry = await page.textContent("#key-expiry");

  await page.screenshot({ path: screenshot, fullPage: true });
  result.lowContrast = await lowContrast(page);
  result.queueSteps = await page.$$eval("#queue-steps li", (items) => items.map((li) => li.textContent));
  result.tutorial = await page.$$eval("#tutorial-steps li", (items) => items.map((li) => ({
    text: li.querySelector("span").textContent,
    code: li.querySelector("code") ? li.querySelector("code").textContent : null })));

  // -- in Chinese, by the switch: no English left in the labels --------------------------------
  await page.click('[data-lang="zh"]');
  result.zh = {
    lang: await page.evaluate(() => document.documentElement.lang),
    title: await page.title(),
    heading: await page.textContent("h1"),
    english: await englishLeft(page, NAMES),
    lowContrast: await lowContrast(page),
    keyExpiry: await page.textContent("#key-expiry"),
    limits: await page.$$eval("#limit-rows .limit", (rows) => rows.map((row) => row.textContent)),
    queueSteps: await page.$$eval("#queue-steps li", (items) => items.map((li) => li.textContent)),
    tutorial: await page.$$eval("#tutorial-steps li span", (items) => items.map((s) => s.textContent)),
    snippetTitles: await page.$$eval(".snippet figcaption span", (s) => s.map((n) => n.textContent)),
    codex: await page.textContent('[data-snippet="codex"] code'),
  };
  await page.screenshot({ path: screenshot.replace(/\.png$/, "-zh.png"), fullPage: true });
  await page.screenshot({ path: screenshot.replace(/\.png$/, "-zh-top.png") });
  await page.click('[data-lang="en"]');
  result.backInEnglish = await page.textContent("#quota-title");

  result.storageWhileShown = await page.evaluate(() => ({
    localStorage: localStorage.length,
    sessionStorage: sessionStorage.length,
    cookie: document.cookie,
  }));
  result.cookiesWhileShown = (await context.cookies()).length;

  await page.reload({ waitUntil: "load" });
  result.afterReload = await page.evaluate((secret) => ({
    input: document.getElementById("key-input").value,
    dashboardHidden: document.getElementById("dashboard").hidden,
    keyInPage: document.documentElement.outerHTML.includes(secret),
    localStorage: localStorage.length,
    sessionStorage: sessionStorage.length,
    cookie: document.cookie,
    url: window.location.href,
  }), key);
  result.cookiesAfterReload = (await context.cookies()).length;

  await page.fill("#key-input", wrongKey);
  await page.click("#lookup");
  await page.waitForSelector("#message.error:not([hidden])", { timeout: 15000 });
  result.wrongKey = {
    message: await page.textContent("#message"),
    dashboardHidden: await page.$eval("#dashboard", (element) => element.hidden),
    snippet: await page.textContent('[data-snippet="curl"] code'),
  };
  // -- a Chinese browser gets the Chinese page by itself, at phone width -----------------------
  const zh = await launch("workbench-zh", "zh-CN", { width: 390, height: 844 });
  try {
    const zhPage = zh.context.pages()[0] || (await zh.context.newPage());
    await zhPage.goto(relayUrl + "/workbench", { waitUntil: "load" });
    result.zhBrowser = {
      lang: await zhPage.evaluate(() => document.documentElement.lang),
      heading: await zhPage.textContent("h1"),
      english: await englishLeft(zhPage, NAMES),
    };
    await zhPage.fill("#key-input", key);
    await zhPage.click("#lookup");
    await zhPage.waitForSelector("#dashboard:not([hidden])", { timeout: 15000 });
    result.zhBrowser.englishWithKey = await englishLeft(zhPage, NAMES);
    result.zhBrowser.overflow = await zhPage.evaluate(() =>
      document.documentElement.scrollWidth > window.innerWidth);
    await zhPage.screenshot({ path: screenshot.replace(/\.png$/, "-zh-phone.png"), fullPage: true });
  } finally {
    await zh.context.close();
    result.zhProfileFilesWithKey = filesHolding(zh.profile, [key]);
    fs.rmSync(zh.profile, { recursive: true, force: true });
  }
} finally {
  await context.close();
}
// What the browser kept on disk: the profile must not hold the key anywhere.
const holders = [];
const walk = (folder) => {
  for (const entry of fs.readdirSync(folder, { withFileTypes: true })) {
    const file = path.join(folder, entry.name);
    if (entry.isDirectory()) walk(file);
    else if (entry.isFile()) {
      try {
        if (fs.readFileSync(file).includes(key)) holders.push(path.relative(profile, file));
      } catch (error) {
        // sockets and locks vanish as the browser exits
      }
    }
  }
};
walk(profile);
result.profileFilesWithKey = holders;
fs.rmSync(profile, { recursive: true, force: true });
console.log(JSON.stringify(result));
