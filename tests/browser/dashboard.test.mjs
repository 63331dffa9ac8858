// End-to-end tests of the dashboard in Debian's chromium against `stratus serve --demo`.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { startServer, startBrowser, screenshot, signIn, adminApi, axeViolations } from './harness.mjs';

/** Opens the device view of `id` and waits until it is that view with its config loaded. */
async function openDevice(page, base, id) {
  await page.goto(`${base}/#/device/${id}`);
  await page.waitForFunction((want) => document.querySelector('#view h1 .mono')?.textContent === want
    && /Version \d+/.test(document.querySelector('#desired-help')?.textContent || ''), id);
}

describe('dashboard', { timeout: 300000 }, () => {
  let server;
  let browser;
  let page;
  const pageErrors = [];

  before(async () => {
    server = await startServer();
    browser = await startBrowser();
    page = await browser.context.newPage();
    page.on('pageerror', (e) => pageErrors.push(`pageerror: ${e.message}`));
    page.on('console', (m) => {
      // HTTP error statuses the page handles (401 before sign-in, 403/412 on purpose, no stream
      // yet) are logged by chromium as "Failed to load resource"; CSP violations and script
      // errors are not expected.
      if (m.type() === 'error' && !/^Failed to load resource: the server responded with a status of/.test(m.text())
        && !/api\/v1\/stream/.test(m.text())) {
        pageErrors.push(`console: ${m.text()}`);
      }
    });
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it('refuses a wrong secret with a message and no cookie', async () => {
    await page.goto(`${server.base}/`);
    await page.locator('#client-secret').fill('not-the-secret');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByRole('alert').filter({ hasText: 'Sign-in failed' }).waitFor();
    assert.equal(await page.locator('#who').isVisible(), false, 'nobody is shown as signed in');
    const cookies = await browser.context.cookies(server.base);
    assert.equal(cookies.find((c) => c.name === 'stratus_session'), undefined);
  });

  it('signs in and shows the demo fleet of 12 devices', async () => {
    await signIn(page, server);
    await page.waitForFunction(() => document.querySelectorAll('#fleet-table tr[data-device^="demo-"]').length === 12);
    const ids = await page.locator('#fleet-table tr[data-device]').evaluateAll((rows) => rows.map((r) => r.dataset.device));
    assert.deepEqual(ids, Array.from({ length: 12 }, (_, i) => `demo-${String(i + 1).padStart(4, '0')}`));
    assert.match(await page.locator('#fleet-count').textContent(), /12 of 12 devices/);
    await screenshot(page, 'fleet');
  });

  it('searches and sorts the fleet', async () => {
    await page.locator('#fleet-search').fill('demo-0003');
    await page.waitForFunction(() => document.querySelectorAll('#fleet-table tr[data-device]').length === 1);
    await page.locator('#fleet-search').fill('');
    await page.locator('button.sort[data-key="id"]').click(); // already by id: now descending
    await page.waitForFunction(() => document.querySelector('#fleet-table tr[data-device]')?.dataset.device === 'demo-0012');
    assert.equal(await page.locator('th:has(button.sort[data-key="id"])').getAttribute('aria-sort'), 'descending');
  });

  it('keeps the session token in an HttpOnly, SameSite=Strict cookie out of JavaScript', async () => {
    const cookie = (await browser.context.cookies(server.base)).find((c) => c.name === 'stratus_session');
    assert.ok(cookie, 'the session cookie is set');
    assert.equal(cookie.httpOnly, true);
    assert.equal(cookie.sameSite, 'Strict');
    assert.equal(cookie.path, '/');
    const visible = await page.evaluate(() => document.cookie);
    assert.ok(!visible.includes('stratus_session'), `document.cookie shows: ${visible}`);
    assert.ok(!visible.includes(cookie.value));
  });

  it('refuses a cookie-authenticated POST/PUT without the CSRF header (403)', async () => {
    const result = await page.evaluate(async () => {
      const put = (headers) => fetch('/api/v1/devices/demo-0005/config', {
        method: 'PUT', headers: { 'Content-Type': 'application/json', ...headers }, body: '{"probe": 1}',
      });
      const without = await put({});
      const wrong = await put({ 'X-CSRF-Token': 'f'.repeat(64) });
      const { csrf } = await (await fetch('/dashboard/session')).json();
      const withIt = await put({ 'X-CSRF-Token': csrf });
      const logout = await fetch('/dashboard/logout', { method: 'POST' });
      return { without: [without.status, await without.json()], wrong: wrong.status, withIt: withIt.status, logout: logout.status };
    });
    assert.equal(result.without[0], 403);
    assert.equal(result.without[1].error, 'invalid_csrf_token');
    assert.equal(result.wrong, 403);
    assert.equal(result.withIt, 200);
    assert.equal(result.logout, 403, 'logout needs the CSRF token too');
  });

  it('draws live points on a device chart', async () => {
    await page.goto(`${server.base}/#/device/demo-0001`);
    const fig = page.locator('figure.live[data-key="temperature"]');
    await fig.waitFor();
    await page.waitForFunction(() => Number(document.querySelector('figure.live[data-key="temperature"]')?.dataset.points) >= 2);
    const first = Number(await fig.getAttribute('data-points'));
    // The demo devices send one record a second: the chart must grow by three more.
    await page.waitForFunction((n) => Number(document.querySelector('figure.live[data-key="temperature"]').dataset.points) >= n + 3, first, { timeout: 20000 });
    assert.ok(await fig.locator('canvas').count() >= 1, 'uPlot drew a canvas');
    assert.match(await page.locator('#latest-values dd[data-key="temperature"]').textContent(), /^-?\d+(\.\d+)?$/);
    await page.waitForFunction(() => Number(document.querySelector('#history-chart')?.dataset.buckets) >= 1);
    await screenshot(page, 'device');
  });

  it('edits the desired config and sees the device report it', async () => {
    await openDevice(page, server.base, 'demo-0001');
    const editor = page.locator('#desired-config');
    await editor.fill(JSON.stringify({ interval_s: 2, label: 'browser' }, null, 2));
    await page.getByRole('button', { name: 'Save desired config' }).click();
    await page.locator('#desired-msg').filter({ hasText: /Saved as version \d+/ }).waitFor();
    const stored = await adminApi(server, 'GET', '/api/v1/devices/demo-0001/config');
    assert.equal(stored.body.config.interval_s, 2);
    // The demo device applies it and reports back; the page shows the reported config.
    await page.locator('#reported-config').filter({ hasText: '"interval_s": 2' }).waitFor({ timeout: 30000 });
    await page.locator('#desired-msg').filter({ hasText: 'The device reports' }).waitFor({ timeout: 10000 });
    await screenshot(page, 'device-config');
  });

  it('refuses a desired config that is not a JSON object, at the field', async () => {
    await openDevice(page, server.base, 'demo-0004');
    const before = (await adminApi(server, 'GET', '/api/v1/devices/demo-0004/config')).body.version;
    for (const text of ['[1, 2]', '{"interval_s": ']) {
      await page.locator('#desired-config').fill(text);
      await page.getByRole('button', { name: 'Save desired config' }).click();
      await page.locator('#desired-msg').filter({ hasText: /^Not saved:/ }).waitFor();
      assert.equal(await page.locator('#desired-config').getAttribute('aria-invalid'), 'true');
    }
    assert.equal((await adminApi(server, 'GET', '/api/v1/devices/demo-0004/config')).body.version, before);
  });

  it('answers a stale If-Match with a reload, not an overwrite', async () => {
    await openDevice(page, server.base, 'demo-0002');
    await page.locator('#desired-config').fill('{"interval_s": 3}');
    // Someone else changes it meanwhile.
    const other = await adminApi(server, 'PUT', '/api/v1/devices/demo-0002/config', { interval_s: 4 });
    assert.equal(other.status, 200);
    await page.getByRole('button', { name: 'Save desired config' }).click();
    await page.locator('#desired-msg').filter({ hasText: 'changed meanwhile' }).waitFor();
    const stored = await adminApi(server, 'GET', '/api/v1/devices/demo-0002/config');
    assert.equal(stored.body.config.interval_s, 4);
  });

  it('shows the firmware view gracefully', async () => {
    await page.goto(`${server.base}/#/firmware`);
    await page.locator('#campaigns').filter({ hasText: /campaign/i }).waitFor();
    assert.match(await page.locator('#campaigns').textContent(), /No campaigns|Campaign|installed/i);
    await screenshot(page, 'firmware');
  });

  it('has no horizontal scroll at 375 px width', async () => {
    const phone = await browser.context.newPage();
    try {
      await phone.setViewportSize({ width: 375, height: 812 });
      for (const view of ['fleet', 'device/demo-0001', 'alarms', 'rules', 'firmware']) {
        await phone.goto(`${server.base}/#/${view}`);
        await phone.locator('#view h1').waitFor();
        if (view === 'fleet') await phone.waitForFunction(() => document.querySelectorAll('#fleet-table tr[data-device]').length === 12);
        if (view.startsWith('device')) await phone.locator('figure.live canvas').first().waitFor();
        const { scroll, client } = await phone.evaluate(() => ({ scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth }));
        assert.ok(scroll <= client, `${view}: scrollWidth ${scroll} > clientWidth ${client}`);
        await screenshot(phone, `${view.split('/')[0]}-375`);
      }
    } finally {
      await phone.close();
    }
  });

  it('passes axe-core (WCAG 2.1 A/AA, serious and critical) on every view', async () => {
    const found = [];
    for (const view of ['fleet', 'device/demo-0003', 'alarms', 'rules', 'firmware']) {
      await page.goto(`${server.base}/#/${view}`);
      await page.locator('#view h1').waitFor();
      if (view === 'fleet') await page.locator('#fleet-table tr[data-device]').first().waitFor();
      if (view.startsWith('device')) await page.locator('figure.live canvas').first().waitFor();
      for (const v of await axeViolations(page)) found.push(`${view}: ${v}`);
    }
    assert.deepEqual(found, []);
  });

  it('signs out: the cookie is cleared and the token no longer works', async () => {
    await page.goto(`${server.base}/#/fleet`);
    await page.locator('#fleet-table tbody tr').first().waitFor();
    const before = (await browser.context.cookies(server.base)).find((c) => c.name === 'stratus_session');
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.locator('#login-view').waitFor();
    assert.equal(await page.getByRole('button', { name: 'Sign out' }).isVisible(), false);
    assert.equal(await page.locator('#nav').isVisible(), false);
    const cookies = await browser.context.cookies(server.base);
    assert.equal(cookies.find((c) => c.name === 'stratus_session'), undefined);
    const r = await fetch(`${server.base}/api/v1/devices`, { headers: { Authorization: `Bearer ${before.value}` } });
    assert.equal(r.status, 401, 'the session token was revoked');
    await screenshot(page, 'login');
  });

  it('raised no script error or CSP violation', () => {
    assert.deepEqual(pageErrors, []);
  });
});
