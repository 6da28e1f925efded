// The dashboard in a real browser: headless Chromium (Debian's /usr/bin/chromium)
// driven by playwright-core, run by crates/kiln/tests/e2e/dashboard.rs.
//
// The Rust test starts the server and submits the build; this script drives the
// pages and asks the test for what only it can do by printing a line `@WORD` and
// waiting for the file `$KILN_DONE_DIR/WORD` (start the clients, kill a client,
// restart the server).
// It prints `ok: ...` per check, and exits non-zero on the first that fails.

import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

const require = createRequire(process.env.KILN_PLAYWRIGHT_DIR + '/');
const { chromium, request: apiRequest } = require('playwright-core');

const url = process.env.KILN_URL;
const token = process.env.KILN_ADMIN_TOKEN;
const build = process.env.KILN_BUILD;
const gate = process.env.KILN_GATE;
const doneDir = process.env.KILN_DONE_DIR;
const shots = process.env.KILN_SCREENSHOTS;
const TIMEOUT = 60_000;

function ok(what) {
  console.log(`ok: ${what}`);
}

function fail(what) {
  console.log(`FAILED: ${what}`);
  throw new Error(what);
}

// Asks the Rust test to do something and waits until it says it did.
async function ask(word) {
  console.log(`@${word}`);
  const done = path.join(doneDir, word);
  const deadline = Date.now() + TIMEOUT;
  while (!fs.existsSync(done)) {
    if (Date.now() > deadline) fail(`the test did not do ${word}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
const errors = [];
let expectedRefusals = 0;
let restarting = false;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on('console', (message) => {
    if (message.type() !== 'error') return;
    if (restarting) return;
    const where = message.location().url || '';
    // The wrong token's refusal is one the test asks for.
    if (where.endsWith('/ui/login') && expectedRefusals > 0) {
      expectedRefusals -= 1;
      return;
    }
    errors.push(`${message.text()} (${where})`);
  });
  page.on('pageerror', (error) => errors.push(`page error: ${error.message}`));

  // ---- login ----
  await page.goto(`${url}/`);
  await page.waitForSelector('#login');
  if (await page.locator('#builds').count()) fail('the farm shows before login');
  const anonymous = (await context.request.get(`${url}/v1/builds`)).status();
  if (anonymous !== 401) fail(`GET /v1/builds without login answered ${anonymous}`);
  ok('login is required');
  await page.screenshot({ path: `${shots}/dashboard-login.png` });
  expectedRefusals = 1;
  await page.fill('#token', 'not-the-admin-token');
  await page.click('#login button[type=submit]');
  await page.waitForFunction(() => document.querySelector('#login-error')?.textContent.length > 0);
  if (await page.locator('#builds').count()) fail('a wrong token opened the farm');
  ok('a wrong token is refused');
  await page.fill('#token', token);
  await page.click('#login button[type=submit]');
  await page.waitForSelector(`#builds tr[data-build="${build}"]`);
  const cookie = (await context.cookies()).find((c) => c.name === 'kiln_session');
  if (!cookie || !cookie.httpOnly || cookie.sameSite !== 'Strict') {
    fail(`the session cookie is not HttpOnly and SameSite=Strict: ${JSON.stringify(cookie)}`);
  }
  ok('the admin token logs in, with an HttpOnly, SameSite=Strict cookie');

  // ---- a build going from queued to running to finished, with no reload ----
  await page.goto(`${url}/#/builds/${build}`);
  await page.waitForSelector('#jobs tr[data-job="log"][data-state="queued"]');
  // A reload would lose this mark: it is there at the end only if nothing reloaded.
  await page.evaluate(() => { window.kilnNotReloaded = true; });
  await ask('start-clients');
  await page.waitForSelector('#jobs tr[data-job="log"][data-state="running"]');
  ok('a job shows running without a reload');

  // ---- the log tail grows while the job prints ----
  await page.click('#jobs tr[data-job="log"] a');
  await page.waitForSelector('#log span');
  const first = await page.locator('#log span').count();
  await page.waitForFunction((n) => document.querySelectorAll('#log span').length > n + 3, first);
  const second = await page.locator('#log span').count();
  ok(`the log tail grows while the job prints (${first} then ${second} lines)`);
  await page.waitForSelector('#job-status[data-state="finished"]');
  await page.waitForSelector('#images tr[data-image]');
  ok('the finished job shows its image');
  await page.screenshot({ path: `${shots}/dashboard-job.png`, fullPage: true });

  // ---- a reclaimed run ----
  await page.goto(`${url}/#/builds/${build}`);
  await page.waitForSelector('#jobs tr[data-job="victim"][data-state="running"]');
  await ask('kill-doomed');
  await page.waitForSelector('#gantt g.bar[data-job="victim"][data-outcome="reclaimed"]');
  ok('the run of the SIGKILLed client shows reclaimed');
  await page.waitForSelector('#gantt g.bar[data-job="victim"][data-client="rescuer"]');
  fs.writeFileSync(gate, '');
  for (const job of ['log', 'gated', 'victim']) {
    await page.waitForSelector(`#jobs tr[data-job="${job}"][data-state="finished"]`);
  }
  if (!(await page.evaluate(() => window.kilnNotReloaded === true))) fail('the page was reloaded');
  ok('every job went from queued to running to finished with no reload');

  // ---- the timeline: one bar per run, the clients' names ----
  const events = await (await context.request.get(`${url}/v1/builds/${build}/events`)).json();
  const runs = events.filter((event) => event.to === 'running').length;
  const bars = await page.locator('#gantt g.bar').count();
  if (bars !== runs) fail(`${bars} bars for ${runs} runs`);
  const names = await page.locator('#gantt text.client-name').allTextContents();
  for (const name of ['runner', 'doomed', 'rescuer']) {
    if (!names.includes(name)) fail(`the timeline has no row for ${name}: ${names}`);
  }
  ok(`the timeline has one bar per run (${runs}) and a row per client (${names.join(', ')})`);
  // Each finished run shows its upload, from what the server kept (this page was
  // opened after some of them ended).
  await page.reload();
  await page.waitForSelector('#gantt g.bar[data-outcome="finished"]');
  const finishedBars = await page.locator('#gantt g.bar[data-outcome="finished"]').count();
  const uploads = await page.locator('#gantt g.bar[data-outcome="finished"] rect.upload').count();
  if (finishedBars === 0 || uploads !== finishedBars) {
    fail(`${uploads} upload segments for ${finishedBars} finished runs`);
  }
  ok(`each finished run shows waiting, running and uploading (${finishedBars} runs)`);
  await page.hover('#gantt g.bar[data-job="victim"][data-outcome="reclaimed"] rect');
  await page.screenshot({ path: `${shots}/dashboard-build.png`, fullPage: true });

  // ---- restart from the page ----
  await page.goto(`${url}/#/jobs/${build}/gated`);
  await page.waitForSelector('#job-status[data-state="finished"]');
  await page.click('#restart');
  await page.waitForFunction(() => document.querySelector('#action-message')?.textContent === 'restart: done');
  await page.waitForFunction(() => document.querySelector('#events')?.textContent.includes('restarted'));
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll('#events tr')];
    const restart = rows.findIndex((row) => row.textContent.includes('restarted'));
    return restart >= 0 && rows.slice(restart).some((row) => row.querySelector('[data-state="finished"]'));
  });
  const restarted = await (await context.request.get(`${url}/v1/jobs/${build}/gated`)).json();
  if (restarted.attempt !== 1 || restarted.state !== 'finished') {
    fail(`after the restart: ${JSON.stringify(restarted)}`);
  }
  ok('restart from the page runs the job again');
  // A change without the CSRF token is refused, even with the session cookie.
  const forged = (await context.request.post(`${url}/v1/jobs/${build}/gated/restart`)).status();
  if (forged !== 403) fail(`a restart without the CSRF token answered ${forged}`);
  ok('a change without the CSRF token is refused');

  // ---- a server restart under an open page ----
  await page.goto(`${url}/#/builds/${build}`);
  await page.waitForSelector('#jobs tr[data-job="gated"][data-state="finished"]');
  await page.waitForFunction(() => document.querySelector('#live')?.textContent === 'live');
  await page.evaluate(() => { window.kilnBeforeServerRestart = true; });
  // While the server is down the browser's reconnection attempts are refused, and
  // say so in the console: those are the ones this part asks for.
  restarting = true;
  await ask('restart-server');
  await page.waitForFunction(() => document.querySelector('#live')?.textContent === 'live');
  restarting = false;
  // A change made after the restart shows on the page that was open through it.
  const csrf = (await (await context.request.get(`${url}/ui/session`)).json()).csrf;
  const again = await context.request.post(`${url}/v1/jobs/${build}/log/restart`, {
    headers: { 'x-kiln-csrf': csrf },
  });
  if (!again.ok()) fail(`restarting job log after the server restart answered ${again.status()}`);
  await page.waitForFunction(() => {
    const row = document.querySelector('#jobs tr[data-job="log"]');
    return row && row.dataset.state !== 'finished';
  });
  await page.waitForSelector('#jobs tr[data-job="log"][data-state="finished"]');
  if (!(await page.evaluate(() => window.kilnBeforeServerRestart === true))) {
    fail('the page was reloaded across the server restart');
  }
  ok('a server restart under an open page: it reconnects by itself and stays live');

  // ---- the other pages ----
  await page.goto(`${url}/#/`);
  await page.waitForSelector(`#builds tr[data-build="${build}"]`);
  await page.waitForSelector('#farm-clients tr[data-client="runner"]');
  await page.screenshot({ path: `${shots}/dashboard-farm.png`, fullPage: true });
  await page.goto(`${url}/#/clients`);
  await page.waitForSelector('#clients tr[data-client="rescuer"]');
  await page.screenshot({ path: `${shots}/dashboard-clients.png`, fullPage: true });
  await page.goto(`${url}/#/storage`);
  await page.waitForSelector('#storage [data-figure="bytes_stored"]');
  await page.screenshot({ path: `${shots}/dashboard-storage.png`, fullPage: true });
  ok('the farm, clients and storage pages show');

  // ---- usable at 1280×800 and at a phone's width ----
  for (const [width, height] of [[1280, 800], [390, 844]]) {
    await page.setViewportSize({ width, height });
    for (const hash of ['#/', `#/builds/${build}`, `#/jobs/${build}/log`, '#/clients', '#/storage']) {
      await page.goto(`${url}/${hash}`);
      await page.waitForSelector('main h1');
      await page.waitForTimeout(300);
      const wide = await page.evaluate(() => document.documentElement.scrollWidth);
      if (wide > width + 1) fail(`${hash} at ${width} px is ${wide} px wide`);
      const nav = await page.locator('#nav a').first().boundingBox();
      if (!nav || nav.x + nav.width > width) fail(`${hash} at ${width} px: the menu is off screen`);
    }
    if (width < 600) {
      await page.goto(`${url}/#/builds/${build}`);
      await page.waitForSelector('#gantt svg');
      await page.screenshot({ path: `${shots}/dashboard-phone.png`, fullPage: true });
    }
  }
  ok('every page fits 1280×800 and a 390 px phone');

  // ---- logout ends the session ----
  await page.setViewportSize({ width: 1280, height: 800 });
  await page.goto(`${url}/#/`);
  await page.waitForSelector('#logout:not([hidden])');
  const ended = (await context.cookies()).find((c) => c.name === 'kiln_session');
  await page.click('#logout');
  await page.waitForSelector('#login');
  const after = (await context.request.get(`${url}/v1/builds`)).status();
  if (after !== 401) fail(`after logout GET /v1/builds answered ${after}`);
  // The ended session's cookie, presented again, opens nothing, not even after the
  // server restarts.
  const outsider = await apiRequest.newContext();
  const replay = async () => (await outsider.get(`${url}/v1/builds`, {
    headers: { cookie: `kiln_session=${ended.value}` },
  })).status();
  if ((await replay()) !== 401) fail('the logged-out cookie still opens the API');
  restarting = true;
  await ask('restart-server-again');
  restarting = false;
  const replayed = await replay();
  if (replayed !== 401) fail(`after a server restart the logged-out cookie answered ${replayed}`);
  await outsider.dispose();
  ok('logging out ends the session, and it stays ended across a server restart');
  if (errors.length) fail(`errors in the browser console: ${errors.join(' | ')}`);
  ok('no errors in the browser console');
} finally {
  await browser.close();
}
