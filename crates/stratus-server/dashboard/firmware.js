// The firmware view: campaigns with their progress counts (GET /api/v1/campaigns; "no
// campaigns" when the server has none or no such API) and the uploaded images.
import { get } from './api.js';
import { h, when, show, message, fill } from './util.js';

const STATES = ['assigned', 'downloading', 'verified', 'installed', 'failed'];

/** The per-state device counts of a campaign (an object under counts/progress, or top level). */
function counts(c) {
  const p = c.counts || c.progress || c.status_counts || c.states || c;
  const known = STATES.filter((k) => typeof p[k] === 'number').map((k) => [k, p[k]]);
  if (known.length || p === c) return known;
  return Object.entries(p).filter(([, v]) => typeof v === 'number');
}

export function firmwareView(root) {
  const campaigns = h('div', { id: 'campaigns' }, h('p', { class: 'muted' }, 'Loading…'));
  const images = h('div', { id: 'images' });
  root.append(
    h('h1', {}, 'Firmware'),
    h('section', { class: 'card', 'aria-labelledby': 'camp-title' }, h('h2', { id: 'camp-title' }, 'Campaigns'), campaigns),
    h('section', { class: 'card', 'aria-labelledby': 'img-title' }, h('h2', { id: 'img-title' }, 'Images'), images));

  async function load() {
    try {
      const r = await get('/api/v1/campaigns');
      const list = Array.isArray(r) ? r : r?.campaigns || [];
      fill(campaigns, list.length ? list.map((c) => {
        const cs = counts(c);
        const total = (typeof c.total === 'number' ? c.total : null) ?? (Array.isArray(c.devices) ? c.devices.length : null) ?? cs.reduce((n, [, v]) => n + v, 0);
        const done = Object.fromEntries(cs).installed ?? 0;
        return h('article', { class: 'campaign', 'data-campaign': c.id },
          h('h3', {}, show(c.name || c.id), ' ', (c.state || c.status) ? h('span', { class: 'badge' }, show(c.state || c.status)) : null),
          h('p', { class: 'muted' }, `firmware ${show(c.firmware || c.version)} · created ${when(c.created_at)}`),
          total ? h('progress', { max: String(total), value: String(done), 'aria-label': `${done} of ${total} installed` }) : null,
          h('ul', { class: 'counts' }, cs.map(([k, v]) => h('li', {}, h('strong', {}, String(v)), ` ${k}`))));
      }) : [h('p', { class: 'muted' }, 'No campaigns.')]);
    } catch (e) {
      fill(campaigns, h('p', { class: 'muted' }, e.status === 404 ? 'No campaigns (this server has no campaigns API).' : `No campaigns: ${message(e)}`));
    }
    try {
      const r = await get('/api/v1/firmware');
      const list = Array.isArray(r) ? r : r?.firmware || r?.images || [];
      fill(images, list.length ? h('table', { class: 'data responsive' },
        h('caption', { class: 'visually-hidden' }, 'Firmware images'),
        h('thead', {}, h('tr', {}, ['Id', 'Version', 'Hardware', 'Size'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, list.map((f) => h('tr', {},
          h('td', { 'data-label': 'Id', class: 'mono ellipsis' }, show(f.id)),
          h('td', { 'data-label': 'Version' }, show(f.version ?? f.manifest?.version)),
          h('td', { 'data-label': 'Hardware' }, show(f.hardware ?? f.manifest?.hardware)),
          h('td', { 'data-label': 'Size' }, show(f.size ?? f.manifest?.size)))))) : h('p', { class: 'muted' }, 'No images uploaded.'));
    } catch (e) {
      fill(images, h('p', { class: 'muted' }, e.status === 404 ? 'This server has no firmware API yet.' : `Could not load images: ${message(e)}`));
    }
  }
  load();
  const timer = setInterval(load, 10000);
  return () => clearInterval(timer);
}
