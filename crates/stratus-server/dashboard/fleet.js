// The fleet view: every device with its status, last seen, firmware and open alarms;
// search, sortable columns, kept live by the stream (device status, telemetry, alarms).
import { get, openStream } from './api.js';
import { h, ago, when, show, message, fill, toMs } from './util.js';

/** Every device, following the list's pages. */
export async function allDevices() {
  const out = [];
  let after = null;
  for (let page = 0; page < 100; page++) {
    const q = new URLSearchParams({ limit: '1000' });
    if (after) q.set('after', after);
    const r = await get(`/api/v1/devices?${q}`);
    out.push(...(r.devices || []));
    if (!r.next) break;
    after = r.next;
  }
  return out;
}

/** Open alarms per device from the alarms API (null when it is not there). */
async function openAlarmCounts() {
  try {
    const r = await get('/api/v1/alarms?state=open&limit=1000');
    const counts = new Map();
    for (const a of (Array.isArray(r) ? r : r.alarms || [])) counts.set(a.device, (counts.get(a.device) || 0) + 1);
    return counts;
  } catch {
    return null;
  }
}

/** The firmware version a device runs, as far as its firmware state says. */
export function firmwareVersion(fw) {
  if (!fw || typeof fw !== 'object') return '—';
  return show(fw.version ?? fw.installed_version ?? fw.current?.version ?? fw.installed?.version ?? fw.state ?? '—');
}

const COLUMNS = [
  { key: 'id', label: 'Device', value: (d) => d.id },
  { key: 'online', label: 'Status', value: (d) => (d.online === true ? 1 : d.online === false ? 0 : -1) },
  { key: 'last_seen', label: 'Last seen', value: (d) => toMs(d.last_seen) ?? 0 },
  { key: 'firmware', label: 'Firmware', value: (d) => firmwareVersion(d.firmware) },
  { key: 'open_alarms', label: 'Open alarms', value: (d) => d.open_alarms ?? -1 },
];

export function fleetView(root, { liveStatus }) {
  let devices = [];
  let byId = new Map();
  let frame = 0;
  let sort = { key: 'id', dir: 1 };
  let query = '';
  let timer = null;
  let refetch = null;

  const search = h('input', { id: 'fleet-search', type: 'search', placeholder: 'id or attribute', autocomplete: 'off' });
  const count = h('p', { class: 'muted', id: 'fleet-count', 'aria-live': 'polite' });
  const error = h('p', { class: 'error', role: 'alert' });
  const tbody = h('tbody');
  const headRow = h('tr');
  const table = h('table', { class: 'data responsive sortable', id: 'fleet-table' },
    h('caption', { class: 'visually-hidden' }, 'Devices; the column buttons sort'),
    h('thead', {}, headRow), tbody);

  root.append(
    h('h1', {}, 'Fleet'),
    h('div', { class: 'toolbar' },
      h('label', { for: 'fleet-search' }, 'Search devices'), search),
    count, error, table,
  );

  function header() {
    fill(headRow, COLUMNS.map((c) => {
      const active = sort.key === c.key;
      return h('th', { scope: 'col', 'aria-sort': active ? (sort.dir > 0 ? 'ascending' : 'descending') : 'none' },
        h('button', {
          type: 'button', class: 'sort', 'data-key': c.key,
          onclick: () => {
            sort = { key: c.key, dir: active ? -sort.dir : 1 };
            header();
            render();
            headRow.querySelector(`[data-key="${c.key}"]`)?.focus();
          },
        }, c.label, h('span', { 'aria-hidden': 'true' }, active ? (sort.dir > 0 ? ' ▲' : ' ▼') : '')));
    }));
  }

  function render() {
    const col = COLUMNS.find((c) => c.key === sort.key) || COLUMNS[0];
    const q = query.trim().toLowerCase();
    const shown = devices
      .filter((d) => !q || d.id.toLowerCase().includes(q) || JSON.stringify(d.attributes || {}).toLowerCase().includes(q))
      .sort((a, b) => {
        const x = col.value(a); const y = col.value(b);
        return (x < y ? -1 : x > y ? 1 : a.id < b.id ? -1 : 1) * sort.dir;
      });
    count.textContent = `${shown.length} of ${devices.length} devices`;
    fill(tbody, shown.map((d) => {
      const status = d.online === true ? 'online' : d.online === false ? 'offline' : 'unknown';
      return h('tr', { 'data-device': d.id },
        h('td', { 'data-label': 'Device' }, h('a', { href: `#/device/${encodeURIComponent(d.id)}` }, d.id)),
        h('td', { 'data-label': 'Status' }, h('span', { class: `badge ${status}` }, status)),
        h('td', { 'data-label': 'Last seen', title: when(d.last_seen) }, ago(d.last_seen)),
        h('td', { 'data-label': 'Firmware' }, firmwareVersion(d.firmware)),
        h('td', { 'data-label': 'Open alarms', class: 'num' },
          d.open_alarms > 0 ? h('a', { href: `#/alarms/${encodeURIComponent(d.id)}`, class: 'badge alarm' }, String(d.open_alarms)) : show(d.open_alarms ?? '—')),
      );
    }));
  }

  async function load() {
    try {
      const [list, counts] = await Promise.all([allDevices(), openAlarmCounts()]);
      for (const d of list) if (d.open_alarms === undefined && counts) d.open_alarms = counts.get(d.id) || 0;
      devices = list;
      byId = new Map(list.map((d) => [d.id, d]));
      error.textContent = '';
      render();
    } catch (e) {
      error.textContent = e.status === 403
        ? 'Listing devices needs the scope devices:write or admin.'
        : `Could not load the devices: ${message(e)}`;
    }
  }

  search.addEventListener('input', () => { query = search.value; render(); });
  load();
  timer = setInterval(load, 15000);
  // Many events a second on a big fleet: one render per animation frame at most.
  const scheduleRender = () => { if (!frame) frame = requestAnimationFrame(() => { frame = 0; render(); }); };
  const close = openStream({}, (ev) => {
    const d = byId.get(ev.device || ev.alarm?.device);
    if (ev.type === 'device_status' && d) {
      d.online = ev.online;
      if (ev.last_seen) d.last_seen = ev.last_seen;
      scheduleRender();
    } else if (ev.type === 'telemetry' && d) {
      d.last_seen = Date.now();
    } else if (ev.type === 'alarm') {
      clearTimeout(refetch);
      refetch = setTimeout(load, 500);
    }
  }, (state) => liveStatus(state === 'live' ? 'Live: connected to the stream' : state === 'retrying' ? 'Live: reconnecting…' : 'Live stream unavailable; refreshing every 15 s'));
  const tick = setInterval(() => render(), 5000);
  header();
  render();
  return () => { clearInterval(timer); clearInterval(tick); clearTimeout(refetch); cancelAnimationFrame(frame); close(); };
}
