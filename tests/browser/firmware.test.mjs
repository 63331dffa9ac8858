// The dashboard's firmware views against the real firmware API: a key made and an image signed
// and uploaded with the `stratus firmware` CLI, a campaign for two demo devices, status reports
// with a demo device's own token, and what the Firmware view and the device view show of it.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { BIN, run, startServer, startBrowser, screenshot, signIn, adminApi, axeViolations } from './harness.mjs';

const CAMPAIGN = 'browser-rollout';

/** A demo device's access token, with the secret `stratus serve --demo` keeps in the data dir. */
async function demoToken(server, id) {
  const file = path.join(server.dataDir, 'demo-devices.json');
  const deadline = Date.now() + 30000;
  for (;;) {
    const known = existsSync(file) ? JSON.parse(readFileSync(file, 'utf8')).devices?.[id] : undefined;
    if (known?.secret) {
      const r = await fetch(`${server.base}/oauth/token`, {
        method: 'POST',
        headers: {
          'Content-Type': 'application/x-www-form-urlencoded',
          Authorization: `Basic ${Buffer.from(`${id}:${known.secret}`).toString('base64')}`,
        },
        body: 'grant_type=client_credentials',
      });
      if (r.status === 200) return (await r.json()).access_token;
    }
    if (Date.now() > deadline) throw new Error(`no usable secret for ${id} in ${file}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** `POST /api/v1/devices/{id}/firmware` with the device's own token: a status report. */
async function report(server, id, body) {
  const r = await fetch(`${server.base}/api/v1/devices/${id}/firmware`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${await demoToken(server, id)}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await r.text();
  assert.equal(r.status, 200, `report ${JSON.stringify(body)} for ${id}: ${text}`);
  return JSON.parse(text);
}

describe('firmware views against the real campaigns API', { timeout: 300000 }, () => {
  let server;
  let browser;
  let page;
  let work;
  let firmwareId;
  const pageErrors = [];

  before(async () => {
    work = mkdtempSync(path.join(tmpdir(), 'stratus-fw-browser-'));
    await run(BIN, ['firmware', 'keygen', '--out', work]);
    server = await startServer({ args: ['--firmware-pubkey', path.join(work, 'firmware.pub')] });
    browser = await startBrowser();
    page = await browser.context.newPage();
    page.on('pageerror', (e) => pageErrors.push(`pageerror: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error' && !/^Failed to load resource: the server responded with a status of/.test(m.text())
        && !/api\/v1\/stream/.test(m.text())) {
        pageErrors.push(`console: ${m.text()}`);
      }
    });
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('signs, uploads with the CLI and starts a campaign for two demo devices', async () => {
    const image = path.join(work, 'app.bin');
    writeFileSync(image, randomBytes(48 * 1024));
    const manifest = path.join(work, 'app.manifest.json');
    await run(BIN, ['firmware', 'sign', image, '--key', path.join(work, 'firmware.key'), '--version', '2.0.0', '--out', manifest]);
    const env = { ...process.env, STRATUS_ADMIN_SECRET: server.secret };
    const { stdout } = await run(BIN, ['firmware', 'upload', image, manifest, '--server', server.base], { env, cwd: work });
    firmwareId = stdout.trim().split('\n').pop().trim();
    assert.match(firmwareId, /^[0-9a-f]{64}$/, `upload printed ${stdout}`);

    const made = await adminApi(server, 'POST', '/api/v1/campaigns',
      { id: CAMPAIGN, firmware: firmwareId, devices: ['demo-0001', 'demo-0002'] });
    assert.equal(made.status, 201, JSON.stringify(made.body));
    assert.equal(made.body.total, 2);

    for (const state of ['downloading', 'verified', 'installed']) {
      const r = await report(server, 'demo-0001', { firmware: firmwareId, status: state });
      assert.equal(r.assignment.state, state);
    }
    const got = await adminApi(server, 'GET', `/api/v1/campaigns/${CAMPAIGN}`);
    assert.deepEqual(got.body.counts, { assigned: 1, downloading: 0, verified: 0, installed: 1, failed: 0 });
  });

  it('shows the campaign with its per-state counts and the image', async () => {
    await signIn(page, server);
    await page.goto(`${server.base}/#/firmware`);
    const article = page.locator(`article.campaign[data-campaign="${CAMPAIGN}"]`);
    await article.waitFor();
    const count = async (state) => (await article.locator(`li[data-state="${state}"]`).textContent()).trim();
    assert.equal(await count('assigned'), '1 assigned');
    assert.equal(await count('downloading'), '0 downloading');
    assert.equal(await count('verified'), '0 verified');
    assert.equal(await count('installed'), '1 installed');
    assert.equal(await count('failed'), '0 failed');
    const bar = article.locator('progress');
    assert.equal(await bar.getAttribute('max'), '2');
    assert.equal(await bar.getAttribute('value'), '1');
    assert.equal(await bar.getAttribute('aria-label'), '1 of 2 installed');
    const text = await article.textContent();
    assert.match(text, /firmware 2\.0\.0 \(/, 'the campaign names the firmware by its version');
    assert.match(text, /2 devices/);
    assert.doesNotMatch(text, /created —/, 'the creation time is shown');
    await article.locator('summary').click();
    assert.equal(await article.locator('li[data-device="demo-0001"] .badge').textContent(), 'installed');
    assert.equal(await article.locator('li[data-device="demo-0002"] .badge').textContent(), 'assigned');
    const row = page.locator(`#images tr[data-firmware="${firmwareId}"]`);
    assert.equal(await row.locator('td[data-label="Version"]').textContent(), '2.0.0');
    assert.equal(await row.locator('td[data-label="Hardware"]').textContent(), 'any');
    assert.equal(await row.locator('td[data-label="Size"]').textContent(), `${48 * 1024} B`);
    await screenshot(page, 'firmware-campaign');
  });

  it('shows the firmware state in the device view, live', async () => {
    await page.goto(`${server.base}/#/device/demo-0001`);
    const state = page.locator('#firmware-state');
    await state.locator('.badge[data-state="installed"]').waitFor();
    const text = await state.textContent();
    assert.match(text, /Version2\.0\.0/);
    assert.match(text, /Installed version2\.0\.0/);
    assert.match(text, new RegExp(`Campaign${CAMPAIGN}`));
    await screenshot(page, 'device-firmware');

    await page.goto(`${server.base}/#/device/demo-0002`);
    await page.locator('#firmware-state .badge[data-state="assigned"]').waitFor();
    await report(server, 'demo-0002', { firmware: firmwareId, status: 'failed', reason: 'flash write error' });
    await page.locator('#firmware-state .badge[data-state="failed"]').waitFor({ timeout: 10000 });
    assert.match(await page.locator('#firmware-state').textContent(), /Reasonflash write error/);
  });

  it('has no horizontal scroll at 375 px with a campaign and a firmware state', async () => {
    const phone = await browser.context.newPage();
    try {
      await phone.setViewportSize({ width: 375, height: 812 });
      for (const view of ['firmware', 'device/demo-0001']) {
        await phone.goto(`${server.base}/#/${view}`);
        if (view === 'firmware') {
          await phone.locator(`article.campaign[data-campaign="${CAMPAIGN}"] summary`).click();
          await phone.locator('#images tr[data-firmware]').waitFor();
        } else {
          await phone.locator('#firmware-state .badge[data-state="installed"]').waitFor();
        }
        const { scroll, client } = await phone.evaluate(() => ({ scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth }));
        assert.ok(scroll <= client, `${view}: scrollWidth ${scroll} > clientWidth ${client}`);
        await screenshot(phone, view === 'firmware' ? 'firmware-campaign-375' : 'device-firmware-375');
      }
    } finally {
      await phone.close();
    }
  });

  it('passes axe-core on the firmware view with a campaign, without script errors', async () => {
    await page.goto(`${server.base}/#/firmware`);
    await page.locator(`article.campaign[data-campaign="${CAMPAIGN}"] li[data-state="failed"]`).filter({ hasText: '1 failed' }).waitFor();
    assert.deepEqual(await axeViolations(page), []);
    assert.deepEqual(pageErrors, []);
  });
});
