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

/** Visible text whose contrast with its background is under WCAG AA (4.5:1, or 3:1 for large
 * text): each as {text, ratio, color, background}. Backgrounds are the nearest opaque ones. */
export async function lowContrast(page) {
  return page.evaluate(() => {
    const parse = (value) => {
      const parts = value.match(/[\d.]+/g);
      if (!parts) return null;
      const [r, g, b, a = 1] = parts.map(Number);
      return { r, g, b, a };
    };
    const luminance = ({ r, g, b }) => {
      const linear = (c) => {
        const s = c / 255;
        return s <= 0.03928 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
      };
      return 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b);
    };
    const background = (node) => {
      for (let at = node; at; at = at.parentElement) {
        const color = parse(getComputedStyle(at).backgroundColor);
        if (color && color.a > 0.5) return color;
      }
      return { r: 255, g: 255, b: 255, a: 1 };
    };
    const found = [];
    const seen = new Set();
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
      const node = walker.currentNode.parentElement;
      if (!node || seen.has(node) || !walker.currentNode.textContent.trim()) continue;
      seen.add(node);
      if (node.closest("svg, [disabled], .offscreen, .skip")) continue;
      if (!(node.checkVisibility ? node.checkVisibility() : node.offsetParent)) continue;
      const style = getComputedStyle(node);
      const color = parse(style.color);
      const back = background(node);
      const [light, dark] = [luminance(color), luminance(back)].sort((a, b) => b - a);
      const ratio = (light + 0.05) / (dark + 0.05);
      const size = parseFloat(style.fontSize);
      const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
      if (ratio < (large ? 3 : 4.5)) {
        found.push({ text: walker.currentNode.textContent.trim().slice(0, 40),
          ratio: Math.round(ratio * 100) / 100, color: style.color,
          background: `rgb(${back.r}, ${back.g}, ${back.b})` });
      }
    }
    return found;
  });
}
