// The confcast dashboard. Plain JavaScript, no build step, served by confcast itself.
//
// Rules this file keeps: every value from the server is put on the page as text (textContent,
// text nodes, attributes set one by one), never as HTML; the API token lives in sessionStorage
// and travels in the Authorization header only (never in a URL); the live feed is one
// server-sent-event stream read with fetch(), because EventSource cannot send a header.
'use strict';

const TOKEN_KEY = 'confcast.api-token';
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  board: null,
  view: 'topics',
  topic: null,           // topic page: its name
  version: null,         // topic page: the version shown
  pages: [],             // instances: the `after` of each page shown so far
  next: null,
  instancesDirty: false,
  lastInstancesLoad: 0,
  commandsTimer: null,
  commandShown: null,
  streamAbort: null,
  streamRetry: 1000,
};

class AuthNeeded extends Error {}

// ---- small DOM helpers (text only) ----------------------------------------------------------

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

function pad(n) { return String(n).padStart(2, '0'); }

function fmtTime(ms) {
  if (ms === null || ms === undefined) return '';
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function short(commit) { return (commit || '').slice(0, 10); }

function firstLine(text) { return (text || '').split('\n')[0]; }

function topicPath(name) { return name.split('/').map(encodeURIComponent).join('/'); }

// ---- the API ----------------------------------------------------------------------------------

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h.Authorization = `Bearer ${state.token}`;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const res = await fetch(path, opts);
  let body = null;
  try { body = await res.json(); } catch (_) { body = null; }
  if (res.status === 401) {
    showLogin((body && body.error) || 'a token is required');
    throw new AuthNeeded();
  }
  return { status: res.status, body };
}

function showLogin(message) {
  $('login').hidden = false;
  $('login-error').textContent = state.token ? `Refused: ${message}` : '';
  $('token').focus();
  stopStream();
}

function signIn(event) {
  event.preventDefault();
  state.token = $('token').value.trim();
  $('token').value = '';
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $('login').hidden = true;
  $('signout').hidden = false;
  start();
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = '';
  stopStream();
  showLogin('');
}

// ---- the live feed (server-sent events over fetch) -------------------------------------------

function stopStream() {
  if (state.streamAbort) state.streamAbort.abort();
  state.streamAbort = null;
  setLive(false, 'offline');
}

function setLive(on, text) {
  const live = $('live');
  live.className = `live ${on ? 'on' : 'off'}`;
  live.textContent = text;
}

async function stream() {
  stopStream();
  const abort = new AbortController();
  state.streamAbort = abort;
  try {
    const res = await fetch('/api/v1/events', { headers: headers({ Accept: 'text/event-stream' }), signal: abort.signal });
    if (res.status === 401) { showLogin('a token is required'); return; }
    if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
    setLive(true, 'live');
    state.streamRetry = 1000;
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, '\n');
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        onEventBlock(block);
      }
    }
  } catch (e) {
    if (abort.signal.aborted) return;
  }
  if (state.streamAbort !== abort) return;
  setLive(false, 'reconnecting');
  setTimeout(() => { if (state.streamAbort === abort) stream(); }, state.streamRetry);
  state.streamRetry = Math.min(state.streamRetry * 2, 30000);
}

function onEventBlock(block) {
  let name = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue; // keep-alive comment
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') name = value;
    else if (field === 'data') data.push(value);
  }
  if (name === 'rollouts' && data.length) {
    try { onBoard(JSON.parse(data.join('\n'))); } catch (_) { /* a bad event is skipped */ }
  }
}

function onBoard(board) {
  state.board = board;
  const fleet = board.instances || {};
  $('fleet').textContent = `${fleet.connected || 0} of ${fleet.total || 0} instances connected`;
  renderTopics();
  if (state.view === 'topic') renderTopicSummary();
  if (state.view === 'instances') {
    // The page shown follows the board, at most every 2 s.
    state.instancesDirty = true;
    const wait = Math.max(0, 2000 - (Date.now() - state.lastInstancesLoad));
    setTimeout(() => { if (state.instancesDirty && state.view === 'instances') loadInstances(state.pages[state.pages.length - 1] || null); }, wait);
  }
}

// ---- topics -----------------------------------------------------------------------------------

function progress(counts) {
  const total = counts.total || 0;
  const bar = el('div', { class: 'progress', role: 'img' });
  for (const k of ['applied', 'behind', 'failed', 'offline']) {
    const n = counts[k] || 0;
    if (!n) continue;
    bar.append(el('div', { class: `seg ${k}`, style: null, title: `${n} ${k}` }));
    bar.lastChild.style.width = `${(100 * n) / total}%`;
  }
  bar.setAttribute('aria-label', `${counts.applied || 0} of ${total} applied`);
  const percent = total ? Math.floor((100 * (counts.applied || 0)) / total) : 0;
  const parts = [];
  for (const k of ['behind', 'failed', 'offline']) if (counts[k]) parts.push(`${counts[k]} ${k}`);
  const text = el('div', { class: 'progress-text' },
    el('b', { text: `${counts.applied || 0}/${total} applied` }),
    total ? ` (${percent}%)` : ' (no instances)',
    parts.length ? ` · ${parts.join(' · ')}` : '');
  return { bar, text, percent };
}

// A pinned topic: who pinned it and why, and how many pushes it holds back (PUT .../pin).
function pinBadge(pin) {
  if (!pin) return '';
  const held = pin.held_total ? ` · ${pin.held_total} held` : '';
  return el('span', { class: 'pin', title: `pinned at v${pin.version} by ${pin.by} ${fmtTime(pin.at_ms)}: ${pin.reason}`, text: `pinned${held}` });
}

// A progressive rollout: its stage and why it is there (CONFIGURATION.md section 14).
function stageText(st) {
  const at = st.stages[st.stage - 1] || '';
  return `v${st.version} ${st.state} at stage ${st.stage} of ${st.stages.length} (${at})`;
}

function stageBadge(st) {
  if (!st || (st.state !== 'rolling' && st.state !== 'halted')) return '';
  const text = st.state === 'halted' ? `halted ${st.stage}/${st.stages.length}` : `stage ${st.stage}/${st.stages.length}`;
  return el('span', { class: `stage ${st.state}`, 'data-state': st.state, title: `${stageText(st)}, policy ${st.policy}: ${st.reason}`, text });
}

function stageNote(st) {
  if (!st) return '';
  const steps = el('ol', { class: 'stages' });
  st.stages.forEach((s, i) => {
    const n = i + 1;
    const cls = n < st.stage || st.state === 'completed' ? 'done' : (n === st.stage ? `now ${st.state}` : 'next');
    steps.append(el('li', { class: cls, text: s }));
  });
  return el('div', { class: `stage-note ${st.state}`, 'data-state': st.state },
    el('div', {}, el('b', { text: `Progressive rollout (${st.policy}): ` }), `${stageText(st)}, from v${st.base_version}`),
    steps,
    st.members === undefined ? '' : el('div', { class: 'tally', text: `in the stages reached: ${st.members} connected, ${st.applied} applied v${st.version}, ${st.failed} failed` }),
    el('div', { class: 'reason', text: st.reason }));
}

function renderTopics() {
  const body = clear($('topics-body'));
  const topics = (state.board && state.board.topics) || [];
  // "Nothing published" only once the board says so, not while it is still on its way.
  $('topics-empty').hidden = !state.board || topics.length > 0;
  for (const t of topics) {
    const p = progress(t.counts || {});
    const row = el('tr', { 'data-topic': t.topic, 'data-percent': p.percent, class: 'clickable', onclick: () => { location.hash = `#/topic/${topicPath(t.topic)}`; } },
      el('td', {}, el('a', { href: `#/topic/${topicPath(t.topic)}`, text: t.topic })),
      el('td', { class: 'mono', title: `published ${fmtTime(t.updated_at_ms)}` }, `v${t.version}`,
        pinBadge(t.pinned),
        stageBadge(t.stage),
        el('div', { class: 'when', text: ago(t.updated_at_ms) })),
      el('td', { class: 'mono', title: t.commit, text: short(t.commit) }),
      el('td', { text: t.author || '' }),
      el('td', { class: 'msg', text: firstLine(t.message) }),
      el('td', {}, p.bar, p.text));
    body.append(row);
  }
}

// ---- one topic: history and diffs -----------------------------------------------------------

function renderTopicSummary() {
  const box = clear($('topic-summary'));
  const t = state.board && (state.board.topics || []).find((x) => x.topic === state.topic);
  if (!t) return;
  const p = progress(t.counts || {});
  box.setAttribute('data-percent', p.percent);
  box.append(el('div', {}, el('div', { class: 'muted', text: `repo ${t.repo} · current v${t.version} · ${short(t.commit)}` }),
    t.pinned ? el('div', { class: 'pin-note', text: `pinned at v${t.pinned.version} by ${t.pinned.by}: ${t.pinned.reason}${t.pinned.held_total ? ` (${t.pinned.held_total} pushes held back)` : ''}` }) : '',
    stageNote(t.stage)),
    el('div', {}, p.bar, p.text));
}

async function openTopic(name, version) {
  state.topic = name;
  $('topic-title').textContent = name;
  renderTopicSummary();
  const { status, body } = await api(`/api/v1/topics/${topicPath(name)}/history?limit=200`);
  const list = clear($('history'));
  if (status !== 200) { list.append(el('li', { text: (body && body.error) || `HTTP ${status}` })); return; }
  for (const h of body.history) {
    list.append(el('li', { 'data-version': h.version, onclick: () => { location.hash = `#/topic/${topicPath(name)}/v/${h.version}`; } },
      el('span', { class: 'v', text: `v${h.version}` }),
      el('span', { class: 'mono', text: short(h.commit) }),
      el('span', { class: 'm', text: firstLine(h.message) }),
      el('span', { class: 'w', text: `${h.author} · ${fmtTime(h.created_at_ms)}` })));
  }
  const shown = version || (body.history[0] && body.history[0].version);
  if (shown) await openVersion(name, shown);
  else { clear($('version-files')).append(el('p', { class: 'muted', text: 'No logged versions.' })); }
}

async function openVersion(name, version) {
  state.version = version;
  for (const li of $('history').children) li.classList.toggle('selected', li.getAttribute('data-version') === String(version));
  $('version-title').textContent = `Version ${version}`;
  const files = clear($('version-files'));
  const meta = clear($('version-meta'));
  const { status, body } = await api(`/api/v1/topics/${topicPath(name)}/versions/${version}`);
  if (status !== 200) { files.append(el('p', { class: 'error', text: (body && body.error) || `HTTP ${status}` })); return; }
  meta.append(el('div', { class: 'mono', text: `commit ${body.commit}` }),
    el('div', { text: `${body.author} · ${fmtTime(body.created_at_ms)} · seq ${body.seq}` }),
    el('div', { class: 'msg', text: body.message }));
  for (const f of body.files) {
    const head = el('div', { class: 'file-head' }, f.old_path ? `${f.old_path} → ${f.path}` : f.path,
      el('span', { class: 'st', text: `${f.status}${f.bytes ? `, ${f.bytes} bytes` : ''}` }));
    const box = el('div', { class: 'file', 'data-path': f.path }, head);
    if (f.diff !== null && f.diff !== undefined) {
      const pre = el('pre', { class: 'diff' });
      for (const line of f.diff.split('\n')) {
        if (line === '') continue;
        let cls = '';
        if (line.startsWith('+++') || line.startsWith('---')) cls = 'head';
        else if (line.startsWith('@@')) cls = 'hunk';
        else if (line.startsWith('+')) cls = 'add';
        else if (line.startsWith('-')) cls = 'del';
        pre.append(el('span', { class: cls, text: line }));
      }
      box.append(pre);
      if (f.truncated) box.append(el('div', { class: 'note', text: 'diff cut at the size cap' }));
    } else {
      box.append(el('div', { class: 'note', text: f.binary ? 'binary file' : (f.note || 'no diff') }));
    }
    files.append(box);
  }
}

// ---- instances --------------------------------------------------------------------------------

function filterParams() {
  const form = $('filters');
  const params = new URLSearchParams();
  for (const name of ['q', 'app', 'label', 'topic', 'status', 'connected']) {
    const v = form.elements[name].value.trim();
    if (v) params.set(name, v);
  }
  params.set('limit', '50');
  return params;
}

async function loadInstances(after) {
  state.instancesDirty = false;
  state.lastInstancesLoad = Date.now();
  const params = filterParams();
  if (after) params.set('after', after);
  const { status, body } = await api(`/api/v1/instances?${params}`);
  const tbody = clear($('instances-body'));
  if (status !== 200) {
    $('instances-count').textContent = (body && body.error) || `HTTP ${status}`;
    return;
  }
  const first = state.pages.length <= 1;
  const start = (state.pages.length - 1) * 50;
  $('instances-count').textContent = body.total === 0 ? 'No instance matches.'
    : `${start + 1}–${start + body.instances.length} of ${body.total} instances`;
  state.next = body.next;
  $('page-next').disabled = !body.next;
  $('page-first').disabled = first;
  for (const i of body.instances) {
    const labels = el('td', {});
    for (const [k, v] of Object.entries(i.labels || {})) labels.append(el('span', { class: 'label', text: `${k}=${v}` }));
    const topics = el('td', {});
    let lastError = '';
    for (const t of i.topics || []) {
      const applied = t.applied_version === null || t.applied_version === undefined ? '–' : `v${t.applied_version}`;
      topics.append(el('span', { class: `topic-chip st-${t.status}`, title: t.status, text: `${t.topic} ${applied}${t.status === 'applied' ? '' : ` (${t.status})`}` }));
      if (t.error) lastError = `${t.topic}: ${t.error}`;
    }
    tbody.append(el('tr', { 'data-instance': i.id },
      el('td', {}, el('span', { class: `dot ${i.connected ? 'on' : 'off'}`, title: i.connected ? 'connected' : 'disconnected' }), i.id),
      el('td', { text: i.app || '' }),
      labels,
      el('td', { class: 'mono', text: i.node || '' }),
      since(i),
      topics,
      el('td', { class: 'msg st-failed', text: lastError })));
  }
}

function firstInstancesPage() {
  state.pages = [null];
  return loadInstances(null);
}

// Connected: since its connection was accepted. Gone: since it left (its last_seen).
function since(i) {
  const at = i.connected ? (i.connected_at_ms || i.last_seen_ms) : i.last_seen_ms;
  return el('td', { title: `${i.connected ? 'connected' : 'left'} ${fmtTime(at)}`, text: `${i.connected ? '' : 'gone '}${ago(at)}` });
}

// ---- commands ---------------------------------------------------------------------------------

function commandBar(counts) {
  const total = counts.targeted || 0;
  const bar = el('div', { class: 'progress' });
  for (const [k, cls] of [['done', 'applied'], ['failed', 'failed'], ['delivered', 'behind'], ['pending', 'offline']]) {
    const n = counts[k] || 0;
    if (!n || !total) continue;
    const seg = el('div', { class: `seg ${cls}`, title: `${n} ${k}` });
    seg.style.width = `${(100 * n) / total}%`;
    bar.append(seg);
  }
  const text = el('div', { class: 'progress-text' }, el('b', { text: `${counts.done || 0}/${total} done` }),
    ` · ${counts.failed || 0} failed · ${counts.delivered || 0} delivered · ${counts.pending || 0} pending`);
  return [bar, text];
}

function describeTarget(target) {
  if (!target || typeof target !== 'object') return String(target);
  if (target.all) return 'all';
  if (target.instances) return `instances ${target.instances.join(', ')}`;
  if (target.app) return `app ${target.app}`;
  if (target.labels) return `labels ${Object.entries(target.labels).map(([k, v]) => `${k}=${v}`).join(', ')}`;
  if (target.topics) return `topics ${target.topics}`;
  return JSON.stringify(target);
}

async function loadCommands() {
  const { status, body } = await api('/api/v1/commands?limit=50');
  if (status === 404) {
    $('commands-unavailable').hidden = false;
    $('commands-panel').hidden = true;
    return;
  }
  $('commands-unavailable').hidden = true;
  $('commands-panel').hidden = false;
  const tbody = clear($('commands-body'));
  if (status !== 200 || !body || !Array.isArray(body.commands)) {
    tbody.append(el('tr', {}, el('td', { colspan: 6, text: (body && body.error) || `HTTP ${status}` })));
    return;
  }
  for (const c of body.commands) {
    tbody.append(el('tr', { class: 'clickable', 'data-command': c.id, onclick: () => showCommand(c.id) },
      el('td', { class: 'mono', text: c.id }),
      el('td', { text: c.name }),
      el('td', { class: 'msg', text: describeTarget(c.target) }),
      el('td', { text: c.created_by || '' }),
      el('td', { text: fmtTime(c.created_at_ms) }),
      el('td', {}, ...commandBar(c.counts || {}))));
  }
  // The command shown below the list follows it.
  if (state.commandShown) await showCommand(state.commandShown);
}

async function showCommand(id) {
  state.commandShown = id;
  const box = $('command-detail');
  const { status, body } = await api(`/api/v1/commands/${encodeURIComponent(id)}`);
  if (state.commandShown !== id) return;
  clear(box);
  if (status !== 200) { box.append(el('p', { class: 'error', text: (body && body.error) || `HTTP ${status}` })); return; }
  box.append(el('h2', { text: `Command ${body.id}: ${body.name}` }),
    el('p', { class: 'mono', text: `args ${JSON.stringify(body.args)}` }));
  const table = el('table', { class: 'grid' }, el('thead', {}, el('tr', {},
    el('th', { text: 'Instance' }), el('th', { text: 'Status' }), el('th', { text: 'Message' }),
    el('th', { text: 'Delivered' }), el('th', { text: 'Finished' }))));
  const tbody = el('tbody', {});
  for (const i of body.instances || []) {
    tbody.append(el('tr', { 'data-instance': i.instance },
      el('td', { text: i.instance }),
      el('td', { class: `st-${i.status === 'done' ? 'applied' : i.status}`, text: i.status }),
      el('td', { class: 'msg', text: i.message || '' }),
      el('td', { text: fmtTime(i.delivered_at_ms) }),
      el('td', { text: fmtTime(i.finished_at_ms) })));
  }
  table.append(tbody);
  box.append(table);
}

async function sendCommand(event) {
  event.preventDefault();
  const form = $('command-form');
  const out = $('command-result');
  const kind = form.elements.kind.value;
  const value = form.elements.value.value.trim();
  let target;
  if (kind === 'all') target = { all: true };
  else if (kind === 'instances') target = { instances: value.split(',').map((s) => s.trim()).filter(Boolean) };
  else if (kind === 'app') target = { app: value };
  else if (kind === 'topics') target = { topics: value };
  else {
    const cut = value.indexOf('=');
    if (cut < 1) { out.textContent = 'label target: key=value'; return; }
    target = { labels: { [value.slice(0, cut)]: value.slice(cut + 1) } };
  }
  let args;
  try { args = JSON.parse(form.elements.args.value || '{}'); } catch (e) { out.textContent = `args are not JSON: ${e.message}`; return; }
  const request = { target, name: form.elements.name.value.trim(), args, deadline_secs: Number(form.elements.deadline.value) || 300 };
  const { status, body } = await api('/api/v1/commands', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(request) });
  if (status === 201) {
    out.textContent = `sent: command ${body.id}`;
    state.commandShown = body.id;
    await loadCommands();
  } else if (status === 403) {
    out.textContent = 'refused: sending commands needs an admin token';
  } else {
    out.textContent = (body && body.error) || `HTTP ${status}`;
  }
}

// ---- views and start-up ------------------------------------------------------------------------

function show(view) {
  state.view = view;
  for (const v of ['topics', 'topic', 'instances', 'commands']) $(`view-${v}`).hidden = v !== view;
  for (const a of document.querySelectorAll('[data-nav]')) {
    const nav = a.getAttribute('data-nav');
    a.classList.toggle('active', nav === view || (view === 'topic' && nav === 'topics'));
  }
  if (state.commandsTimer) { clearInterval(state.commandsTimer); state.commandsTimer = null; }
}

async function route() {
  const hash = decodeURIComponent(location.hash.replace(/^#\/?/, ''));
  try {
    if (hash.startsWith('topic/')) {
      const rest = hash.slice('topic/'.length);
      const m = rest.match(/^(.*)\/v\/(\d+)$/);
      const name = m ? m[1] : rest;
      const version = m ? Number(m[2]) : null;
      if (state.view === 'topic' && state.topic === name && version) { await openVersion(name, version); return; }
      show('topic');
      await openTopic(name, version);
    } else if (hash === 'instances') {
      show('instances');
      await firstInstancesPage();
    } else if (hash === 'commands') {
      show('commands');
      await loadCommands();
      state.commandsTimer = setInterval(() => { loadCommands().catch(() => {}); }, 5000);
    } else {
      show('topics');
      renderTopics();
    }
  } catch (e) {
    if (!(e instanceof AuthNeeded)) console.error(e);
  }
}

function start() {
  stream();
  route();
}

document.addEventListener('DOMContentLoaded', () => {
  $('login-form').addEventListener('submit', signIn);
  $('signout').addEventListener('click', signOut);
  $('filters').addEventListener('submit', (e) => { e.preventDefault(); firstInstancesPage().catch(() => {}); });
  $('page-next').addEventListener('click', () => { if (state.next) { state.pages.push(state.next); loadInstances(state.next).catch(() => {}); } });
  $('page-first').addEventListener('click', () => { firstInstancesPage().catch(() => {}); });
  $('command-form').addEventListener('submit', (e) => { sendCommand(e).catch(() => {}); });
  window.addEventListener('hashchange', route);
  $('signout').hidden = !state.token;
  start();
});
