// Drives Debian's Chromium (headless) through playwright-core, for the browser tests
// (tests/support/browser.py). JSON-lines commands on stdin, JSON-lines events on stdout,
// as client.mjs does.
//
// Usage: node browser.mjs USER_DATA_DIR
//
// Commands (each with "cmd" and an optional "id"; each answered by an "ack", carrying
// any result, once it is done, or by a "command_error"): open {page, url, timeout},
// evaluate {page, expression}, fill {page, selector, value}, click {page, selector},
// wait_for {page, expression, timeout}, screenshot {page, path}, close_page {page},
// exit.
//
// Events: ready {browser, playwright}, page_event {page, name, detail} (what a page
// reports with `window.reportToTest(name, detail)`), console {page, level, text},
// page_error {page, message}, websocket {page, url, state: open|close|error}, closing.
//
// The browser always goes with the driver: on `exit`, on the end of stdin, on SIGTERM,
// SIGINT or SIGHUP, and on an uncaught error, the browser is closed before the driver
// exits. Commands run concurrently, so a long wait_for does not hold up the others.

import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const CHROMIUM = process.env.PHXBROKER_CHROMIUM || "/usr/bin/chromium";
// Headless, no sandbox (tests may run as root, where Chromium's sandbox refuses to start),
// no GPU, and nothing that talks to the internet on its own.
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-quic",
  "--no-first-run",
  "--disable-component-update",
  "--disable-sync",
];
const DEFAULT_TIMEOUT_MS = 10_000;
const CLOSE_TIMEOUT_MS = 10_000;
const WAIT_POLL_MS = 20;

function emit(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

const userDataDir = process.argv[2];
if (!userDataDir) {
  process.stderr.write("usage: node browser.mjs USER_DATA_DIR (a fresh, empty directory)\n");
  process.exit(2);
}

const pages = new Map(); // name -> playwright Page
const pageNames = new WeakMap(); // playwright Page -> name
let context = null;
let closing = null;

async function launch() {
  // A persistent context on the directory we were given: a fresh profile per driver, and a
  // name by which the test finds every Chromium process of this run (pgrep -f).
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    chromiumSandbox: false,
    args: CHROMIUM_ARGS,
    handleSIGINT: false,
    handleSIGTERM: false,
    handleSIGHUP: false,
  });
  await context.exposeBinding("reportToTest", ({ page }, name, detail) => {
    emit({ type: "page_event", page: pageNames.get(page) ?? null, name, detail: detail ?? null });
  });
  const blank = context.pages()[0] ?? (await context.newPage());
  const cdp = await context.newCDPSession(blank);
  const { product } = await cdp.send("Browser.getVersion");
  await cdp.detach();
  const playwright = JSON.parse(
    readFileSync(new URL("./node_modules/playwright-core/package.json", import.meta.url)),
  ).version;
  emit({ type: "ready", browser: product, playwright });
}

function watch(name, page) {
  page.on("console", (msg) => {
    emit({ type: "console", page: name, level: msg.type(), text: msg.text() });
  });
  page.on("pageerror", (error) => {
    emit({ type: "page_error", page: name, message: String(error?.stack ?? error) });
  });
  page.on("websocket", (ws) => {
    const url = ws.url();
    emit({ type: "websocket", page: name, url, state: "open" });
    ws.on("socketerror", (error) => {
      emit({ type: "websocket", page: name, url, state: "error", error: String(error) });
    });
    ws.on("close", () => emit({ type: "websocket", page: name, url, state: "close" }));
  });
}

function requirePage(name) {
  const page = pages.get(name);
  if (!page) throw new Error(`no page named ${JSON.stringify(name)}: open it first`);
  return page;
}

// A person types into the tab in front. So must we: a background tab gets animation
// frames only about once a second, and Playwright waits for frames before it clicks.
async function frontTab(name) {
  const page = requirePage(name);
  await page.bringToFront();
  return page;
}

const commands = {
  async open({ page: name, url, timeout = DEFAULT_TIMEOUT_MS }) {
    if (pages.has(name)) throw new Error(`a page named ${JSON.stringify(name)} is open already`);
    const page = await context.newPage();
    pages.set(name, page);
    pageNames.set(page, name);
    watch(name, page);
    const response = await page.goto(url, { timeout, waitUntil: "load" });
    return { status: response ? response.status() : null, url: page.url() };
  },
  async evaluate({ page, expression }) {
    return { value: await requirePage(page).evaluate(expression) };
  },
  async fill({ page, selector, value }) {
    const target = await frontTab(page);
    await target.fill(selector, value, { timeout: DEFAULT_TIMEOUT_MS });
    return {};
  },
  async click({ page, selector }) {
    const target = await frontTab(page);
    await target.click(selector, { timeout: DEFAULT_TIMEOUT_MS });
    return {};
  },
  async wait_for({ page, expression, timeout = DEFAULT_TIMEOUT_MS }) {
    // Polled on a timer: the default, requestAnimationFrame, stalls in a page that is not
    // the front tab, and every page but the last opened is behind another.
    const handle = await requirePage(page).waitForFunction(expression, null, {
      timeout,
      polling: WAIT_POLL_MS,
    });
    const value = await handle.jsonValue();
    await handle.dispose();
    return { value };
  },
  async screenshot({ page, path }) {
    await requirePage(page).screenshot({ path, fullPage: true });
    return { path };
  },
  async close_page({ page: name }) {
    await requirePage(name).close();
    pages.delete(name);
    return {};
  },
  async exit() {
    shutdown(0);
    return {};
  },
};

async function run(cmd) {
  const handler = commands[cmd.cmd];
  try {
    if (!handler) throw new Error(`unknown command ${JSON.stringify(cmd.cmd)}`);
    const result = await handler(cmd);
    emit({ type: "ack", id: cmd.id, ...result });
  } catch (error) {
    emit({ type: "command_error", id: cmd.id, cmd: cmd.cmd, message: String(error?.message ?? error) });
  }
}

function shutdown(code) {
  if (closing) return closing;
  emit({ type: "closing" });
  const timer = setTimeout(() => {
    process.stderr.write(`the browser did not close within ${CLOSE_TIMEOUT_MS} ms\n`);
    process.exit(1);
  }, CLOSE_TIMEOUT_MS);
  closing = (context ? context.close() : Promise.resolve())
    .catch((error) => process.stderr.write(`closing the browser: ${error}\n`))
    .finally(() => {
      clearTimeout(timer);
      process.exit(code);
    });
  return closing;
}

for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"]) {
  process.on(signal, () => shutdown(1));
}
process.on("uncaughtException", (error) => {
  emit({ type: "exception", message: String(error?.stack ?? error) });
  shutdown(1);
});

try {
  await launch();
} catch (error) {
  emit({ type: "exception", message: `cannot start Chromium (${CHROMIUM}): ${error?.message ?? error}` });
  await shutdown(1);
}

const input = createInterface({ input: process.stdin });
input.on("line", (line) => {
  if (!line.trim()) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (error) {
    emit({ type: "command_error", message: `not JSON: ${error.message}` });
    return;
  }
  run(cmd);
});
input.on("close", () => shutdown(0));
