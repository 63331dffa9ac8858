// The firmware view: campaigns (GET /api/v1/campaigns: `{"campaigns": [{id, firmware,
// created, total, counts: {assigned, downloading, verified, installed, failed}, devices:
// [{device, state, reason, updated}]}]}`; "no campaigns" when the server has no such API) and
// the uploaded images (GET /api/v1/firmware: `{"firmware": [{id, version, size, hardware,
// key_id, created}]}`), whose versions name the campaigns' firmware.
import { get } from './api.js';
import { h, when, show, message, fill } from './util.js';

const STATES = ['assigned', 'downloading', 'verified', 'installed', 'failed'];

/** The per-state device counts of a campaign, in the order of a device's progress. */
function counts(c) {
  const p = c.counts || {};
  const known = STATES.map((k) => [k, typeof p[k] === 'number' ? p[k] : 0]);
  const other = Object.entries(p).filter(([k, v]) => !STATES.includes(k) && typeof v === 'number');
  return [...known, ...other];
}

/** "2.0.0 (ab12cd34…)" when the image is known, else the firmware id. */
function firmwareName(id, versions) {
  const v = versions.get(id);
  const short = typeof id === 'string' ? `${id.slice(0, 12)}…` : show(id);
  return v ? `${v} (${short})` : short;
}

export function firmwareView(root) {
  const campaigns = h('div', { id: 'campaigns' }, h('p', { class: 'muted' }, 'Loading…'));
  const images = h('div', { id: 'images' });
  root.append(
    h('h1', {}, 'Firmware'),
    h('section', { class: 'card', 'aria-labelledby': 'camp-title' }, h('h2', { id: 'camp-title' }, 'Campaigns'), campaigns),
    h('section', { class: 'card', 'aria-labelledby': 'img-title' }, h('h2', { id: 'img-title' }, 'Images'), images));

  async function load() {
    let versions = new Map();
    try {
      const r = await get('/api/v1/firmware');
      const list = Array.isArray(r) ? r : r?.firmware || [];
      versions = new Map(list.map((f) => [f.id, f.version]));
      fill(images, list.length ? h('table', { class: 'data responsive' },
        h('caption', { class: 'visually-hidden' }, 'Firmware images'),
        h('thead', {}, h('tr', {}, ['Id', 'Version', 'Hardware', 'Size', 'Uploaded'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, list.map((f) => h('tr', { 'data-firmware': f.id },
          h('td', { 'data-label': 'Id', class: 'mono ellipsis', title: f.id }, show(f.id)),
          h('td', { 'data-label': 'Version' }, show(f.version)),
          h('td', { 'data-label': 'Hardware' }, f.hardware ?? 'any'),
          h('td', { 'data-label': 'Size' }, typeof f.size === 'number' ? `${f.size} B` : show(f.size)),
          h('td', { 'data-label': 'Uploaded' }, when(f.created)))))) : h('p', { class: 'muted' }, 'No images uploaded.'));
    } catch (e) {
      fill(images, h('p', { class: 'muted' }, e.status === 404 ? 'This server has no firmware API yet.' : `Could not load images: ${message(e)}`));
    }
    try {
      const r = await get('/api/v1/campaigns');
      const list = Array.isArray(r) ? r : r?.campaigns || [];
      fill(campaigns, list.length ? list.map((c) => {
        const cs = counts(c);
        const devices = Array.isArray(c.devices) ? c.devices : [];
        const total = typeof c.total === 'number' ? c.total : devices.length;
        const done = Object.fromEntries(cs).installed ?? 0;
        return h('article', { class: 'campaign', 'data-campaign': c.id },
          h('h3', {}, show(c.id)),
          h('p', { class: 'muted' }, `firmware ${firmwareName(c.firmware, versions)} · ${total} device${total === 1 ? '' : 's'} · created ${when(c.created)}`),
          total ? h('progress', { max: String(total), value: String(done), 'aria-label': `${done} of ${total} installed` }) : null,
          h('ul', { class: 'counts' }, cs.map(([k, v]) => h('li', { 'data-state': k }, h('strong', {}, String(v)), ` ${k}`))),
          devices.length ? h('details', {},
            h('summary', {}, 'Devices'),
            h('ul', { class: 'plain campaign-devices' }, devices.map((d) => h('li', { 'data-device': d.device },
              h('a', { href: `#/device/${encodeURIComponent(d.device)}` }, d.device), ' ',
              h('span', { class: 'badge' }, show(d.state)),
              d.reason ? ` ${d.reason}` : '', h('span', { class: 'muted' }, ` · ${when(d.updated)}`))))) : null);
      }) : [h('p', { class: 'muted' }, 'No campaigns.')]);
    } catch (e) {
      fill(campaigns, h('p', { class: 'muted' }, e.status === 404 ? 'No campaigns (this server has no campaigns API).' : `No campaigns: ${message(e)}`));
    }
  }
  load();
  const timer = setInterval(load, 10000);
  return () => clearInterval(timer);
}
