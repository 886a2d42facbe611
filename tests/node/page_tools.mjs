// Helpers shared by the page checks: launching Debian's Chromium, reading the browser's storage,
// walking a page's visible text for words left in English, and searching a profile for a secret.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

export async function launch(name, locale, viewport) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "relay-" + name + "-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.RELAY_TEST_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    locale,
    acceptDownloads: true,
    viewport: viewport || { width: 1280, height: 900 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--lang=" + locale,
    ],
  });
  return { profile, context };
}

/** What the browser holds for the page: storage entries, cookies (its own view and the jar). */
export async function storage(page, context) {
  const seen = await page.evaluate(() => {
    const entries = (store) => Object.keys(store).map((key) => key + "=" + store.getItem(key));
    return {
      localStorage: entries(localStorage),
      sessionStorage: entries(sessionStorage),
      cookie: document.cookie,
    };
  });
  seen.cookies = (await context.cookies()).map((cookie) => cookie.name + "=" + cookie.value);
  return seen;
}

/** Latin words in the page's visible text (and placeholders, labels) that are neither code nor
 * a name in `allowed`: what is left in English on a page shown in Chinese. */
export async function englishLeft(page, allowed) {
  return page.evaluate((allowedWords) => {
    const allow = new Set(allowedWords.map((word) => word.toLowerCase()));
    const skip = (node) => node.closest("code, pre, script, style, [translate=no], svg");
    const visible = (node) => node.checkVisibility ? node.checkVisibility() : !!node.offsetParent;
    const texts = [];
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
      const parent = walker.currentNode.parentElement;
      if (parent && !skip(parent) && visible(parent)) texts.push(walker.currentNode.textContent);
    }
    for (const node of document.querySelectorAll("[placeholder], [aria-label], [title]")) {
      if (skip(node) || !visible(node)) continue;
      for (const name of ["placeholder", "aria-label"]) {
        if (node.getAttribute(name)) texts.push(node.getAttribute(name));
      }
    }
    texts.push(document.title);
    const left = new Set();
    for (const text of texts) {
      for (const token of text.split(/[\s，。：；、（）()「」“”"'!?！？·—–,;]+/)) {
        // code, addresses, file names, variables, numbers: not prose
        if (!token || /[._/:~=@\d<>{}[\]$#`*…-]/.test(token) || /^[A-Z0-9_]+$/.test(token)) continue;
        for (const word of token.match(/[A-Za-z]{2,}/g) || []) {
          if (!allow.has(word.toLowerCase())) left.add(word);
        }
      }
    }
    return [...left];
  }, allowed);
}

/** The profile's files that contain any of `secrets` (the browser must keep none on disk). */
export function filesHolding(profile, secrets) {
  const holders = [];
  const walk = (folder) => {
    for (const entry of fs.readdirSync(folder, { withFileTypes: true })) {
      const file = path.join(folder, entry.name);
      if (entry.isDirectory()) walk(file);
      else if (entry.isFile()) {
        try {
          const bytes = fs.readFileSync(file);
          if (secrets.some((secret) => secret && bytes.includes(secret))) {
            holders.push(path.relative(profile, file));
          }
        } catch (error) {
          // sockets and locks vanish as the browser exits
        }
      }
    }
  };
  walk(profile);
  return holders;
}

/** Proper nouns and technical terms a Chinese page keeps as they are. */
export const NAMES = [
  "API", "Codex", "OpenAI", "Anthropic", "Claude", "Code", "SDK", "SDKs", "IDE", "CSV", "UTC",
  "Token", "Redis", "Cookie", "localStorage", "sessionStorage", "Authorization", "curl", "relay",
  "English", "Node", "npm", "Python", "Cursor", "Continue", "Cline", "Roo", "VS", "JetBrains",
  "TPM", "RPM", "ms", "WebSocket", "Responses", "Chat", "Completions", "Messages", "macOS",
  "Linux", "Windows", "Homebrew", "nvm", "TOML", "JSON", "Bearer", "OK",
  "URL", "ChatGPT", "Windsurf",
];
