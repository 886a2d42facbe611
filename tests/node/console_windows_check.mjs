// The console's accounts view for a ChatGPT-plan account, in English and in Chinese: the text of
// each account's usage-windows cell. Prints one JSON object for tests/test_chatgpt_accounts.py.
//
// usage: node console_windows_check.mjs RELAY_URL ADMIN_TOKEN
import { launch } from "./page_tools.mjs";

const [relayUrl, adminToken] = process.argv.slice(2);
const result = {};
for (const locale of ["en-US", "zh-CN"]) {
  const { context } = await launch("console-windows", locale);
  try {
    const page = context.pages()[0] || (await context.newPage());
    await page.goto(relayUrl + "/console", { waitUntil: "load" });
    await page.fill("#token-input", adminToken);
    await page.click("#sign-in");
    await page.waitForSelector("#app:not([hidden])");
    await page.click("#tab-accounts");
    await page.waitForSelector("#accounts-table tbody tr[data-account]");
    result[locale] = await page.$$eval("#accounts-table tbody tr[data-account]", (rows) =>
      Object.fromEntries(rows.map((row) => [row.dataset.account,
        row.querySelector("td.windows").textContent])));
  } finally {
    await context.close();
  }
}
console.log(JSON.stringify(result));
