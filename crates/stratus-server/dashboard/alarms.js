// The alarms view: the alarm list with state and device filters, Acknowledge on active
// alarms, refreshed live by the stream's alarm events.
import { api, get, openStream } from './api.js';
import { h, ago, when, show, message, fill } from './util.js';

const STATES = ['open', 'active', 'acknowledged', 'cleared', 'all'];

export function alarmsView(root, { arg, liveStatus }) {
  const stateSel = h('select', { id: 'alarm-state' }, STATES.map((s) => h('option', { value: s }, s)));
  const deviceIn = h('input', { id: 'alarm-device', type: 'search', value: arg || '', placeholder: 'all devices', autocomplete: 'off' });
  const note = h('p', { class: 'muted', id: 'alarm-count', 'aria-live': 'polite' });
  const error = h('p', { class: 'error', role: 'alert' });
  const tbody = h('tbody');
  const table = h('table', { class: 'data responsive', id: 'alarm-table' },
    h('caption', { class: 'visually-hidden' }, 'Alarms, newest first'),
    h('thead', {}, h('tr', {}, ['Severity', 'Device', 'Rule', 'State', 'Message', 'Raised', ''].map((c) =>
      h('th', { scope: 'col' }, c || h('span', { class: 'visually-hidden' }, 'Actions'))))),
    tbody);
  root.append(
    h('h1', {}, 'Alarms'),
    h('form', { class: 'toolbar', onsubmit: (e) => { e.preventDefault(); load(); } },
      h('label', { for: 'alarm-state' }, 'State'), stateSel,
      h('label', { for: 'alarm-device' }, 'Device'), deviceIn,
      h('button', { type: 'submit', class: 'secondary' }, 'Filter')),
    note, error, table);

  async function ack(alarm, button) {
    button.disabled = true;
    try {
      await api('POST', `/api/v1/alarms/${encodeURIComponent(alarm.id)}/ack`);
      await load();
    } catch (e) {
      error.textContent = `Could not acknowledge: ${message(e)}`;
      button.disabled = false;
    }
  }

  async function load() {
    const q = new URLSearchParams({ limit: '200' });
    if (stateSel.value !== 'all') q.set('state', stateSel.value);
    if (deviceIn.value.trim()) q.set('device', deviceIn.value.trim());
    try {
      const r = await get(`/api/v1/alarms?${q}`);
      const list = Array.isArray(r) ? r : r.alarms || [];
      error.textContent = '';
      note.textContent = `${list.length} alarm${list.length === 1 ? '' : 's'}`;
      fill(tbody, list.map((a) => h('tr', { 'data-alarm': a.id, 'data-state': a.state },
        h('td', { 'data-label': 'Severity' }, h('span', { class: `badge sev-${a.severity}` }, a.severity)),
        h('td', { 'data-label': 'Device' }, h('a', { href: `#/device/${encodeURIComponent(a.device)}` }, a.device)),
        h('td', { 'data-label': 'Rule' }, show(a.rule)),
        h('td', { 'data-label': 'State' }, a.state),
        h('td', { 'data-label': 'Message' }, show(a.message), a.value ? h('span', { class: 'muted' }, ` ${JSON.stringify(a.value)}`) : null),
        h('td', { 'data-label': 'Raised', title: when(a.raised_at) }, ago(a.raised_at)),
        h('td', { 'data-label': '' }, a.state === 'active'
          ? h('button', { type: 'button', class: 'ack', onclick: (e) => ack(a, e.currentTarget), 'aria-label': `Acknowledge ${a.rule} on ${a.device}` }, 'Acknowledge')
          : a.acked_at ? h('span', { class: 'muted', title: when(a.acked_at) }, `acked ${ago(a.acked_at)}`) : null),
      )));
    } catch (e) {
      fill(tbody);
      note.textContent = '';
      error.textContent = e.status === 404 ? 'This server has no alarms API.' : `Could not load alarms: ${message(e)}`;
    }
  }

  stateSel.addEventListener('change', load);
  load();
  let timer = null;
  const close = openStream({}, (ev) => {
    if (ev.type === 'alarm') { clearTimeout(timer); timer = setTimeout(load, 300); }
  }, (state) => liveStatus(state === 'live' ? 'Live: alarms update as they happen' : 'Live stream unavailable; use Filter to refresh'));
  const every = setInterval(load, 15000);
  return () => { close(); clearTimeout(timer); clearInterval(every); };
}
