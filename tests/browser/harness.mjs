// Test harness: a real `stratus serve --demo` (binary from $STRATUS_BIN) on free loopback
// ports, Debian's chromium driven by playwright-core (never a downloaded browser), and small
// helpers (admin token, device registration, screenshots under target/screenshots/).
import { spawn, execFile } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const SCREENSHOTS = path.join(ROOT, 'target', 'screenshots');
export const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
export const run = promisify(execFile);

/** The stratus binary under test. */
export const BIN = process.env.STRATUS_BIN || path.join(ROOT, 'target', 'debug', 'stratus');

/**
 * Starts `stratus serve --demo` with `args` appended (e.g. `['--firmware-pubkey', FILE]`);
 * resolves {base, mqttPort, secret, dataDir, stop()}.
 */
export async function startServer({ args = [] } = {}) {
  const bin = BIN;
  const dir = mkdtempSync(path.join(tmpdir(), 'stratus-browser-'));
  const secret = `browser-${Math.random().toString(36).slice(2)}${Date.now()}`;
  const child = spawn(bin, ['serve', '--demo', '--http-port', '0', '--mqtt-port', '0', '--coap-port', '0',
    '--data-dir', path.join(dir, 'data'), ...args], {
    cwd: dir,
    env: { ...process.env, STRATUS_ADMIN_SECRET: secret },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr = (stderr + d).slice(-20000); });
  const ports = await new Promise((resolve, reject) => {
    let out = '';
    const found = {};
    const timer = setTimeout(() => reject(new Error(`stratus did not start in 30 s:\n${stderr}`)), 30000);
    child.on('exit', (code) => reject(new Error(`stratus exited with ${code}:\n${stderr}`)));
    child.stdout.on('data', (d) => {
      out += d;
      for (const m of out.matchAll(/^listening (http|mqtt) [\d.]+:(\d+)$/gm)) found[m[1]] = Number(m[2]);
      if (found.http && found.mqtt) { clearTimeout(timer); resolve(found); }
    });
  });
  child.stdout.resume();
  return {
    base: `http://127.0.0.1:${ports.http}`,
    mqttPort: ports.mqtt,
    secret,
    dataDir: path.join(dir, 'data'),
    stderr: () => stderr,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await Promise.race([exited, new Promise((r) => setTimeout(r, 10000))]);
        if (child.exitCode === null) child.kill('SIGKILL');
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Debian's chromium in a fresh profile; resolves {context, close()}. */
export async function startBrowser() {
  const profile = mkdtempSync(path.join(tmpdir(), 'stratus-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1280, height: 900 },
  });
  return {
    context,
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** An admin access token from /oauth/token. */
export async function adminToken(server) {
  const r = await fetch(`${server.base}/oauth/token`, {
    method: 'POST',
    headers: {
      'Content-Type': 'application/x-www-form-urlencoded',
      Authorization: `Basic ${Buffer.from(`admin:${server.secret}`).toString('base64')}`,
    },
    body: 'grant_type=client_credentials',
  });
  if (r.status !== 200) throw new Error(`token: ${r.status} ${await r.text()}`);
  return (await r.json()).access_token;
}

/** An admin API call with a bearer token; resolves {status, body}. */
export async function adminApi(server, method, p, body) {
  const token = await adminToken(server);
  const r = await fetch(`${server.base}${p}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = text; }
  return { status: r.status, body: json };
}

/** Saves a full-page screenshot as target/screenshots/NAME.png. */
export async function screenshot(page, name) {
  mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SCREENSHOTS, `${name}.png`), fullPage: true });
}

/** Signs in on `page` with the admin secret and waits for the fleet view. */
export async function signIn(page, server) {
  await page.goto(`${server.base}/`);
  await page.locator('#client-id').fill('admin');
  await page.locator('#client-secret').fill(server.secret);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('#fleet-table tbody tr').first().waitFor();
}

/**
 * Runs axe-core on the page (injected through the DevTools protocol, which the page's CSP
 * does not govern) and resolves the serious and critical WCAG A/AA violations.
 */
export async function axeViolations(page) {
  const source = readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
  await page.evaluate(source);
  const result = await page.evaluate(() => window.axe.run(document, {
    runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] },
  }));
  return result.violations
    .filter((v) => v.impact === 'serious' || v.impact === 'critical')
    .map((v) => `${v.id} (${v.impact}): ${v.help} at ${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(', ')}`);
}
