// Small DOM and formatting helpers shared by the views.

/** Creates an element: h('td', {class: 'x', onclick: fn}, child, 'text', ...). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k in el && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Epoch ms from a time that is epoch ms or an RFC 3339 string (null when absent). */
export function toMs(t) {
  if (t === null || t === undefined || t === '') return null;
  if (typeof t === 'number') return t;
  const ms = Date.parse(t);
  return Number.isNaN(ms) ? null : ms;
}

/** "12 s ago", "3 min ago", … or "never". */
export function ago(t) {
  const ms = toMs(t);
  if (ms === null) return 'never';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** A local date and time for a title attribute or a cell. */
export function when(t) {
  const ms = toMs(t);
  return ms === null ? '—' : new Date(ms).toLocaleString();
}

/** A value for display. */
export function show(v) {
  if (typeof v === 'number') return Number.isInteger(v) ? String(v) : v.toFixed(2);
  if (v === null || v === undefined) return '—';
  return typeof v === 'object' ? JSON.stringify(v) : String(v);
}

/** The message of an API error (its error_description) or of any error. */
export function message(e) {
  return e?.body?.error_description || e?.message || String(e);
}

/** Replaces the children of el. */
export function fill(el, ...children) {
  el.replaceChildren();
  for (const c of children.flat()) if (c) el.append(c);
}
