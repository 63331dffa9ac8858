// The rules view: the rule list with delete, and an editor that creates rules; the server's
// 400 validation message is shown at the field it is about (the condition's position is
// selected in the text).
import { api, get } from './api.js';
import { h, show, message, fill } from './util.js';

const SEVERITIES = ['critical', 'major', 'minor', 'warning', 'info'];

/** A labelled field with its own error line (described-by). */
function field(id, label, control, help, wide = false) {
  control.id = id;
  const err = h('p', { class: 'error field-error', id: `${id}-error` });
  control.setAttribute('aria-describedby', [help ? `${id}-help` : '', `${id}-error`].filter(Boolean).join(' '));
  return {
    control, err,
    el: h('div', { class: wide ? 'field wide' : 'field' }, h('label', { for: id }, label), control,
      help ? h('p', { class: 'muted help', id: `${id}-help` }, help) : null, err),
  };
}

/** Selects line L column C (1-based) of a textarea. */
function selectPosition(textarea, line, column) {
  const lines = textarea.value.split('\n');
  let offset = 0;
  for (let i = 0; i < Math.min(line - 1, lines.length); i++) offset += lines[i].length + 1;
  offset += Math.max(0, column - 1);
  textarea.focus();
  textarea.setSelectionRange(offset, Math.min(textarea.value.length, offset + 1));
}

export function rulesView(root) {
  const error = h('p', { class: 'error', role: 'alert' });
  const tbody = h('tbody');
  const list = h('table', { class: 'data responsive', id: 'rules-table' },
    h('caption', { class: 'visually-hidden' }, 'Rules'),
    h('thead', {}, h('tr', {}, ['Name', 'Kind', 'Condition', 'Severity', 'Enabled', ''].map((c) =>
      h('th', { scope: 'col' }, c || h('span', { class: 'visually-hidden' }, 'Actions'))))),
    tbody);

  const f = {
    id: field('rule-id', 'Id (optional)', h('input', { autocomplete: 'off' })),
    name: field('rule-name', 'Name', h('input', { required: true, autocomplete: 'off' })),
    kind: field('rule-kind', 'Kind', h('select', {}, h('option', { value: 'expression' }, 'expression'), h('option', { value: 'silent' }, 'silent (not heard from)'))),
    condition: field('rule-condition', 'Condition', h('textarea', { rows: '3', spellcheck: 'false' }),
      'An expression on a record, e.g. temperature > 30 && humidity < 20; rate(temperature) is per second.', true),
    silent: field('rule-silent', 'Silent for (seconds)', h('input', { type: 'number', min: '1', value: '60' })),
    forS: field('rule-for', 'Holds for (seconds, optional)', h('input', { type: 'number', min: '0' })),
    severity: field('rule-severity', 'Severity', h('select', {}, SEVERITIES.map((s) => h('option', { value: s, selected: s === 'major' ? 'selected' : false }, s)))),
    glob: field('rule-glob', 'Device id glob (optional)', h('input', { placeholder: 'demo-*', autocomplete: 'off' })),
    devices: field('rule-devices', 'Devices (optional, comma-separated)', h('input', { autocomplete: 'off' })),
    actions: field('rule-actions', 'Actions (optional JSON array; default raises an alarm)', h('textarea', { rows: '3', spellcheck: 'false', placeholder: '[{"type": "alarm"}]' }), undefined, true),
  };
  const enabled = h('input', { type: 'checkbox', id: 'rule-enabled', checked: 'checked' });
  const formMsg = h('p', { id: 'rule-msg', role: 'status' });
  const form = h('form', { id: 'rule-form', class: 'grid-form', novalidate: true },
    Object.values(f).map((x) => x.el),
    h('div', { class: 'field check' }, enabled, h('label', { for: 'rule-enabled' }, 'Enabled')),
    h('div', { class: 'field' }, h('button', { type: 'submit' }, 'Create rule'), formMsg));

  function kindChanged() {
    const silent = f.kind.control.value === 'silent';
    f.condition.el.hidden = silent;
    f.forS.el.hidden = silent;
    f.silent.el.hidden = !silent;
  }
  f.kind.control.addEventListener('change', kindChanged);
  kindChanged();

  root.append(h('h1', {}, 'Rules'), error, list,
    h('section', { class: 'card', 'aria-labelledby': 'editor-title' }, h('h2', { id: 'editor-title' }, 'New rule'), form));

  function clearErrors() {
    for (const x of Object.values(f)) { x.err.textContent = ''; x.control.removeAttribute('aria-invalid'); }
    formMsg.textContent = '';
  }

  function fieldError(x, text) {
    x.err.textContent = text;
    x.control.setAttribute('aria-invalid', 'true');
    x.control.focus();
  }

  /** Puts the server's validation message at the field it names. */
  function showServerError(description) {
    const d = description.toLowerCase();
    const pick = d.includes('silent') ? f.silent : d.includes('severity') ? f.severity
      : d.includes('action') || d.includes('webhook') || d.includes('topic') ? f.actions
        : d.includes('glob') ? f.glob : d.includes('selector') || d.includes('device') ? f.devices
          : d.includes('for_s') ? f.forS : d.includes('name') && !d.includes('condition') ? f.name
            : f.kind.control.value === 'silent' ? f.silent : f.condition;
    fieldError(pick, description);
    const m = /line (\d+),? column (\d+)/i.exec(description);
    if (m && pick === f.condition) selectPosition(f.condition.control, Number(m[1]), Number(m[2]));
  }

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clearErrors();
    const rule = { name: f.name.control.value.trim(), kind: f.kind.control.value, severity: f.severity.control.value, enabled: enabled.checked };
    if (!rule.name) return fieldError(f.name, 'A name is required.');
    if (f.id.control.value.trim()) rule.id = f.id.control.value.trim();
    if (rule.kind === 'silent') {
      rule.silent_s = Number(f.silent.control.value);
    } else {
      rule.condition = f.condition.control.value;
      if (f.forS.control.value) rule.for_s = Number(f.forS.control.value);
    }
    const selector = {};
    if (f.glob.control.value.trim()) selector.id_glob = f.glob.control.value.trim();
    const devices = f.devices.control.value.split(',').map((s) => s.trim()).filter(Boolean);
    if (devices.length) selector.devices = devices;
    if (Object.keys(selector).length) rule.selector = selector;
    if (f.actions.control.value.trim()) {
      try { rule.actions = JSON.parse(f.actions.control.value); } catch (e) { return fieldError(f.actions, `Not JSON: ${e.message}`); }
    }
    try {
      const r = await api('POST', '/api/v1/rules', { body: rule });
      formMsg.textContent = `Created rule ${r.data?.id ?? ''}.`;
      form.reset();
      kindChanged();
      await load();
    } catch (e) {
      if (e.status === 400) showServerError(message(e));
      else formMsg.textContent = `Not created: ${message(e)}`;
    }
  });

  async function remove(rule, button) {
    if (button.dataset.confirm !== 'yes') {
      button.dataset.confirm = 'yes';
      button.textContent = 'Confirm delete';
      button.setAttribute('aria-label', `Confirm delete of rule ${rule.name || rule.id}`);
      return;
    }
    try {
      await api('DELETE', `/api/v1/rules/${encodeURIComponent(rule.id)}`);
      await load();
    } catch (e) {
      error.textContent = `Could not delete ${rule.id}: ${message(e)}`;
    }
  }

  async function load() {
    try {
      const r = await get('/api/v1/rules');
      const rules = Array.isArray(r) ? r : r.rules || [];
      error.textContent = '';
      fill(tbody, rules.length ? rules.map((rule) => h('tr', { 'data-rule': rule.id },
        h('td', { 'data-label': 'Name' }, show(rule.name), h('span', { class: 'muted mono' }, ` ${rule.id}`)),
        h('td', { 'data-label': 'Kind' }, show(rule.kind || 'expression')),
        h('td', { 'data-label': 'Condition', class: 'mono' }, rule.kind === 'silent' ? `silent for ${rule.silent_s} s` : show(rule.condition), rule.for_s ? ` for ${rule.for_s} s` : ''),
        h('td', { 'data-label': 'Severity' }, h('span', { class: `badge sev-${rule.severity}` }, show(rule.severity))),
        h('td', { 'data-label': 'Enabled' }, rule.enabled === false ? 'no' : 'yes'),
        h('td', { 'data-label': '' }, h('button', { type: 'button', class: 'danger', 'aria-label': `Delete rule ${rule.name || rule.id}`, onclick: (e) => remove(rule, e.currentTarget) }, 'Delete')),
      )) : [h('tr', {}, h('td', { colspan: '6', class: 'muted' }, 'No rules yet.'))]);
    } catch (e) {
      fill(tbody);
      error.textContent = e.status === 404 ? 'This server has no rules API.' : `Could not load rules: ${message(e)}`;
    }
  }
  load();
  return () => {};
}
