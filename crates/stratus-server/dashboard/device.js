// The device view: status, latest values, a live chart per series (fed by the stream, or by
// polling the latest values when the server has no stream), history with a range selector
// (aggregated queries), the desired configuration editor (If-Match) beside the reported one,
// the device's replay protection (require_freshness, a PATCH of the device), firmware state
// and the device's open alarms.
import { api, get, openStream } from './api.js';
import { h, ago, when, show, message, fill } from './util.js';

const LIVE_WINDOW_MS = 5 * 60 * 1000;
const LIVE_MAX_POINTS = 900;
const RANGES = [
  { label: 'Last hour', ms: 3600e3, interval: '1m' },
  { label: 'Last 6 hours', ms: 6 * 3600e3, interval: '5m' },
  { label: 'Last 24 hours', ms: 24 * 3600e3, interval: '15m' },
  { label: 'Last 7 days', ms: 7 * 24 * 3600e3, interval: '1h' },
];
const COLORS = ['#2563eb', '#dc2626', '#059669', '#d97706', '#7c3aed', '#0891b2', '#be185d'];

/** A uPlot line chart of one series in `el`, resized with its container. */
function lineChart(el, label, color, { points = false } = {}) {
  const width = () => Math.max(240, el.clientWidth || 300);
  const plot = new window.uPlot({
    width: width(),
    height: 180,
    legend: { show: false },
    cursor: { drag: { x: false, y: false } },
    scales: { x: { time: true } },
    series: [{}, { label, stroke: color, width: 2, points: { show: points, size: 5, fill: color } }],
    axes: [{ stroke: 'currentColor', grid: { stroke: 'rgba(128,128,128,.2)' } },
      { stroke: 'currentColor', grid: { stroke: 'rgba(128,128,128,.2)' }, size: 64 }],
  }, [[], []], el);
  const ro = new ResizeObserver(() => plot.setSize({ width: width(), height: 180 }));
  ro.observe(el);
  return { plot, destroy() { ro.disconnect(); plot.destroy(); } };
}

const isNumber = (v) => typeof v === 'number' && Number.isFinite(v);

export function deviceView(root, { arg: id, liveStatus }) {
  const enc = encodeURIComponent(id);
  const cleanups = [];
  let device = null;
  let desiredVersion = null;
  let dirty = false;
  let lastTs = 0;

  const status = h('span', { class: 'badge unknown', id: 'device-status' }, 'unknown');
  const seen = h('span', { class: 'muted', id: 'device-seen' });
  const latest = h('dl', { class: 'latest', id: 'latest-values', 'aria-live': 'polite', 'aria-atomic': 'false' });
  const liveCharts = h('div', { class: 'charts', id: 'live-charts' });
  const liveNote = h('p', { class: 'muted' }, 'Waiting for data…');
  const rangeSel = h('select', { id: 'history-range' }, RANGES.map((r, i) => h('option', { value: String(i) }, r.label)));
  const keySel = h('select', { id: 'history-key' });
  const historyBox = h('div', { class: 'chart', id: 'history-chart' });
  const historyNote = h('p', { class: 'muted', id: 'history-note' });
  const desired = h('textarea', { id: 'desired-config', rows: '8', spellcheck: 'false', 'aria-describedby': 'desired-help desired-msg' });
  const desiredMeta = h('p', { class: 'muted', id: 'desired-help' });
  const desiredMsg = h('p', { id: 'desired-msg', role: 'status' });
  const reported = h('pre', { id: 'reported-config', class: 'code', tabindex: '0' }, '—');
  const reportedMeta = h('p', { class: 'muted', id: 'reported-meta' });
  const freshBox = h('input', {
    type: 'checkbox', id: 'require-freshness', disabled: true,
    'aria-describedby': 'freshness-help freshness-msg', onchange: saveFreshness,
  });
  const freshMsg = h('p', { id: 'freshness-msg', role: 'status' });
  let freshBusy = false;
  const firmware = h('div', { id: 'firmware-state' }, h('p', { class: 'muted' }, '—'));
  const alarms = h('ul', { id: 'device-alarms', class: 'plain' });
  const error = h('p', { class: 'error', role: 'alert' });

  root.append(
    h('p', {}, h('a', { href: '#/fleet' }, '← Fleet')),
    h('h1', {}, 'Device ', h('span', { class: 'mono' }, id)),
    h('p', { class: 'device-head' }, status, ' ', seen),
    error,
    h('section', { 'aria-labelledby': 'latest-title', class: 'card' },
      h('h2', { id: 'latest-title' }, 'Latest values'), latest),
    h('section', { 'aria-labelledby': 'live-title', class: 'card' },
      h('h2', { id: 'live-title' }, 'Live (last 5 minutes)'), liveNote, liveCharts),
    h('section', { 'aria-labelledby': 'history-title', class: 'card' },
      h('h2', { id: 'history-title' }, 'History'),
      h('div', { class: 'toolbar' },
        h('label', { for: 'history-key' }, 'Series'), keySel,
        h('label', { for: 'history-range' }, 'Range'), rangeSel),
      historyNote, historyBox),
    h('section', { 'aria-labelledby': 'config-title', class: 'card' },
      h('h2', { id: 'config-title' }, 'Configuration'),
      h('div', { class: 'two' },
        h('form', { id: 'config-form', onsubmit: saveConfig },
          h('label', { for: 'desired-config' }, 'Desired (JSON object)'), desired, desiredMeta,
          h('button', { type: 'submit' }, 'Save desired config'), desiredMsg),
        h('div', {}, h('h3', {}, 'Reported by the device'), reported, reportedMeta))),
    h('section', { 'aria-labelledby': 'freshness-title', class: 'card' },
      h('h2', { id: 'freshness-title' }, 'Replay protection'),
      h('div', { class: 'check-row' }, freshBox,
        h('label', { for: 'require-freshness' }, 'Require fresh messages from this device')),
      h('p', { class: 'muted help', id: 'freshness-help' },
        'When on, every telemetry message of this device must carry sent (epoch ms) and a nonce; '
        + 'messages without them, stale ones and replays are refused (HTTP 409, CoAP 4.09, MQTT 0x99).'),
      freshMsg),
    h('section', { 'aria-labelledby': 'fw-title', class: 'card' },
      h('h2', { id: 'fw-title' }, 'Firmware'), firmware),
    h('section', { 'aria-labelledby': 'alarms-title', class: 'card' },
      h('h2', { id: 'alarms-title' }, 'Open alarms'), alarms),
  );

  // ---- live values and charts ----
  const series = new Map(); // key -> {xs, ys, chart, figure, pending}
  const latestValues = new Map();

  function renderLatest() {
    fill(latest, [...latestValues.keys()].sort().map((k) => {
      const { ts, value } = latestValues.get(k);
      return h('div', {}, h('dt', {}, k), h('dd', { 'data-key': k, title: when(ts) }, show(value)));
    }));
  }

  function seriesFor(key) {
    let s = series.get(key);
    if (s) return s;
    const box = h('div', { class: 'chart' });
    const figure = h('figure', { class: 'live', 'data-key': key, 'data-points': '0' },
      h('figcaption', {}, key), box);
    const keys = [...series.keys(), key].sort();
    const before = keys[keys.indexOf(key) + 1];
    liveCharts.insertBefore(figure, before ? series.get(before).figure : null);
    s = { xs: [], ys: [], figure, chart: lineChart(box, key, COLORS[series.size % COLORS.length]), pending: false };
    series.set(key, s);
    liveNote.textContent = '';
    if (![...keySel.options].some((o) => o.value === key)) {
      keySel.append(h('option', { value: key }, key));
      if (keySel.options.length === 1) loadHistory();
    }
    return s;
  }

  function addPoint(key, ts, value) {
    const s = seriesFor(key);
    const x = ts / 1000;
    if (s.xs.length && x <= s.xs[s.xs.length - 1]) return; // seen, or out of order: history shows it
    s.xs.push(x);
    s.ys.push(value);
    const cut = (Date.now() - LIVE_WINDOW_MS) / 1000;
    while (s.xs.length > LIVE_MAX_POINTS || (s.xs.length > 1 && s.xs[0] < cut)) { s.xs.shift(); s.ys.shift(); }
    if (!s.pending) {
      s.pending = true;
      requestAnimationFrame(() => {
        s.pending = false;
        s.chart.plot.setData([s.xs, s.ys]);
        if (s.xs.length < 2) s.chart.plot.setScale('x', { min: s.xs[0] - 30, max: s.xs[0] + 1 });
        s.figure.dataset.points = String(s.xs.length);
      });
    }
  }

  function record(ts, values) {
    lastTs = Math.max(lastTs, ts);
    for (const [k, v] of Object.entries(values)) {
      const prev = latestValues.get(k);
      if (!prev || prev.ts <= ts) latestValues.set(k, { ts, value: v });
      if (isNumber(v)) addPoint(k, ts, v);
    }
    renderLatest();
  }

  async function seed() {
    try {
      const from = Date.now() - LIVE_WINDOW_MS;
      const r = await get(`/api/v1/devices/${enc}/telemetry?from=${from}&limit=1000`);
      const byTs = new Map();
      for (const [k, s] of Object.entries(r.series || {})) {
        for (const p of s.points || []) {
          if (!byTs.has(p.ts)) byTs.set(p.ts, {});
          byTs.get(p.ts)[k] = p.value;
        }
      }
      for (const ts of [...byTs.keys()].sort((a, b) => a - b)) record(ts, byTs.get(ts));
      const l = await get(`/api/v1/devices/${enc}/telemetry/latest`);
      for (const [k, p] of Object.entries(l.values || {})) {
        const prev = latestValues.get(k);
        if (!prev || prev.ts <= p.ts) latestValues.set(k, p);
      }
      renderLatest();
      if (!series.size && !latestValues.size) liveNote.textContent = 'No telemetry in the last 5 minutes yet.';
    } catch (e) {
      error.textContent = `Could not load telemetry: ${message(e)}`;
    }
  }

  async function poll() {
    try {
      const l = await get(`/api/v1/devices/${enc}/telemetry/latest`);
      const byTs = new Map();
      for (const [k, p] of Object.entries(l.values || {})) {
        if (p.ts > lastTs) {
          if (!byTs.has(p.ts)) byTs.set(p.ts, {});
          byTs.get(p.ts)[k] = p.value;
        }
      }
      for (const ts of [...byTs.keys()].sort((a, b) => a - b)) record(ts, byTs.get(ts));
    } catch { /* the next poll retries */ }
  }

  // ---- history ----
  let historyChart = null;
  async function loadHistory() {
    const key = keySel.value;
    if (!key) return;
    const range = RANGES[Number(rangeSel.value)] || RANGES[0];
    const q = new URLSearchParams({ key, agg: 'avg', interval: range.interval, from: String(Date.now() - range.ms) });
    try {
      const r = await get(`/api/v1/devices/${enc}/telemetry?${q}`);
      const buckets = r.buckets || [];
      if (!historyChart) historyChart = lineChart(historyBox, key, COLORS[0], { points: true });
      historyChart.plot.setData([buckets.map((b) => b.ts / 1000), buckets.map((b) => b.value)]);
      // The whole range, however few buckets it has (one bucket would collapse the axis).
      historyChart.plot.setScale('x', { min: (Date.now() - range.ms) / 1000, max: Date.now() / 1000 });
      historyBox.dataset.buckets = String(buckets.length);
      historyNote.textContent = `${key}: average per ${range.interval}, ${buckets.length} buckets.`;
    } catch (e) {
      historyNote.textContent = `Could not load the history: ${message(e)}`;
    }
  }
  rangeSel.addEventListener('change', loadHistory);
  keySel.addEventListener('change', loadHistory);

  // ---- device, config, firmware, alarms ----
  function showStatus(online, lastSeen) {
    const s = online === true ? 'online' : online === false ? 'offline' : 'unknown';
    status.className = `badge ${s}`;
    status.textContent = s;
    if (lastSeen !== undefined) seen.dataset.lastSeen = String(lastSeen ?? '');
    const ls = seen.dataset.lastSeen;
    seen.textContent = `last seen ${ago(ls ? (Number.isNaN(Number(ls)) ? ls : Number(ls)) : null)}`;
  }

  function showDesired(doc, force = false) {
    if (!doc) return;
    // An answer that left before our own save landed: versions only grow, keep the newer.
    if (!force && desiredVersion !== null && doc.version < desiredVersion) return;
    const changed = doc.version !== desiredVersion;
    desiredVersion = doc.version;
    desiredMeta.textContent = `Version ${doc.version}, updated ${when(doc.updated_at)}. Saving sends If-Match: "${doc.version}".`;
    if (force || (changed && !dirty)) {
      desired.value = JSON.stringify(doc.config ?? {}, null, 2);
      dirty = false;
    }
  }

  function showReported(doc) {
    reported.textContent = doc ? JSON.stringify(doc.config ?? {}, null, 2) : 'Nothing reported yet.';
    reportedMeta.textContent = doc ? `Reported ${when(doc.updated_at)}.` : '';
    if (doc && desiredVersion !== null && !dirty && device?.desired) {
      const want = device.desired.config || {};
      const matches = Object.entries(want).every(([k, v]) => JSON.stringify(doc.config?.[k]) === JSON.stringify(v));
      if (matches && desiredMsg.dataset.waiting === 'true') {
        desiredMsg.textContent = `The device reports version ${desiredVersion}'s configuration.`;
        desiredMsg.dataset.waiting = 'false';
      }
    }
  }

  /** The device's firmware state as the firmware service keeps it: {firmware, version,
   *  campaign, state, reason, updated_at, installed_version}. */
  function showFirmware(fw) {
    if (!fw) {
      fill(firmware, h('p', { class: 'muted' }, 'No firmware assigned or reported.'));
      return;
    }
    const row = (k, v) => (v === null || v === undefined ? [] : [h('dt', {}, k), h('dd', {}, v)]);
    fill(firmware, h('dl', { class: 'facts' },
      row('State', h('span', { class: `badge fw-${fw.state}`, 'data-state': fw.state }, show(fw.state))),
      row('Version', fw.version),
      row('Installed version', fw.installed_version),
      row('Campaign', fw.campaign),
      row('Reason', fw.reason),
      row('Updated', fw.updated_at ? when(fw.updated_at) : null),
      row('Firmware id', fw.firmware ? h('span', { class: 'mono ellipsis', title: fw.firmware }, fw.firmware) : null)));
  }

  function showFreshness(d) {
    if (freshBusy) return; // a save is on its way: its answer decides
    freshBox.checked = d.require_freshness === true;
    freshBox.disabled = false;
  }

  async function saveFreshness() {
    const on = freshBox.checked;
    freshBusy = true;
    freshBox.disabled = true;
    freshMsg.textContent = 'Saving…';
    try {
      const r = await api('PATCH', `/api/v1/devices/${enc}`, { body: { require_freshness: on } });
      device = r.data;
      freshBox.checked = r.data.require_freshness === true;
      freshMsg.textContent = freshBox.checked
        ? 'Saved: this device\'s messages without sent and nonce are refused from now on.'
        : 'Saved: this device\'s messages need no sent and nonce (unless the server requires them of all).';
    } catch (e) {
      freshBox.checked = !on;
      freshMsg.textContent = `Not saved: ${message(e)}`;
    } finally {
      freshBusy = false;
      freshBox.disabled = false;
    }
  }

  async function loadDevice(first = false) {
    try {
      device = await get(`/api/v1/devices/${enc}`);
      showFreshness(device);
      showStatus(device.online, device.last_seen);
      showDesired(device.desired, first);
      showReported(device.reported);
      showFirmware(device.firmware);
    } catch (e) {
      if (e.status === 403) {
        // A telemetry:read client: the registry is not readable, the desired config is.
        freshMsg.textContent = 'Changing the device needs the devices:write scope.';
        try { showDesired(await get(`/api/v1/devices/${enc}/config`), first); } catch { /* leave empty */ }
        return;
      }
      error.textContent = e.status === 404 ? `No device ${id}.` : `Could not load the device: ${message(e)}`;
    }
  }

  async function saveConfig(ev) {
    ev.preventDefault();
    let config;
    try {
      config = JSON.parse(desired.value);
      if (!config || typeof config !== 'object' || Array.isArray(config)) throw new Error('the desired config must be a JSON object');
      desired.removeAttribute('aria-invalid');
    } catch (e) {
      desired.setAttribute('aria-invalid', 'true');
      desiredMsg.textContent = `Not saved: ${e.message}`;
      return;
    }
    try {
      const r = await api('PUT', `/api/v1/devices/${enc}/config`, {
        body: config, headers: { 'If-Match': `"${desiredVersion ?? 0}"` },
      });
      dirty = false;
      if (device) device.desired = r.data;
      showDesired(r.data, true);
      desiredMsg.dataset.waiting = 'true';
      desiredMsg.textContent = `Saved as version ${r.data.version}; waiting for the device to report it…`;
    } catch (e) {
      if (e.status === 412) {
        desiredMsg.textContent = 'Not saved: the desired config changed meanwhile. The current one is loaded; apply your change again.';
        loadDevice(true);
      } else {
        desiredMsg.textContent = `Not saved: ${message(e)}`;
      }
    }
  }
  desired.addEventListener('input', () => { dirty = true; });

  async function loadAlarms() {
    try {
      const r = await get(`/api/v1/alarms?state=open&device=${enc}&limit=50`);
      const list = Array.isArray(r) ? r : r.alarms || [];
      fill(alarms, list.length ? list.map((a) => h('li', {},
        h('span', { class: `badge sev-${a.severity}` }, a.severity), ' ',
        `${a.message || a.rule} (${a.state}, raised ${ago(a.raised_at)}) `,
        h('a', { href: `#/alarms/${enc}` }, 'Alarms view'))) : [h('li', { class: 'muted' }, 'None.')]);
    } catch (e) {
      fill(alarms, h('li', { class: 'muted' }, e.status === 404 ? 'This server has no alarms API.' : `Could not load alarms: ${message(e)}`));
    }
  }

  loadDevice(true);
  seed();
  loadAlarms();
  const refresh = setInterval(() => loadDevice(false), 3000);
  cleanups.push(() => clearInterval(refresh));
  let pollTimer = null;
  const close = openStream({ device: id }, (ev) => {
    if (ev.type === 'telemetry' && ev.device === id) {
      record(ev.ts, ev.values || {});
      showStatus(true, Date.now());
    } else if (ev.type === 'device_status' && ev.device === id) {
      showStatus(ev.online, ev.last_seen);
    } else if (ev.type === 'firmware' && ev.device === id) {
      // The event names the firmware and the state; the registry has the versions too.
      loadDevice(false);
    } else if (ev.type === 'alarm') {
      loadAlarms();
    }
  }, (state) => {
    if (state === 'unavailable' && !pollTimer) {
      liveStatus('Live stream unavailable; polling the latest values every 2 s');
      pollTimer = setInterval(poll, 2000);
    } else if (state === 'live') {
      liveStatus(`Live: streaming ${id}`);
    } else if (state === 'retrying') {
      liveStatus('Live: reconnecting…');
    }
  });
  cleanups.push(close, () => clearInterval(pollTimer));
  return () => {
    for (const c of cleanups) c();
    for (const s of series.values()) s.chart.destroy();
    historyChart?.destroy();
  };
}
