// The dashboard shell: sign-in, hash routing between the views, the header and status line.
import { api, get, setCsrf, onSignedOut } from './api.js';
import { fleetView } from './fleet.js';
import { deviceView } from './device.js';
import { alarmsView } from './alarms.js';
import { rulesView } from './rules.js';
import { firmwareView } from './firmware.js';

const $ = (id) => document.getElementById(id);
let session = null;
let leave = null; // the current view's cleanup

const views = {
  fleet: fleetView,
  device: deviceView,
  alarms: alarmsView,
  rules: rulesView,
  firmware: firmwareView,
};

/** Sets the status line (announced politely to screen readers). */
export function liveStatus(text) { $('live-status').textContent = text; }

function showLogin(error = '') {
  session = null;
  if (leave) { leave(); leave = null; }
  $('view').replaceChildren();
  $('nav').hidden = true;
  $('who').hidden = true;
  $('login-view').hidden = false;
  $('login-error').textContent = error;
  document.title = 'Sign in · Stratus';
  $('client-secret').focus();
  liveStatus('Not signed in');
}

function signedIn(s) {
  session = s;
  setCsrf(s.csrf);
  $('login-view').hidden = true;
  $('nav').hidden = false;
  $('who').hidden = false;
  $('who-name').textContent = `Signed in as ${s.who}`;
  route();
}

function route() {
  if (!session) return;
  const [name, ...rest] = (location.hash.replace(/^#\/?/, '') || 'fleet').split('/');
  const view = views[name] || fleetView;
  const arg = rest.map(decodeURIComponent).join('/');
  if (leave) { leave(); leave = null; }
  for (const a of document.querySelectorAll('#nav a')) {
    const current = a.dataset.view === name || (name === 'device' && a.dataset.view === 'fleet');
    if (current) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  const root = $('view');
  root.replaceChildren();
  liveStatus('');
  leave = view(root, { arg, session, liveStatus }) || null;
  $('main').focus({ preventScroll: true });
}

$('login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const form = new FormData(ev.target);
  const button = ev.target.querySelector('button');
  button.disabled = true;
  try {
    const r = await api('POST', '/dashboard/login', {
      body: { client_id: form.get('client_id'), client_secret: form.get('client_secret') },
    });
    $('client-secret').value = '';
    signedIn(r.data);
  } catch (e) {
    const why = e.status === 401 ? 'Unknown client or wrong secret.' : (e.body?.error_description || e.message);
    $('login-error').textContent = `Sign-in failed: ${why}`;
  } finally {
    button.disabled = false;
  }
});

$('logout').addEventListener('click', async () => {
  try { await api('POST', '/dashboard/logout'); } catch { /* the cookie is cleared anyway */ }
  showLogin();
});

onSignedOut(() => { if (session) showLogin('Your session ended; please sign in again.'); });
window.addEventListener('hashchange', route);

get('/dashboard/session').then(signedIn, () => showLogin());
