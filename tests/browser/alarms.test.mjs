// End-to-end tests of the rules and alarms views and the live stream in Debian's chromium
// against `stratus serve --demo`: a rule made in the editor raises an alarm on a hot reading
// that mosquitto_pub publishes as a registered device, and the Alarms view acknowledges it.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { startServer, startBrowser, screenshot, signIn, adminApi, run } from './harness.mjs';

describe('rules, alarms and the live stream', { timeout: 300000 }, () => {
  let server;
  let browser;
  let page;
  let probeSecret;

  before(async () => {
    server = await startServer();
    browser = await startBrowser();
    page = await browser.context.newPage();
    const created = await adminApi(server, 'POST', '/api/v1/devices', { id: 'probe-1', attributes: { site: 'lab' } });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    probeSecret = created.body.secret;
    await signIn(page, server);
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it('streams a device over Server-Sent Events with the session cookie', async () => {
    await page.goto(`${server.base}/#/device/demo-0001`);
    await page.locator('#live-status').filter({ hasText: 'Live: streaming demo-0001' }).waitFor({ timeout: 15000 });
    await page.waitForFunction(() => Number(document.querySelector('figure.live[data-key="temperature"]')?.dataset.points) >= 1);
    const first = Number(await page.locator('figure.live[data-key="temperature"]').getAttribute('data-points'));
    await page.waitForFunction((n) => Number(document.querySelector('figure.live[data-key="temperature"]').dataset.points) >= n + 3, first, { timeout: 20000 });
  });

  it('shows the validation error of a bad condition at the field, with its position', async () => {
    await page.goto(`${server.base}/#/rules`);
    await page.locator('#rules-table tbody tr').first().waitFor();
    await page.locator('#rule-name').fill('broken');
    await page.locator('#rule-condition').fill('temperature > > 3');
    await page.getByRole('button', { name: 'Create rule' }).click();
    const err = page.locator('#rule-condition-error');
    await err.filter({ hasText: /line \d+ column \d+/ }).waitFor();
    assert.equal(await page.locator('#rule-condition').getAttribute('aria-invalid'), 'true');
    assert.equal(await page.locator('#rule-condition').evaluate((el) => document.activeElement === el), true);
    const listed = await adminApi(server, 'GET', '/api/v1/rules');
    assert.ok(!listed.body.rules.some((r) => r.name === 'broken'), 'an invalid rule is not stored');
    await screenshot(page, 'rules-invalid');
  });

  it('creates a rule in the editor', async () => {
    await page.locator('#rule-id').fill('probe-hot');
    await page.locator('#rule-name').fill('probe hot');
    await page.locator('#rule-condition').fill('temperature > 1000');
    await page.locator('#rule-severity').selectOption('critical');
    await page.locator('#rule-devices').fill('probe-1');
    await page.getByRole('button', { name: 'Create rule' }).click();
    await page.locator('#rules-table tr[data-rule="probe-hot"]').waitFor();
    // The editor is ready for the next rule, with its defaults back.
    assert.equal(await page.locator('#rule-enabled').isChecked(), true);
    assert.equal(await page.locator('#rule-severity').inputValue(), 'major');
    assert.equal(await page.locator('#rule-condition-error').textContent(), '');
    const stored = await adminApi(server, 'GET', '/api/v1/rules/probe-hot');
    assert.equal(stored.status, 200);
    assert.equal(stored.body.condition, 'temperature > 1000');
    assert.deepEqual(stored.body.selector.devices, ['probe-1']);
    await screenshot(page, 'rules');
  });

  it('raises an alarm on a hot reading from mosquitto_pub and acknowledges it', async () => {
    await page.goto(`${server.base}/#/alarms`);
    await page.locator('#alarm-count').waitFor();
    await run('mosquitto_pub', ['-h', '127.0.0.1', '-p', String(server.mqttPort), '-i', 'probe-1',
      '-u', 'probe-1', '-P', probeSecret, '-q', '1', '-t', 'devices/probe-1/telemetry',
      '-m', JSON.stringify({ temperature: 5000 })]);
    const row = page.locator('#alarm-table tr[data-state="active"]', { has: page.locator('a', { hasText: 'probe-1' }) });
    await row.waitFor({ timeout: 20000 });
    assert.match(await row.textContent(), /critical/);
    await screenshot(page, 'alarms');
    await row.getByRole('button', { name: /Acknowledge/ }).click();
    await page.locator('#alarm-table tr[data-state="acknowledged"]', { has: page.locator('a', { hasText: 'probe-1' }) }).waitFor();
    const alarms = await adminApi(server, 'GET', '/api/v1/alarms?device=probe-1');
    assert.equal(alarms.body.alarms[0].state, 'acknowledged');
    assert.equal(alarms.body.alarms[0].rule, 'probe-hot');
    await screenshot(page, 'alarms-acked');
  });

  it('shows the open alarm and the online status in the fleet', async () => {
    await page.goto(`${server.base}/#/fleet`);
    await page.locator('#fleet-table tr[data-device="probe-1"] a.badge.alarm').filter({ hasText: '1' }).waitFor();
    await page.waitForFunction(() => document.querySelectorAll('#fleet-table tr[data-device^="demo-"] .badge.online').length === 12, null, { timeout: 20000 });
    await screenshot(page, 'fleet-live');
  });

  it('deletes a rule after a confirmation click', async () => {
    await page.goto(`${server.base}/#/rules`);
    const row = page.locator('#rules-table tr[data-rule="probe-hot"]');
    await row.waitFor();
    await row.getByRole('button', { name: /Delete/ }).click();
    await row.getByRole('button', { name: /^Confirm delete of rule probe hot$/ }).click();
    await row.waitFor({ state: 'detached' });
    assert.equal((await adminApi(server, 'GET', '/api/v1/rules/probe-hot')).status, 404);
  });
});
