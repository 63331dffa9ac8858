// End-to-end test of a device's own replay protection in Debian's chromium against
// `stratus serve --demo`: the device page's "Require fresh messages" switch PATCHes the
// device (require_freshness), after which that device's telemetry without `sent` and `nonce`
// is refused (409) while another device's is accepted; switching it off accepts it again.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { startServer, startBrowser, screenshot, signIn, adminApi, axeViolations } from './harness.mjs';

/** POSTs one telemetry message as device `id` (client credentials, then the bearer token). */
async function postTelemetry(server, id, secret, body) {
  const t = await fetch(`${server.base}/oauth/token`, {
    method: 'POST',
    headers: {
      'Content-Type': 'application/x-www-form-urlencoded',
      Authorization: `Basic ${Buffer.from(`${id}:${secret}`).toString('base64')}`,
    },
    body: 'grant_type=client_credentials',
  });
  assert.equal(t.status, 200, await t.clone().text());
  const { access_token: token } = await t.json();
  const r = await fetch(`${server.base}/api/v1/telemetry`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  return { status: r.status, body: await r.json().catch(() => null) };
}

/** Opens the device view of `id` and waits until the switch reflects the device. */
async function openDevice(page, base, id) {
  await page.goto(`${base}/#/device/${id}`);
  await page.waitForFunction((want) => document.querySelector('#view h1 .mono')?.textContent === want
    && document.querySelector('#require-freshness')?.disabled === false, id);
}

describe('per-device replay protection', { timeout: 300000 }, () => {
  let server;
  let browser;
  let page;
  const secrets = {};
  const pageErrors = [];

  before(async () => {
    server = await startServer();
    browser = await startBrowser();
    page = await browser.context.newPage();
    page.on('pageerror', (e) => pageErrors.push(`pageerror: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error' && !/^Failed to load resource: the server responded with a status of/.test(m.text())
        && !/api\/v1\/stream/.test(m.text())) {
        pageErrors.push(`console: ${m.text()}`);
      }
    });
    for (const id of ['strict-1', 'lax-1']) {
      const created = await adminApi(server, 'POST', '/api/v1/devices', { id });
      assert.equal(created.status, 201, JSON.stringify(created.body));
      secrets[id] = created.body.secret;
    }
    await signIn(page, server);
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it('starts off, and a bare message is accepted', async () => {
    await openDevice(page, server.base, 'strict-1');
    assert.equal(await page.getByLabel('Require fresh messages from this device').isChecked(), false);
    const r = await postTelemetry(server, 'strict-1', secrets['strict-1'], { v: 1 });
    assert.equal(r.status, 202, JSON.stringify(r.body));
  });

  it('switched on in the page, refuses that device\'s messages without sent and nonce (409) only', async () => {
    await page.getByLabel('Require fresh messages from this device').check();
    await page.locator('#freshness-msg').filter({ hasText: /^Saved: .* refused/ }).waitFor();
    const shown = await adminApi(server, 'GET', '/api/v1/devices/strict-1');
    assert.equal(shown.body.require_freshness, true);
    const bare = await postTelemetry(server, 'strict-1', secrets['strict-1'], { v: 2 });
    assert.equal(bare.status, 409, JSON.stringify(bare.body));
    assert.equal(bare.body.error, 'replay');
    const fresh = await postTelemetry(server, 'strict-1', secrets['strict-1'],
      { sent: Date.now(), nonce: `n-${Date.now()}`, v: 3 });
    assert.equal(fresh.status, 202, JSON.stringify(fresh.body));
    const other = await postTelemetry(server, 'lax-1', secrets['lax-1'], { v: 4 });
    assert.equal(other.status, 202, 'another device is not affected');
    assert.equal((await adminApi(server, 'GET', '/api/v1/devices/lax-1')).body.require_freshness, false);
    await screenshot(page, 'device-freshness');
  });

  it('shows the stored policy after a reload, and switches it off again', async () => {
    await openDevice(page, server.base, 'strict-1');
    const box = page.getByLabel('Require fresh messages from this device');
    assert.equal(await box.isChecked(), true, 'the page shows what the server keeps');
    await box.uncheck();
    await page.locator('#freshness-msg').filter({ hasText: /^Saved: .* need no sent/ }).waitFor();
    assert.equal((await adminApi(server, 'GET', '/api/v1/devices/strict-1')).body.require_freshness, false);
    const bare = await postTelemetry(server, 'strict-1', secrets['strict-1'], { v: 5 });
    assert.equal(bare.status, 202, JSON.stringify(bare.body));
  });

  it('passes axe-core on the device page with the switch', async () => {
    assert.deepEqual(await axeViolations(page), []);
  });

  it('raised no script error or CSP violation', () => {
    assert.deepEqual(pageErrors, []);
  });
});
