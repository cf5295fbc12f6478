// dlsm dashboard: draws the node's state from its server-sent events
// (GET v1/events, one JSON object per event; see src/node/dashboard.rs).
// Everything from the node is put in the page as text, never as HTML.
'use strict';

(() => {
  // Cell codes of a region view (src/migrate/clone/view.rs, `cell`).
  const STATE = 3, ON_DEMAND = 4, WRITTEN = 8;
  const $ = (id) => document.getElementById(id);

  // The API token, when the node has one: from the page's own URL
  // (#token=... or ?token=...), then kept for this tab only and removed
  // from the address bar.
  function takeToken() {
    const hash = new URLSearchParams(location.hash.slice(1));
    const query = new URLSearchParams(location.search);
    const given = hash.get('token') || query.get('token');
    if (given) {
      try { sessionStorage.setItem('dlsm-token', given); } catch (_) { /* private mode */ }
      history.replaceState(null, '', location.pathname);
      return given;
    }
    try { return sessionStorage.getItem('dlsm-token'); } catch (_) { return null; }
  }
  const token = takeToken();

  // ---- formatting ----
  const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  function bytes(n) {
    if (n == null) return '—';
    let i = 0;
    while (n >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + ' ' + UNITS[i];
  }
  const perSec = (n) => bytes(Math.round(n)) + '/s';
  function duration(s) {
    if (s == null || !isFinite(s)) return '—';
    s = Math.round(s);
    if (s < 60) return s + ' s';
    if (s < 3600) return Math.floor(s / 60) + ' min ' + String(s % 60).padStart(2, '0') + ' s';
    return Math.floor(s / 3600) + ' h ' + String(Math.floor(s / 60) % 60).padStart(2, '0') + ' min';
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }
  function setText(e, t) { if (e.textContent !== t) e.textContent = t; }

  // ---- migrations ----
  const cards = new Map();   // key -> card refs
  const samples = new Map(); // key -> [[at_ms, bytes_on_demand], ...] for the on-demand rate
  const keyOf = (m) => m.volume + '\u0000' + m.role + '\u0000' + m.id;

  function statRow(dl, label) {
    const d = el('div');
    d.append(el('dt', null, label));
    const dd = el('dd');
    d.append(dd);
    dl.append(d);
    return dd;
  }

  function newCard(m) {
    const root = el('article', 'mig');
    root.dataset.volume = m.volume;
    root.dataset.role = m.role;
    const head = el('div', 'mig-head');
    const h3 = el('h3');
    h3.append(el('span', 'vol', m.volume), ' ', el('span', 'dir'));
    const phase = el('span', 'badge');
    const flags = el('span');
    const id = el('span', 'id');
    head.append(h3, phase, flags, id);
    const progress = el('div', 'progress');
    const bar = el('div', 'bar');
    const pct = el('span', 'pct');
    progress.append(bar, pct);
    const dl = el('dl', 'stats');
    const s = {
      regions: statRow(dl, 'regions'),
      background: statRow(dl, 'copy rate'),
      limit: statRow(dl, 'rate limit'),
      eta: statRow(dl, 'ETA'),
      handoff: statRow(dl, 'handoff after'),
      copied: statRow(dl, 'copied'),
      onDemand: statRow(dl, 'on demand'),
      onDemandRate: statRow(dl, 'on-demand rate'),
      skipped: statRow(dl, 'zeroes skipped'),
    };
    const map = el('div', 'map');
    map.dataset.volume = m.volume;
    const caption = el('p', 'map-note');
    const note = el('p', 'map-note');
    const stalled = el('p', 'stalled');
    const error = el('p', 'error');
    root.append(head, progress, dl, map, caption, note, stalled, error);
    return {
      root, dir: h3.querySelector('.dir'), phase, flags, id, bar, pct, s, map, caption, note, stalled, error,
      cells: [],
    };
  }

  // The on-demand rate over the last few seconds, from the counters.
  function onDemandRate(key, at, total) {
    let list = samples.get(key);
    if (!list) { list = []; samples.set(key, list); }
    list.push([at, total]);
    while (list.length > 2 && at - list[0][0] > 3000) list.shift();
    const [t0, b0] = list[0];
    return at > t0 ? ((total - b0) * 1000) / (at - t0) : 0;
  }

  function drawMap(c, view) {
    c.caption.hidden = !view;
    if (!view) {
      c.map.hidden = true;
      c.cells = [];
      c.map.replaceChildren();
      delete c.map.dataset.present;
      return;
    }
    c.map.hidden = false;
    const n = view.cells.length;
    if (c.cells.length !== n) {
      const frag = document.createDocumentFragment();
      c.cells = [];
      for (let i = 0; i < n; i++) {
        const e = el('span', 'c s0');
        c.cells.push(e);
        frag.append(e);
      }
      c.map.replaceChildren(frag);
      c.map.style.setProperty('--cols', String(Math.min(64, n)));
    }
    const perCell = view.regions_total / Math.max(n, 1);
    for (let i = 0; i < n; i++) {
      const code = view.cells[i];
      const cls = 'c s' + (code & STATE) + (code & ON_DEMAND ? ' d' : '') + (code & WRITTEN ? ' w' : '');
      const e = c.cells[i];
      if (e.className !== cls) e.className = cls;
    }
    c.map.dataset.cells = String(n);
    c.map.dataset.present = String(view.counts.present);
    c.map.dataset.onDemand = String(view.counts.on_demand);
    c.map.dataset.written = String(view.counts.written);
    c.map.dataset.regionsPresent = String(view.regions_present);
    const per = perCell === 1 ? '1 region' : '~' + (perCell >= 10 ? Math.round(perCell) : perCell.toFixed(1)) + ' regions';
    setText(c.caption, n + ' cells of ' + per + ' (' + bytes(view.region_size) + ' each) · ' +
      view.counts.present + ' present, ' + view.counts.partial + ' partly · fetched on demand in ' +
      view.counts.on_demand + ' · written here in ' + view.counts.written);
  }

  function drawMigration(c, m, view, at) {
    c.root.dataset.phase = m.phase;
    setText(c.dir, (m.role === 'destination' ? '← from ' + m.peer : '→ to ' + m.peer) +
      (m.rollback_of ? ' · rollback of ' + m.rollback_of : ''));
    setText(c.phase, m.phase);
    c.phase.className = 'badge phase-' + m.phase;
    const flags = [];
    if (m.paused) flags.push('paused');
    if (m.stalled) flags.push('stalled');
    setText(c.flags, flags.join(' · '));
    c.flags.className = flags.length ? 'badge warn' : '';
    c.flags.hidden = !flags.length;
    setText(c.id, m.id ? 'migration ' + m.id : '');
    const total = m.regions_total || 0;
    const present = m.regions_present || 0;
    const frac = total ? present / total : m.phase === 'complete' ? 1 : 0;
    c.bar.style.width = (frac * 100).toFixed(2) + '%';
    setText(c.pct, (frac * 100).toFixed(1) + ' %');
    setText(c.s.regions, total ? present + ' / ' + total + ' × ' + bytes(m.region_size) : '—');
    setText(c.s.background, m.phase === 'hydrating' && !m.paused ? perSec(m.rate) : '—');
    setText(c.s.limit, m.rate_limit ? perSec(m.rate_limit) : 'none');
    setText(c.s.eta, duration(m.eta_seconds));
    setText(c.s.onDemand, bytes(m.bytes_on_demand));
    setText(c.s.onDemandRate, perSec(onDemandRate(keyOf(m), at, m.bytes_on_demand || 0)));
    setText(c.s.copied, bytes(m.bytes_background));
    setText(c.s.skipped, bytes(m.bytes_skipped));
    setText(c.s.handoff, m.handoff_after_seconds == null ? 'not yet' : duration(m.handoff_after_seconds));
    drawMap(c, view);
    let note = '';
    if (!view && m.role === 'source') note = 'The region map is drawn by the destination, ' + m.peer + '.';
    else if (!view) note = 'No region map on this node.';
    setText(c.note, note);
    c.note.hidden = !note;
    setText(c.stalled, m.stalled || '');
    c.stalled.hidden = !m.stalled;
    setText(c.error, m.last_error ? 'last error: ' + m.last_error : '');
    c.error.hidden = !m.last_error;
  }

  function drawMigrations(ev) {
    const live = ev.migrations.filter((m) => !m.ended);
    const views = new Map(ev.regions.map((v) => [v.volume + '\u0000' + v.id, v]));
    const box = $('migrations');
    const seen = new Set();
    for (const m of live) {
      const k = keyOf(m);
      seen.add(k);
      let c = cards.get(k);
      if (!c) { c = newCard(m); cards.set(k, c); }
      const view = m.role === 'destination' ? views.get(m.volume + '\u0000' + m.id) : undefined;
      drawMigration(c, m, view, ev.at_ms);
      box.append(c.root); // keeps the node's order
    }
    for (const [k, c] of cards) {
      if (!seen.has(k)) { c.root.remove(); cards.delete(k); samples.delete(k); }
    }
    $('no-migrations').hidden = live.length > 0;

    const ended = ev.migrations.filter((m) => m.ended);
    $('ended-section').hidden = ended.length === 0;
    const rows = ended.map((m) => {
      const tr = el('tr');
      const when = m.ended_at ? new Date(m.ended_at * 1000).toLocaleString() : '—';
      tr.append(el('td', null, m.volume), el('td', null, m.role), el('td', 'mono', m.peer),
        el('td', null, m.phase), el('td', 'wrap', m.ended), el('td', 'num', bytes(m.bytes_on_demand)),
        el('td', 'num', bytes(m.bytes_background)), el('td', null, when));
      return tr;
    });
    $('ended').replaceChildren(...rows);
  }

  // ---- volumes ----
  function tableOf(t) {
    if (!t) return '—';
    if (t.kind === 'clone') {
      const from = t.origin && t.origin.api ? ' ← ' + t.origin.api : '';
      return 'clone' + from + (t.handed_off ? '' : ' (passthrough)');
    }
    if (t.kind === 'remote') return 'remote ' + t.api;
    return t.kind;
  }
  function drawVolumes(ev) {
    const rows = ev.volumes
      .slice()
      .sort((a, b) => a.name.localeCompare(b.name))
      .map((v) => {
        const tr = el('tr');
        tr.dataset.volume = v.name;
        tr.append(el('td', null, v.name), el('td', 'num', bytes(v.size)), el('td', null, tableOf(v.table)),
          el('td', 'num', bytes(v.allocated_bytes)), el('td', 'num', String(v.connections)),
          el('td', 'mono', v.uri || '—'), el('td', 'mono', v.fenced_to || ''));
        return tr;
      });
    $('volumes').replaceChildren(...rows);
    $('no-volumes').hidden = rows.length > 0;
  }

  // ---- the stream ----
  function setConn(state, text) {
    const c = $('conn');
    c.dataset.state = state;
    setText(c, text);
  }
  function notice(text) {
    const n = $('notice');
    setText(n, text || '');
    n.hidden = !text;
  }

  function onEvent(msg) {
    let ev;
    try { ev = JSON.parse(msg.data); } catch (_) { return; }
    setConn('live', 'live');
    notice('');
    setText($('node'), ev.node + ' · ' + ev.api);
    document.title = 'dlsm · ' + ev.node;
    drawMigrations(ev);
    drawVolumes(ev);
    const age = ev.migrations_age_ms;
    const stale = age != null && age > 3000 ? ' (migration list ' + duration(age / 1000) + ' old: a peer is slow)' : '';
    setText($('updated'), 'updated ' + new Date(ev.at_ms).toLocaleTimeString() + stale);
    setText($('subscribers'), ev.subscribers + (ev.subscribers === 1 ? ' dashboard open' : ' dashboards open'));
    document.body.dataset.events = String((Number(document.body.dataset.events) || 0) + 1);
  }

  let source = null;
  function connect() {
    const url = 'v1/events' + (token ? '?token=' + encodeURIComponent(token) : '');
    source = new EventSource(url);
    source.onmessage = onEvent;
    source.onerror = () => {
      if (source.readyState === EventSource.CONNECTING) {
        setConn('connecting', 'reconnecting…');
        return;
      }
      // Closed for good: the node answered with an error. Ask why.
      setConn('down', 'disconnected');
      const headers = token ? { Authorization: 'Bearer ' + token } : {};
      fetch('v1/node', { headers, cache: 'no-store' })
        .then((r) => {
          if (r.status === 401) {
            notice('This node needs its API token: open this page as /ui#token=TOKEN.');
            return;
          }
          notice('The node refused the event stream (too many dashboards open?); retrying in 5 s.');
          setTimeout(connect, 5000);
        })
        .catch(() => {
          notice('The node cannot be reached; retrying in 5 s.');
          setTimeout(connect, 5000);
        });
    };
  }
  connect();
})();
