// The API client: same-origin fetch with the session cookie (the access token stays in an
// HttpOnly cookie, never here) and the CSRF token on every state-changing request.

let csrf = null;
const listeners = new Set();

export class HttpError extends Error {
  constructor(status, body) {
    super(body?.error_description || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

/** Remembers the session's CSRF token (from /dashboard/session or the sign-in answer). */
export function setCsrf(token) { csrf = token; }

/** Calls fn() whenever a request finds the session gone (401). */
export function onSignedOut(fn) { listeners.add(fn); }

/** One API request; resolves {status, data, headers}, rejects with HttpError. */
export async function api(method, path, { body, headers = {} } = {}) {
  const h = { Accept: 'application/json', ...headers };
  if (method !== 'GET' && method !== 'HEAD' && csrf) h['X-CSRF-Token'] = csrf;
  let payload;
  if (body !== undefined) {
    h['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  const r = await fetch(path, { method, headers: h, body: payload, credentials: 'same-origin' });
  const text = await r.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = text; }
  }
  if (r.status === 401 && !path.startsWith('/dashboard/')) for (const fn of listeners) fn();
  if (!r.ok) throw new HttpError(r.status, data);
  return { status: r.status, data, headers: r.headers };
}

export const get = (path) => api('GET', path).then((r) => r.data);

/**
 * Opens the live stream (Server-Sent Events, the cookie authenticates it) with filters;
 * onEvent gets each parsed event, onState 'live' | 'retrying' | 'unavailable'.
 * Returns a function that closes it.
 */
export function openStream(params, onEvent, onState = () => {}) {
  const q = new URLSearchParams(params).toString();
  const es = new EventSource(`/api/v1/stream${q ? `?${q}` : ''}`);
  let opened = false;
  es.onopen = () => { opened = true; onState('live'); };
  es.onmessage = (m) => {
    try { onEvent(JSON.parse(m.data)); } catch { /* not JSON: ignore */ }
  };
  es.addEventListener('dropped', () => { onState('retrying'); });
  es.onerror = () => {
    if (!opened) {
      // Never opened: no stream on this server (or not allowed); callers poll instead.
      es.close();
      onState('unavailable');
    } else if (es.readyState === EventSource.CLOSED) {
      // The server refused the reconnection (signed out, stream gone): poll from now on.
      onState('unavailable');
    } else {
      onState('retrying');
    }
  };
  return () => es.close();
}
