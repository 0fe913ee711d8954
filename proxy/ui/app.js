// rumor's live UI: plain JS, no library, no build step. Read-only: every request is a GET.
// Every value from the network reaches the page as a text node or an attribute value
// (textContent, setAttribute with a fixed name): never as markup.
(function () {
  'use strict';

  const STATE_WAIT = '10s';
  const STAT_EVERY = 5000;
  const STAT_WINDOW = '10s';
  const HEALTH_EVERY = 10000;
  const TAP_EVERY = 1000;
  const TAP_KEEP = 200;
  const TOKEN_KEY = 'rumor-api-token';
  const SVG = 'http://www.w3.org/2000/svg';

  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ---- building DOM ------------------------------------------------------------------

  // el('td', {class: 'x', 'data-member': name}, 'text', child): attribute names are
  // always literals of this file; values and children may come from the network.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    return fill(node, attrs, children);
  }

  function sv(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    return fill(node, attrs, children);
  }

  function fill(node, attrs, children) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) {
        node.setAttribute(name, String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const text = (v) => (v === null || v === undefined ? '—' : String(v));
  const byName = (a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);

  function wall(t) {
    if (t === null || t === undefined) return '—';
    return new Date(t * 1000).toISOString().replace('T', ' ').slice(0, 19);
  }

  function ago(seconds) {
    const s = Math.abs(seconds);
    const out = s < 90 ? `${Math.round(s)}s` : s < 5400 ? `${Math.round(s / 60)}m`
      : s < 172800 ? `${Math.round(s / 3600)}h` : `${Math.round(s / 86400)}d`;
    return seconds >= 0 ? `in ${out}` : `${out} ago`;
  }

  // One table body kept in step with a sorted list: a row is rebuilt only when what it
  // shows changed, so a 100-member table costs a comparison per row per update.
  function syncRows(tbody, items, key, row) {
    const rows = tbody.rumorRows || (tbody.rumorRows = new Map());
    const seen = new Set();
    let prev = null;
    for (const item of items) {
      const k = key(item);
      seen.add(k);
      const spec = row(item);  // {attrs, cells: [cell, ...]}
      const sig = JSON.stringify(spec);
      let entry = rows.get(k);
      if (entry === undefined) {
        entry = {tr: document.createElement('tr'), sig: null, words: ''};
        rows.set(k, entry);
      }
      if (entry.sig !== sig) {
        const tr = entry.tr;
        for (const name of tr.getAttributeNames()) tr.removeAttribute(name);
        fill(tr, spec.attrs, []);
        tr.replaceChildren(...spec.cells.map(cell));
        entry.sig = sig;
        entry.words = tr.textContent.toLowerCase();
      }
      const want = prev === null ? tbody.firstChild : prev.nextSibling;
      if (want !== entry.tr) tbody.insertBefore(entry.tr, want);
      prev = entry.tr;
    }
    for (const [k, entry] of rows) {
      if (!seen.has(k)) {
        entry.tr.remove();
        rows.delete(k);
      }
    }
    applyFilter(tbody);
  }

  // A cell: a string, or {t: text, c: class, title}, or {chips: [...]}, or {lines: [...]}.
  function cell(spec) {
    if (spec === null || typeof spec !== 'object') return el('td', {}, text(spec));
    if (spec.chips) {
      return el('td', {}, ...spec.chips.map((c) => el('span', {class: 'chip'}, c)));
    }
    if (spec.lines) return el('td', {}, ...spec.lines.map(line));
    return el('td', {class: spec.c, title: spec.title}, text(spec.t));
  }

  function line(spec) {
    return el('div', spec.attrs, ...spec.parts.map((p) => (typeof p === 'object' && p !== null
      ? el('span', {class: p.c, title: p.title}, text(p.t)) : text(p))));
  }

  function applyFilter(tbody) {
    const want = $('filter').value.trim().toLowerCase();
    for (const entry of (tbody.rumorRows || new Map()).values()) {
      entry.tr.hidden = want !== '' && !entry.words.includes(want);
    }
  }

  // ---- reading the API ---------------------------------------------------------------

  class NeedsToken extends Error {}

  // Browsers give a page 6 connections to this agent. A long poll left running when the
  // page goes away keeps one until the agent answers (up to 10 s): end them ourselves.
  const inflight = new Set();
  window.addEventListener('pagehide', () => {
    for (const ctl of inflight) ctl.abort();
  });

  // A hidden tab polls nothing (so many open tabs do not hold every connection).
  function visible() {
    if (!document.hidden) return Promise.resolve();
    return new Promise((resolve) => {
      const on = () => {
        if (document.hidden) return;
        document.removeEventListener('visibilitychange', on);
        resolve();
      };
      document.addEventListener('visibilitychange', on);
    });
  }

  // guarded: a read that needs the API token where the agent has one (explain, tap).
  async function getJSON(path, guarded, ctl = new AbortController()) {
    const headers = {Accept: 'application/json'};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (guarded && token) headers['X-Rumor-Token'] = token;
    inflight.add(ctl);
    let r;
    let body = null;
    try {
      r = await fetch(path, {headers, cache: 'no-store', credentials: 'same-origin',
        signal: ctl.signal});
      body = await r.json().catch(() => null);
    } finally {
      inflight.delete(ctl);
    }
    if (guarded && (r.status === 401 || r.status === 403)) {
      const why = body && body.error ? body.error : `HTTP ${r.status}`;
      throw new NeedsToken(why);
    }
    if (!r.ok) throw new Error(body && body.error ? body.error : `HTTP ${r.status}`);
    return body;
  }

  let retryAfterToken = null;

  function askToken(what, why, retry) {
    $('token-why').textContent = `${what} needs this agent's API token (${why}). ` +
      'Paste it to read it; the page will not change anything.';
    $('token-box').hidden = false;
    retryAfterToken = retry;
  }

  $('token-save').addEventListener('click', () => {
    const value = $('token').value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    $('token').value = '';
    $('token-box').hidden = true;
    const retry = retryAfterToken;
    retryAfterToken = null;
    if (retry) retry();
  });
  $('token-forget').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $('token-box').hidden = true;
  });

  // ---- the state: members, services, policies (one blocking read) ----------------------

  let state = null;
  let scores = {};  // member -> Lifeguard health score, from the stats query
  let scored = false;

  let stateCtl = null;

  async function stateLoop() {
    let index = '';
    for (;;) {
      await visible();
      const ctl = stateCtl = new AbortController();
      try {
        const q = index ? `?index=${encodeURIComponent(index)}&wait=${STATE_WAIT}` : '';
        const doc = await getJSON(`/v1/ui/state${q}`, false, ctl);
        index = doc.index;
        state = doc;
        setConn('live', '');
        render();
      } catch (e) {
        if (ctl.signal.aborted) continue;  // hidden: resume (at once) when shown
        setConn('down', `no answer from the agent (${e.message}); retrying`);
        await sleep(1000);
      }
    }
  }

  document.addEventListener('visibilitychange', () => {
    if (document.hidden && stateCtl !== null) stateCtl.abort();
  });

  function setConn(what, why) {
    const c = $('conn');
    c.dataset.state = what;
    c.textContent = what === 'live' ? 'live' : 'reconnecting…';
    c.title = why;
    $('updated').textContent = what === 'live' ? `updated ${new Date().toLocaleTimeString()}` : '';
  }

  function render() {
    if (state === null) return;
    const t = performance.now();
    $('agent').textContent = `· ${state.agent}`;
    document.title = `rumor · ${state.agent}`;
    renderMembers();
    renderServices();
    renderPolicies();
    renderGraph();
    // When the first state was on screen, and what the last update cost (bench/ui_time.py).
    const body = document.body.dataset;
    body.renderMs = (performance.now() - t).toFixed(1);
    if (!body.renderedMs) body.renderedMs = String(Math.round(performance.now()));
  }

  function renderMembers() {
    const members = state.members.slice().sort(byName);
    const counts = {};
    for (const m of members) counts[m.status] = (counts[m.status] || 0) + 1;
    $('members-count').textContent = Object.keys(counts).sort()
      .map((s) => `${counts[s]} ${s}`).join(' · ');
    syncRows($('members').tBodies[0], members, (m) => m.name, (m) => {
      const score = scores[m.name];
      const health = score === undefined
        ? {t: '—', title: scored ? 'did not answer the stats query' : 'not asked yet'}
        : {t: score, c: score > 0 ? 'warn' : 'ok',
          title: 'Lifeguard local-health score (0 is healthy; probe timeouts scale by it + 1)'};
      return {
        attrs: {'data-member': m.name, 'data-status': m.status, class: 'clickable'},
        cells: [
          {t: m.name, c: m.name === state.agent ? 'self' : null},
          {t: m.status, c: `status ${m.status}`},
          m.incarnation,
          {t: m.addr, c: 'addr'},
          m.rtt_ms === null ? {t: '—', title: m.name === state.agent ? 'this agent'
            : 'no probe of it answered yet'} : m.rtt_ms.toFixed(2),
          health,
          {chips: Object.keys(m.tags).sort().map((k) => `${k}=${m.tags[k]}`)},
        ],
      };
    });
  }

  function health(svc) {
    if (svc.critical > 0 && svc.passing === 0 && svc.warning === 0) return 'bad';
    if (svc.critical > 0 || svc.warning > 0) return 'warn';
    return 'ok';
  }

  function renderServices() {
    const tbody = $('services').tBodies[0];
    if (state.services === null) {
      $('services-count').textContent = 'this agent runs no catalog';
      syncRows(tbody, [], (s) => s.name, () => null);
      return;
    }
    const services = state.services.slice().sort(byName);
    $('services-count').textContent = `${services.length}`;
    syncRows(tbody, services, (s) => s.name, (s) => ({
      attrs: {'data-service': s.name, 'data-health': health(s)},
      cells: [
        {t: s.name, c: 'name'},
        {t: `${s.passing} passing · ${s.warning} warning · ${s.critical} critical`,
          c: health(s)},
        {lines: s.instances.map((i) => ({
          attrs: {class: 'instance', 'data-instance': i.id, 'data-health': i.status},
          parts: [
            {t: i.status, c: `status ${i.status}`}, ' ', {t: i.id, c: 'name'},
            ` on ${i.node} ${i.address}:${i.port}`,
            i.version ? ` ${i.version}` : '', i.weight !== 1 ? ` weight ${i.weight}` : '',
            i.checks.length ? '' : {t: 'no checks', c: 'check'},
            ...i.checks.map((c) => ({
              t: `${c.id} (${c.kind}): ${c.status}${c.output ? ` — ${c.output}` : ''}`,
              c: `check ${c.status}`,
              title: c.output === undefined ? 'output is known only on the instance\'s agent'
                : 'output of this agent\'s own check'})),
          ],
        }))},
        {chips: s.tags},
        {chips: s.versions},
      ],
    }));
  }

  function renderPolicies() {
    const p = state.policies;
    const docs = p === null ? [] : p.documents.slice().sort(byName);
    const now = Date.now() / 1000;
    $('trust').textContent = p === null ? 'this agent trusts no publisher keys'
      : `trust v${p.trust.version}: ${p.trust.keys.length} key(s), ` +
        `${p.trust.threshold} signature(s) required`;
    syncRows($('policies').tBodies[0], docs, (d) => d.name, (d) => ({
      attrs: {'data-policy': d.name, 'data-kind': d.kind, 'data-version': d.version},
      cells: [
        {t: d.name, c: 'name'}, d.kind, d.version, {chips: d.signed_by}, wall(d.issued),
        d.expires === null ? 'never' : {t: ago(d.expires - now), title: wall(d.expires),
          c: d.expires - now < 3600 ? 'warn' : null},
        d.origin, d.description || '',
      ],
    }));
    const rejections = p === null ? [] : p.rejections || [];
    $('rejections-count').textContent = p === null ? '' : Object.entries(p.stats.rejected)
      .map(([reason, n]) => `${n} ${reason}`).join(' · ') || 'none';
    syncRows($('rejections').tBodies[0], rejections,
      (r) => `${r.reason}\u0000${r.kind}\u0000${r.name}\u0000${r.version}\u0000${r.detail}`,
      (r) => ({
        attrs: {'data-rejection': r.reason},
        cells: [wall(r.last), {t: r.reason, c: 'bad'},
          r.name ? `${r.kind} ${r.name} v${r.version}` : '(not an envelope)', r.detail,
          r.origin, r.count],
      }));
  }

  // ---- health scores: the stats query, every 10 s --------------------------------------

  async function healthLoop() {
    for (;;) {
      await visible();
      try {
        const doc = await getJSON('/v1/query/stats?timeout=2s', false);
        const next = {};
        for (const [name, a] of Object.entries(doc.answers)) {
          if (a.ok && a.answer && typeof a.answer.health_score === 'number') {
            next[name] = a.answer.health_score;
          }
        }
        scores = next;
        scored = true;
        if (state !== null) renderMembers();
      } catch (e) {
        // Kept as they were; the members table says when a score is missing.
      }
      await sleep(HEALTH_EVERY);
    }
  }

  // ---- the traffic graph: golden metrics by edge, every 5 s -----------------------------

  let edges = [];
  let statNote = 'waiting for the first golden-metrics read';
  let selected = null;  // the edge being tapped: {source, service}

  async function statLoop() {
    for (;;) {
      await visible();
      try {
        const doc = await getJSON(`/v1/stat?all=1&by=edge&window=${STAT_WINDOW}`, false);
        edges = edgesOf(doc.rows);
        const missing = doc.missing.length ? `; no answer from ${doc.missing.join(', ')}` : '';
        statNote = `requests/s, success and p99 over ${doc.seconds}s ending ` +
          `${new Date(doc.window[1] * 1000).toLocaleTimeString()}, from ` +
          `${doc.agents.length} agent(s)${missing}`;
      } catch (e) {
        statNote = `golden metrics unavailable: ${e.message}`;
      }
      renderGraph();
      await sleep(STAT_EVERY);
    }
  }

  // Callers' sidecars (outbound) draw the edges; a service reached only through inbound
  // listeners (callers outside the mesh) gets its edge from the callee's side.
  function edgesOf(rows) {
    const out = new Map();
    const reached = new Set(rows.filter((r) => r.listener === 'outbound').map((r) => r.service));
    for (const r of rows) {
      if (r.listener === 'inbound' && reached.has(r.service)) continue;
      const key = `${r.source}\u0000${r.service}`;
      const e = out.get(key) || {source: r.source, service: r.service, listener: r.listener,
        requests: 0, successes: 0, rps: 0, p99: null};
      e.requests += r.requests;
      e.successes += r.successes;
      e.rps += r.rps;
      // Rows of one edge differ only by mTLS; the slower p99 is the honest one to show.
      if (r.p99_ms !== null) e.p99 = e.p99 === null ? r.p99_ms : Math.max(e.p99, r.p99_ms);
      out.set(key, e);
    }
    return [...out.values()].sort((a, b) => (a.source + a.service < b.source + b.service
      ? -1 : 1));
  }

  function edgeClass(e) {
    if (!e.requests) return 'idle';
    const ok = e.successes / e.requests;
    return ok >= 0.995 ? 'ok' : ok >= 0.95 ? 'warn' : 'bad';
  }

  function renderGraph() {
    $('graph-note').textContent = statNote;
    const catalog = new Map((state && state.services ? state.services : [])
      .map((s) => [s.name, s]));
    const names = new Set();
    for (const e of edges) {
      names.add(e.source);
      names.add(e.service);
    }
    // Columns by depth from the callers (longest path, cycles cut after n rounds).
    const depth = new Map([...names].map((n) => [n, 0]));
    for (let round = 0; round < names.size; round++) {
      let moved = false;
      for (const e of edges) {
        if (e.source !== e.service && depth.get(e.service) < depth.get(e.source) + 1 &&
            depth.get(e.source) + 1 < names.size) {
          depth.set(e.service, depth.get(e.source) + 1);
          moved = true;
        }
      }
      if (!moved) break;
    }
    const columns = [];
    for (const n of [...names].sort()) {
      const d = depth.get(n);
      (columns[d] = columns[d] || []).push(n);
    }
    const colW = 360;
    const rowH = 64;
    const nodeW = 150;
    const nodeH = 30;
    const pos = new Map();
    columns.forEach((col, x) => col.forEach((n, y) => pos.set(n, {x: 20 + x * colW, y: 20 + y * rowH})));
    const height = 40 + rowH * Math.max(1, ...columns.map((c) => c.length));
    const width = 40 + colW * Math.max(1, columns.length - 1) + nodeW;
    const svg = $('graph');
    svg.setAttribute('width', width);
    svg.setAttribute('height', height);
    svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
    const defs = sv('defs', {}, ...['ok', 'warn', 'bad', 'idle'].map((c) => sv('marker', {
      id: `arrow-${c}`, viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 10,
      markerHeight: 10, markerUnits: 'userSpaceOnUse', orient: 'auto', class: `arrow ${c}`,
    }, sv('path', {d: 'M 0 0 L 10 5 L 0 10 z'}))));
    const parts = [defs];
    for (const e of edges) {
      const a = pos.get(e.source);
      const b = pos.get(e.service);
      const cls = edgeClass(e);
      const x1 = a.x + nodeW;
      const y1 = a.y + nodeH / 2;
      const x2 = b.x;
      const y2 = b.y + nodeH / 2;
      const back = x2 <= x1;
      const d = back
        ? `M ${x1} ${y1} C ${x1 + 60} ${y1 - 70}, ${x2 - 60} ${y2 - 70}, ${x2} ${y2}`
        : `M ${x1} ${y1} C ${(x1 + x2) / 2} ${y1}, ${(x1 + x2) / 2} ${y2}, ${x2} ${y2}`;
      const success = e.requests ? e.successes / e.requests : null;
      const label = e.requests
        ? `${e.rps.toFixed(1)}/s · ${(success * 100).toFixed(success === 1 ? 0 : 1)}% · ` +
          `p99 ${e.p99 === null ? '—' : `${e.p99.toFixed(1)}ms`}`
        : 'no requests';
      const isSel = selected && selected.source === e.source && selected.service === e.service;
      const lx = (x1 + x2) / 2;
      const ly = back ? Math.min(y1, y2) - 52 : (y1 + y2) / 2 - 8;
      parts.push(sv('g', {
        class: `edge ${cls}${isSel ? ' selected' : ''}`, 'data-edge': `${e.source}->${e.service}`,
        'data-source': e.source, 'data-service': e.service, 'data-listener': e.listener,
        'data-rps': e.rps,
        'data-success': success === null ? '' : success, 'data-p99': e.p99 === null ? '' : e.p99,
      },
      sv('title', {}, `${e.source} → ${e.service} (${e.listener} side): ${e.requests} ` +
        `request(s), ${e.successes} succeeded; click to tap`),
      sv('path', {class: 'hit', d}),
      sv('path', {class: 'line', d, 'marker-end': `url(#arrow-${cls})`}),
      sv('text', {class: 'label', x: lx, y: ly, 'text-anchor': 'middle'}, label)));
    }
    for (const [n, p] of pos) {
      const svc = catalog.get(n);
      const cls = svc ? health(svc) : 'ext';
      const shown = n.length > 20 ? `${n.slice(0, 19)}…` : n;
      parts.push(sv('g', {class: `node ${cls}`, 'data-node': n},
        sv('title', {}, svc ? `${n}: ${svc.passing} passing, ${svc.warning} warning, ` +
          `${svc.critical} critical` : `${n}: not a service in the catalog (a caller)`),
        sv('rect', {x: p.x, y: p.y, width: nodeW, height: nodeH, rx: 6}),
        sv('text', {x: p.x + nodeW / 2, y: p.y + nodeH / 2 + 5, 'text-anchor': 'middle'},
          shown)));
    }
    svg.replaceChildren(...parts);
    const idle = [...catalog.keys()].filter((n) => !names.has(n)).sort();
    $('graph-idle').replaceChildren(...(idle.length
      ? ['No traffic in the window: ', ...idle.map((n) => el('span', {
        class: `chip ${health(catalog.get(n))}`, 'data-idle-service': n}, n))]
      : edges.length ? [] : ['No requests through the sidecars in the window.']));
  }

  $('graph').addEventListener('click', (ev) => {
    const g = ev.target.closest('g.edge');
    if (g) {
      openTap(g.getAttribute('data-source'), g.getAttribute('data-service'),
        g.getAttribute('data-listener'));
    }
  });

  // ---- tap of one edge: the tap query polled every second while open --------------------

  let tap = null;  // {id, source, service, listener, events, timer, busy}

  const tapId = () => `ui${Array.from(crypto.getRandomValues(new Uint8Array(8)),
    (b) => b.toString(16).padStart(2, '0')).join('')}`;

  function openTap(source, service, listener) {
    closeTap();
    tap = {id: tapId(), source, service, listener, events: [], dropped: 0, busy: false};
    selected = {source, service};
    $('tap-title').textContent = `${source} → ${service}`;
    $('tap-note').textContent = 'opening…';
    $('tap').hidden = false;
    $('tap-events').tBodies[0].replaceChildren();
    renderGraph();
    tap.timer = setInterval(pollTap, TAP_EVERY);
    pollTap();
  }

  function closeTap() {
    if (tap === null) return;
    clearInterval(tap.timer);
    const old = tap;
    tap = null;
    selected = null;
    $('tap').hidden = true;
    renderGraph();
    // Close the sessions now rather than in 5 s (each agent also ends them by itself).
    getJSON(`/v1/tap?id=${old.id}&service=${encodeURIComponent(old.service)}&duration=0`,
      true).catch(() => {});
  }

  $('tap-close').addEventListener('click', closeTap);

  async function pollTap() {
    const t = tap;
    if (t === null || t.busy || document.hidden) return;
    t.busy = true;
    try {
      const doc = await getJSON(`/v1/tap?id=${t.id}&service=${encodeURIComponent(t.service)}` +
        `&listener=${t.listener}&duration=5m&max=100000&rate=20&timeout=1s`, true);
      if (tap !== t) return;
      const fresh = doc.events.filter((e) => e.source === t.source || t.source === 'unknown');
      t.events = fresh.reverse().concat(t.events).slice(0, TAP_KEEP);
      t.dropped += Object.values(doc.dropped).reduce((a, b) => a + b, 0);
      $('tap-note').textContent = `open on ${doc.open.length} agent(s)` +
        (t.dropped ? `, ${t.dropped} not shown (the tap's limit: 20/s per agent)` : '') +
        (doc.missing.length ? `, no answer from ${doc.missing.join(', ')}` : '') +
        `; showing the last ${t.events.length} request(s), newest first`;
      if (fresh.length) {
        const body = $('tap-events').tBodies[0];
        body.prepend(...fresh.map((e) => el('tr', {'data-tap-path': e.path},
          ...[new Date(e.at * 1000).toLocaleTimeString(), e.agent, e.method, e.path,
            e.status, e.latency_ms.toFixed(1), e.instance, e.tries,
            e.code || ''].map((v) => el('td', {}, text(v))))));
        while (body.rows.length > TAP_KEEP) body.lastChild.remove();
      }
      if (!doc.open.length && !Object.keys(doc.errors).length) {
        // Every session ended (its duration or its cap): open a fresh one.
        t.id = tapId();
      }
    } catch (e) {
      if (tap !== t) return;
      if (e instanceof NeedsToken) {
        clearInterval(t.timer);
        $('tap-note').textContent = 'the tap needs the API token';
        askToken('A tap', e.message, () => openTap(t.source, t.service, t.listener));
      } else {
        $('tap-note').textContent = `tap failed: ${e.message}; retrying`;
      }
    } finally {
      t.busy = false;
    }
  }

  // ---- explain: the merged suspicion timeline of one member ------------------------------

  $('members').tBodies[0].addEventListener('click', (ev) => {
    const tr = ev.target.closest('tr[data-member]');
    if (tr) openExplain(tr.getAttribute('data-member'));
  });
  $('explain-close').addEventListener('click', () => {
    $('explain').hidden = true;
  });

  async function openExplain(member) {
    $('explain').hidden = false;
    $('explain').dataset.member = member;
    $('explain').dataset.loaded = '';
    $('explain-member').textContent = member;
    $('explain-note').textContent = 'asking every agent…';
    $('explain-story').replaceChildren();
    $('explain-timeline').replaceChildren();
    let doc;
    try {
      doc = await getJSON(`/v1/explain/${encodeURIComponent(member)}?since=10m&timeout=3s`, true);
    } catch (e) {
      if (e instanceof NeedsToken) {
        $('explain-note').textContent = 'explain needs the API token';
        askToken('Explain', e.message, () => openExplain(member));
      } else {
        $('explain-note').textContent = `explain failed: ${e.message}`;
      }
      return;
    }
    if ($('explain').dataset.member !== member) return;
    const entries = [];
    for (const [agent, a] of Object.entries(doc.agents)) {
      for (const r of a.history.records) {
        const [kind, at, about, by, score, detail] = r;
        if (about !== member && kind !== 'health') continue;
        entries.push({at: at - a.offset_ms / 1000, agent, kind, about, by, score, detail});
      }
    }
    entries.sort((x, y) => x.at - y.at || (x.agent < y.agent ? -1 : 1));
    const t0 = entries.length ? entries[0].at : 0;
    const rel = (t) => (t === null || t === undefined ? '—' : `+${(t - t0).toFixed(3)}s`);
    const missing = doc.missing.length ? `; no answer from ${doc.missing.join(', ')}` : '';
    $('explain-note').textContent = `${Object.keys(doc.agents).length} agent(s) answered, ` +
      `${entries.length} record(s) since ${wall(doc.since)}` +
      (entries.length ? ` (t0 ${wall(t0)})` : '') + missing;
    const story = doc.story.episodes.map((ep) => el('li', {'data-incarnation': ep.incarnation},
      `incarnation ${ep.incarnation}: `,
      ep.first_suspecter ? `first suspected by ${ep.first_suspecter} at ` +
        `${rel(ep.suspected_at)} (health ${text(ep.suspecter_health)})` : 'no suspicion',
      ep.confirmers.length ? `; confirmed by ${ep.confirmers.map((c) => c.agent).join(', ')}` : '',
      ep.refuted_at !== null ? `; refuted at ${rel(ep.refuted_at)}` : '; not refuted',
      ep.declared.length ? `; declared failed by ${ep.declared.map((d) => d.agent).join(', ')}` +
        ` from ${rel(ep.declared[0].at)}` : '',
      ep.left_at !== null ? `; left at ${rel(ep.left_at)}` : ''));
    $('explain-story').replaceChildren(...(story.length ? story
      : [el('li', {}, 'no agent recorded a suspicion of it')]));
    $('explain-timeline').replaceChildren(...entries.slice(0, 300).map((e) => el('li', {
      'data-kind': e.kind, class: e.kind},
    el('span', {class: 'at'}, rel(e.at)), ' ', el('span', {class: 'name'}, e.agent), ' ',
    el('span', {class: 'kind'}, e.kind.replace(/_/g, ' ')),
    e.by && e.by !== e.agent ? ` by ${e.by}` : '',
    e.about !== member ? ` (${e.about})` : '',
    e.score !== null ? ` · health ${e.score}` : '',
    Object.keys(e.detail || {}).length ? ` · ${details(e.detail)}` : '')));
    $('explain').dataset.loaded = '1';
  }

  function details(detail) {
    return Object.keys(detail).sort().map((k) => {
      const v = detail[k];
      const shown = typeof v === 'number' && !Number.isInteger(v) ? v.toFixed(3)
        : Array.isArray(v) ? v.join(',') : String(v);
      return `${k}=${shown}`;
    }).join(' ');
  }

  // ---- start -----------------------------------------------------------------------------

  $('filter').addEventListener('input', () => {
    for (const id of ['members', 'services', 'policies', 'rejections']) applyFilter($(id).tBodies[0]);
  });
  // Our own page must never trip the CSP; a count the test (and an operator) can read.
  document.addEventListener('securitypolicyviolation', (ev) => {
    const n = Number(document.body.dataset.cspViolations || 0) + 1;
    document.body.dataset.cspViolations = String(n);
    console.warn('CSP violation', ev.violatedDirective, ev.blockedURI);
  });
  stateLoop();
  statLoop();
  healthLoop();
}());
