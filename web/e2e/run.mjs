// End-to-end run of the web page in headless Chromium (Debian's /usr/bin/chromium, driven
// by playwright-core) against a running Mailroom: real API, workers, Redis, PostgreSQL,
// Dovecot and an SMTP server. tests/web/test_web_e2e.py starts all of that, seeds the
// mailboxes and checks the outcomes on the servers afterwards; this script does what a
// person would do in the browser and fails on the first step that does not work.
//
// Input (environment): MAILROOM_URL, MAILROOM_KEY (an admin key), MAIL_EMAIL, IMAP_PORT,
// IMAP_USER, IMAP_PASSWORD, SMTP_PORT, SMTP_USER, SMTP_PASSWORD (the account to add),
// BIG_EMAIL (an account already added whose sync takes long), ARTEFACTS (folder for the
// screenshots and e2e-summary.json), CHROMIUM (default /usr/bin/chromium).
// Output: one JSON line on stdout with each step's time and what was seen.
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

import { chromium } from "playwright-core";

const env = process.env;
const need = (name) => {
  if (!env[name]) throw new Error(`${name} is not set`);
  return env[name];
};
const base = need("MAILROOM_URL");
const key = need("MAILROOM_KEY");
const email = need("MAIL_EMAIL");
const bigEmail = need("BIG_EMAIL");
const artefacts = env.ARTEFACTS ?? "test-results";
mkdirSync(artefacts, { recursive: true });

// On this closed network Chromium must not try to reach its own services.
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-dev-shm-usage",
];

const summary = { steps: [], screenshots: [], sync_progress_seen: [], console_errors: [] };
const started = Date.now();
let currentPage = null;

async function step(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
  } catch (err) {
    summary.failed = { step: name, error: String(err?.stack ?? err) };
    if (currentPage) await shot(currentPage, "failure.png").catch(() => undefined);
    throw err;
  } finally {
    summary.steps.push({ name, ms: Date.now() - t0 });
  }
}

async function shot(page, name) {
  const path = join(artefacts, name);
  await page.screenshot({ path, fullPage: true });
  summary.screenshots.push(name);
}

const dock = (page) => page.locator("aside.dock");
const dockTask = (page, label) => dock(page).locator("section.task", { has: page.getByText(label, { exact: true }) });

async function waitTaskState(page, label, states, timeout = 60_000) {
  const task = dockTask(page, label);
  await task.first().waitFor({ timeout });
  const deadline = Date.now() + timeout;
  for (;;) {
    const state = await task.first().getAttribute("data-state");
    if (states.includes(state)) return state;
    if (Date.now() > deadline) throw new Error(`task "${label}" is ${state}, not ${states.join("/")}`);
    await page.waitForTimeout(100);
  }
}

const browser = await chromium.launch({
  executablePath: env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: CHROMIUM_ARGS,
});
let exitCode = 0;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, reducedMotion: "reduce" });
  // Layout shifts (Chromium's Layout Instability API), added up while tasks are polled.
  await context.addInitScript(() => {
    window.__shift = 0;
    new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) if (!entry.hadRecentInput) window.__shift += entry.value;
    }).observe({ type: "layout-shift", buffered: true });
  });
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  currentPage = page;
  page.on("console", (msg) => msg.type() === "error" && summary.console_errors.push(msg.text()));
  const requested = [];
  page.on("request", (req) => requested.push(req.url()));

  await step("sign in", async () => {
    await page.goto(base + "/");
    await page.getByLabel("API key").fill(key);
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("heading", { name: "Accounts", level: 1 }).waitFor();
    if (page.url().includes(key)) throw new Error("the key is in the URL");
  });

  await step("add account (Dovecot), with a validation error first", async () => {
    await page.getByRole("button", { name: "Add an account" }).click();
    const form = page.getByRole("form", { name: "Add an account" });
    const field = (id) => form.locator(`[id="new-${id}"]`);
    await field("email").fill("not-an-address");
    await field("imap.host").fill("127.0.0.1");
    await field("imap.port").fill(need("IMAP_PORT"));
    await field("imap.tls").selectOption("none");
    await field("imap.username").fill(need("IMAP_USER"));
    await field("imap.password").fill(need("IMAP_PASSWORD"));
    await field("smtp.host").fill("127.0.0.1");
    await field("smtp.port").fill(need("SMTP_PORT"));
    await field("smtp.tls").selectOption("none");
    await field("smtp.username").fill(need("SMTP_USER"));
    await field("smtp.password").fill(need("SMTP_PASSWORD"));
    await form.getByRole("button", { name: "Add account" }).click();
    const emailError = form.locator('[id="new-email-error"]');
    await emailError.filter({ hasText: /\S/ }).waitFor();
    if ((await field("email").getAttribute("aria-invalid")) !== "true") throw new Error("email not marked invalid");
    await shot(page, "01-validation-error.png");
    await field("email").fill(email);
    await field("name").fill("Browser test");
    await form.getByRole("button", { name: "Add account" }).click();
    await page.getByRole("heading", { name: email, level: 2, exact: true }).waitFor();
  });

  await step("sync and watch the progress bar reach 100", async () => {
    const card = page.locator("li.account", { has: page.getByRole("heading", { name: email, level: 2, exact: true }) });
    await card.getByRole("button", { name: "Sync", exact: true }).click();
    const label = `Sync: ${email}`;
    const bar = dockTask(page, label).getByRole("progressbar");
    await bar.waitFor();
    await page.evaluate(() => (window.__shift = 0));
    const deadline = Date.now() + 60_000;
    for (;;) {
      const now = Number(await bar.getAttribute("aria-valuenow"));
      if (summary.sync_progress_seen.at(-1) !== now) summary.sync_progress_seen.push(now);
      if (now === 100) break;
      if (Date.now() > deadline) throw new Error(`sync stuck at ${now}%`);
      await page.waitForTimeout(50);
    }
    if ((await waitTaskState(page, label, ["succeeded", "failed", "cancelled"])) !== "succeeded") throw new Error("sync did not succeed");
    summary.layout_shift_while_polling = await page.evaluate(() => window.__shift);
    if (summary.layout_shift_while_polling > 0.01) throw new Error(`layout shift ${summary.layout_shift_while_polling} while polling`);
    await card.getByText(/folders, \d+ messages/).waitFor();
    await shot(page, "02-sync-done.png");
  });

  await step("open a message (sanitised HTML in a sandboxed frame, attachments)", async () => {
    const card = page.locator("li.account", { has: page.getByRole("heading", { name: email, level: 2, exact: true }) });
    await card.getByRole("link", { name: "Open mail" }).click();
    await page.getByRole("heading", { name: "Mail", level: 1 }).waitFor();
    await page.getByRole("link", { name: /Welcome to Mailroom/ }).click();
    await page.getByRole("heading", { name: "Welcome to Mailroom", level: 2 }).waitFor();
    const frame = page.locator('iframe[title="Message content"]');
    if ((await frame.getAttribute("sandbox")) !== "") throw new Error("the message frame is not fully sandboxed");
    await page.frameLocator('iframe[title="Message content"]').getByText("Hello from the HTML part").waitFor();
    const html = await frame.getAttribute("srcdoc");
    if (/<script|onerror|onclick|tracker\.example/i.test(html)) throw new Error(`unsanitised HTML reached the frame: ${html}`);
    if (requested.some((u) => u.includes("tracker.example"))) throw new Error("the page loaded a remote image");
    await page.getByRole("region", { name: "Attachments" }).getByText("report.txt").waitFor();
    await shot(page, "03-message.png");
  });

  await step("reply and send (a double click sends once)", async () => {
    await page.getByRole("button", { name: "Reply" }).click();
    const form = page.getByRole("form", { name: "Reply" });
    await form.getByLabel("Message").fill("Thanks, this came from the browser test.");
    await form.getByRole("button", { name: "Send" }).dblclick();
    await waitTaskState(page, "Send: Re: Welcome to Mailroom", ["succeeded"]);
    await shot(page, "04-sent.png");
  });

  await step("delete a message to Trash, with a confirmation", async () => {
    await page.getByRole("link", { name: /Delete me/ }).click();
    await page.getByRole("heading", { name: "Delete me", level: 2 }).waitFor();
    await page.getByRole("button", { name: "Delete", exact: true }).click();
    await page.getByRole("group", { name: "Move this message to Trash?" }).waitFor();
    await page.getByRole("button", { name: "Move to Trash" }).click();
    await waitTaskState(page, "Delete: Delete me", ["succeeded"]);
    await page.getByRole("link", { name: /Delete me/ }).waitFor({ state: "detached" });
  });

  await step("mark spam", async () => {
    await page.getByRole("link", { name: /Cheap watches/ }).click();
    await page.getByRole("heading", { name: "Cheap watches", level: 2 }).waitFor();
    await page.getByRole("button", { name: "Mark spam" }).click();
    const label = "Mark spam: Cheap watches";
    await dockTask(page, label).waitFor();
    summary.mark_spam_task_state = await waitTaskState(page, label, ["succeeded", "failed", "cancelled"]);
    await page.getByRole("region", { name: "Spam verdict" }).getByText(/you marked it spam/).waitFor();
    await shot(page, "05-marked-spam.png");
  });

  await step("cancel a long sync, after a reload picked it up again", async () => {
    await page.getByRole("link", { name: "Accounts", exact: true }).click();
    const card = page.locator("li.account", { has: page.getByRole("heading", { name: bigEmail, level: 2, exact: true }) });
    await card.getByRole("button", { name: "Sync", exact: true }).click();
    const label = `Sync: ${bigEmail}`;
    const bar = dockTask(page, label).getByRole("progressbar");
    await page.waitForFunction(
      (l) => [...document.querySelectorAll("aside.dock section.task")].some((s) => s.textContent.includes(l) && s.dataset.state === "running"),
      label,
    );
    await page.reload();
    await page.getByRole("heading", { name: "Accounts", level: 1 }).waitFor();
    await page.waitForFunction(
      (l) => [...document.querySelectorAll("aside.dock section.task")].some((s) => s.textContent.includes(l) && Number(s.querySelector("[role=progressbar]").getAttribute("aria-valuenow")) > 0),
      label,
    );
    summary.long_sync_progress_at_cancel = Number(await bar.getAttribute("aria-valuenow"));
    await page.evaluate(() => (window.__shift = 0));
    await dockTask(page, label).getByRole("button", { name: "Cancel" }).click();
    const state = await waitTaskState(page, label, ["succeeded", "failed", "cancelled"]);
    if (state !== "cancelled") throw new Error(`the long sync ended ${state}, not cancelled`);
    summary.long_sync_progress_final = Number(await bar.getAttribute("aria-valuenow"));
    summary.layout_shift_while_cancelling = await page.evaluate(() => window.__shift);
    if (summary.layout_shift_while_cancelling > 0.01) throw new Error(`layout shift ${summary.layout_shift_while_cancelling} while polling`);
    await shot(page, "06-sync-cancelled.png");
  });

  await step("task list with filters", async () => {
    await page.getByRole("link", { name: "Tasks", exact: true }).click();
    await page.getByRole("heading", { name: "Task history", level: 1 }).waitFor();
    await page.getByLabel("State").selectOption("cancelled");
    await page.getByLabel("Type").selectOption("sync");
    await page.getByRole("cell", { name: bigEmail }).first().waitFor();
    const rows = await page.locator("table.tasks tbody tr").count();
    if (rows < 1) throw new Error("the cancelled sync is not listed");
  });

  await step("admin page", async () => {
    await page.getByRole("link", { name: "Admin", exact: true }).click();
    // The fixtures run no Beat, so the tenant's health reads "degraded" and says why.
    await page.getByRole("heading", { name: /^Health: (ok|degraded)$/ }).waitFor();
    await page.getByText(/^database: ok$/).waitFor();
    const syncRow = page.getByRole("row", { name: /^sync / });
    await syncRow.waitFor();
    const workers = await syncRow.getByRole("cell").nth(1).textContent();
    if (workers !== "1") throw new Error(`sync workers shown: ${workers}`);
    const spam = page.getByRole("form", { name: "Spam filter" });
    await spam.getByLabel(/^Threshold/).fill("5");
    await spam.getByRole("button", { name: "Save spam settings" }).click();
    await spam.locator("#spam-threshold-error").filter({ hasText: /\S/ }).waitFor();
    await spam.getByLabel(/^Threshold/).fill("0.8");
    await spam.getByLabel(/^Always spam/).fill("Spam.Example");
    await spam.getByRole("button", { name: "Save spam settings" }).click();
    await spam.getByText("Saved.").waitFor();
    await shot(page, "07-admin.png");
  });

  await step("phone width", async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    await page.getByRole("link", { name: "Mail", exact: true }).click();
    await page.getByRole("heading", { name: "Mail", level: 1 }).waitFor();
    await page.getByLabel("Account").selectOption({ label: email });
    await page.getByRole("link", { name: /Welcome to Mailroom/ }).first().waitFor();
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    if (overflow > 1) {
      const wide = await page.evaluate(() =>
        [...document.querySelectorAll("body *")]
          .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 1)
          .slice(0, 5)
          .map((e) => `${e.tagName}.${e.className} ${Math.round(e.getBoundingClientRect().right)}px`),
      );
      throw new Error(`the page is ${overflow}px wider than a phone: ${wide.join(", ")}`);
    }
    await shot(page, "08-phone.png");
  });

  await step("keyboard: a new page focuses its heading, and the page works from the keyboard", async () => {
    await page.setViewportSize({ width: 1280, height: 900 });
    await page.getByRole("link", { name: "Accounts", exact: true }).click();
    await page.getByRole("heading", { name: "Accounts", level: 1 }).waitFor();
    const focusedHeading = await page.evaluate(() => document.activeElement?.tagName + " " + document.activeElement?.textContent);
    if (focusedHeading !== "H1 Accounts") throw new Error(`focus after navigation: ${focusedHeading}`);
    await page.keyboard.press("Tab");
    await page.keyboard.press("Enter");
    await page.getByRole("form", { name: "Add an account" }).waitFor();
    await page.keyboard.press("Tab");
    const next = await page.evaluate(() => document.activeElement?.id);
    if (next !== "new-email") throw new Error(`Tab after opening the form focused "${next}"`);
    await page.keyboard.press("Shift+Tab");
    const back = await page.evaluate(() => document.activeElement?.textContent?.trim());
    if (back !== "Add an account") throw new Error(`Shift+Tab focused "${back}"`);
  });

  await step("an API that cannot be reached is said so", async () => {
    await page.route("**/api/**", (route) => route.abort("connectionrefused"));
    await page.reload();
    await page.getByText("The Mailroom API cannot be reached", { exact: false }).first().waitFor();
    await shot(page, "09-unreachable.png");
    await page.unroute("**/api/**");
  });

  await step("sign out forgets the key", async () => {
    await page.goto(base + "/accounts");
    await page.getByRole("button", { name: "Sign out" }).click();
    await page.getByLabel("API key").waitFor();
    const stored = await page.evaluate(() => sessionStorage.getItem("mailroom.key"));
    if (stored !== null) throw new Error("the key is still stored");
  });
  await context.close();
} catch (err) {
  exitCode = 1;
  console.error(err?.stack ?? String(err));
} finally {
  await browser.close();
  summary.total_ms = Date.now() - started;
  writeFileSync(join(artefacts, "e2e-summary.json"), JSON.stringify(summary, null, 2));
  console.log(JSON.stringify(summary));
}
process.exit(exitCode);
