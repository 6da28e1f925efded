// kiln's dashboard: plain JavaScript and SVG, served from the kiln binary.
//
// Pages (by the URL's hash): #/ the farm, #/builds/N a build, #/jobs/N/J a job,
// #/clients, #/storage. Each page holds one server-sent event stream (EventSource),
// which reconnects by itself and resumes with Last-Event-ID; nothing polls.
'use strict';

const session = { loggedIn: false, csrf: null, publicRead: false };
let stream = null;
let ticker = null;

// ---- small helpers -------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'text') el.textContent = value;
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const main = () => document.getElementById('main');

function show(...nodes) {
  main().replaceChildren(...nodes);
}

function enc(part) {
  return encodeURIComponent(part);
}

function time(micros) {
  if (!micros) return '';
  return new Date(micros / 1000).toLocaleString();
}

function clock(micros) {
  if (!micros) return '';
  return new Date(micros / 1000).toLocaleTimeString();
}

function duration(secs) {
  if (secs === null || secs === undefined) return '';
  secs = Math.max(0, Math.round(secs));
  if (secs < 60) return `${secs} s`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min ${secs % 60} s`;
  return `${Math.floor(secs / 3600)} h ${Math.floor((secs % 3600) / 60)} min`;
}

function bytes(n) {
  if (n === null || n === undefined) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

function stateCell(state) {
  return h('span', { class: `state state-${state}`, 'data-state': state, text: state });
}

// ---- the API -------------------------------------------------------------------

class NeedLogin extends Error {}

async function api(path, method = 'GET') {
  const options = { method, credentials: 'same-origin', headers: {} };
  if (method !== 'GET') {
    options.headers['x-kiln-csrf'] = session.csrf || '';
  }
  const response = await fetch(path, options);
  if (response.status === 401) throw new NeedLogin();
  const type = response.headers.get('content-type') || '';
  const body = type.includes('json') ? await response.json() : await response.text();
  if (!response.ok) {
    throw new Error((body && body.error) || `${method} ${path}: HTTP ${response.status}`);
  }
  return body;
}

function setLive(on, text) {
  const live = document.getElementById('live');
  live.textContent = text || (on ? 'live' : 'reconnecting…');
  live.classList.toggle('on', on);
}

// One stream per page: the previous page's is closed first.
function follow(path, handlers) {
  if (stream) stream.close();
  const source = new EventSource(path);
  stream = source;
  for (const [kind, handle] of Object.entries(handlers)) {
    source.addEventListener(kind, (event) => {
      if (stream !== source) return;
      handle(JSON.parse(event.data));
    });
  }
  source.addEventListener('open', () => setLive(true));
  source.addEventListener('error', () => {
    if (stream !== source) return;
    setLive(false);
    // A refused stream (401) is not retried by the browser: see whether the session
    // ended, and try again.
    if (source.readyState === EventSource.CLOSED) {
      setTimeout(async () => {
        if (stream !== source) return;
        await loadSession();
        if (!session.loggedIn) loginPage('This page needs a login.');
        else route();
      }, 2000);
    }
  });
}

function stopFollowing() {
  if (stream) stream.close();
  stream = null;
  if (ticker) clearInterval(ticker);
  ticker = null;
}

// ---- login ---------------------------------------------------------------------

async function loadSession() {
  try {
    const answer = await api('/ui/session');
    session.loggedIn = answer.logged_in;
    session.csrf = answer.csrf || null;
    session.publicRead = answer.public_read;
  } catch (err) {
    session.loggedIn = false;
  }
  document.getElementById('logout').hidden = !session.loggedIn;
}

function loginPage(message) {
  stopFollowing();
  setLive(false, 'logged out');
  const error = h('p', { class: 'error', id: 'login-error', text: message || '' });
  const input = h('input', {
    type: 'password', id: 'token', name: 'token', autocomplete: 'current-password',
    placeholder: 'the admin token (DATA/admin.token)',
  });
  const form = h('form', { class: 'card login', id: 'login' },
    h('h1', { text: 'Log in to kiln' }),
    h('label', { for: 'token', text: 'Admin token' }),
    input,
    h('button', { type: 'submit', text: 'Log in' }),
    error);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const response = await fetch('/ui/login', {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ token: input.value }),
    });
    if (response.ok) {
      input.value = '';
      await loadSession();
      route();
    } else {
      const body = await response.json().catch(() => ({}));
      error.textContent = body.error || `refused (HTTP ${response.status})`;
    }
  });
  show(form);
  input.focus();
}

async function logout() {
  await fetch('/ui/logout', {
    method: 'POST', credentials: 'same-origin', headers: { 'x-kiln-csrf': session.csrf || '' },
  });
  session.loggedIn = false;
  session.csrf = null;
  document.getElementById('logout').hidden = true;
  loginPage('Logged out.');
}

// ---- the farm ------------------------------------------------------------------

function progressBar(build) {
  const total = Math.max(1, build.n_jobs);
  const other = build.n_expired + build.n_cancelled;
  const bar = h('div', { class: 'progress', title:
    `${build.n_finished} finished, ${build.n_failed} failed, ${build.n_running} running, ` +
    `${build.n_queued} queued, ${other} expired or cancelled` });
  for (const [n, cls] of [[build.n_finished, 'seg-finished'], [build.n_failed, 'seg-failed'],
    [other, 'seg-other'], [build.n_running, 'seg-running'], [build.n_queued, 'seg-queued']]) {
    if (!n) continue;
    const seg = h('span', { class: cls });
    seg.style.width = `${(100 * n) / total}%`;
    bar.append(seg);
  }
  return bar;
}

function farmPage() {
  const counts = h('div', { class: 'chips', id: 'job-counts' });
  const builds = h('tbody', { id: 'builds' });
  const queues = h('tbody', { id: 'queues' });
  const clients = h('tbody', { id: 'farm-clients' });
  show(
    h('h1', { text: 'The farm' }),
    h('section', { class: 'card' }, h('h2', { text: 'Jobs by state' }), counts),
    h('h2', { text: 'Builds' }),
    h('div', { class: 'scroll' }, h('table', {},
      h('thead', {}, h('tr', {}, ['Build', 'Title', 'Progress', 'Jobs', 'Finished', 'Failed',
        'Running', 'Queued'].map((name, i) => h('th', { class: i === 1 ? 'hide-narrow' : null, text: name })))),
      builds)),
    h('h2', { text: 'Queue by config type' }),
    h('div', { class: 'scroll' }, h('table', {},
      h('thead', {}, h('tr', {}, ['Config type', 'Queued', 'Running', 'Oldest wait',
        'Live clients'].map((name) => h('th', { text: name })))),
      queues)),
    h('h2', { text: 'Clients' }),
    h('div', { class: 'scroll' }, h('table', {},
      h('thead', {}, h('tr', {}, ['Client', 'State', 'Runs', 'Session'].map((name) =>
        h('th', { text: name })))),
      clients)),
  );
  follow('/v1/stream', {
    builds(list) {
      builds.replaceChildren(...list.map((build) => h('tr', { 'data-build': build.number },
        h('td', {}, h('a', { href: `#/builds/${enc(build.number)}`, text: build.number })),
        h('td', { class: 'hide-narrow', text: build.title }),
        h('td', {}, progressBar(build)),
        h('td', { text: build.n_jobs }),
        h('td', { text: build.n_finished }),
        h('td', { text: build.n_failed }),
        h('td', { text: build.n_running }),
        h('td', { text: build.n_queued }))));
      if (!list.length) builds.replaceChildren(h('tr', {}, h('td', { colspan: 8, class: 'muted', text: 'No builds yet.' })));
    },
    queue(queue) {
      counts.replaceChildren(...queue.jobs.map(([state, n]) =>
        h('span', { class: 'chip', 'data-state': state }, stateCell(state), ` ${n}`)));
      const rows = Object.entries(queue.queues);
      queues.replaceChildren(...rows.map(([type, q]) => h('tr', { 'data-config-type': type },
        h('td', { text: type }), h('td', { text: q.queued }), h('td', { text: q.running }),
        h('td', { text: q.queued ? duration(q.oldest_age_secs) : '' }),
        h('td', { class: q.live_clients ? null : 'error', text: q.live_clients }))));
      if (!rows.length) queues.replaceChildren(h('tr', {}, h('td', { colspan: 5, class: 'muted', text: 'Nothing queued or running.' })));
    },
    clients(list) {
      clients.replaceChildren(...list.map((client) => h('tr', { 'data-client': client.id },
        h('td', {}, client.id),
        h('td', { text: client.running.length ? 'busy' : 'idle' }),
        h('td', {}, ...client.running.map((run, i) => {
          const [build, job] = run.split('/');
          return [i ? ', ' : '', h('a', { href: `#/jobs/${enc(build)}/${enc(job)}`, text: run })];
        })),
        h('td', { text: client.session_open ? 'open' : '' }))));
      if (!list.length) clients.replaceChildren(h('tr', {}, h('td', { colspan: 4, class: 'muted', text: 'No client has called yet.' })));
    },
  });
}

// ---- a build and its timeline --------------------------------------------------

// The runs of a build, from its transitions: each claim starts a run, the next
// transition of that job ends it.
function runsOf(events, jobs, now) {
  const runs = [];
  const open = new Map();
  const lastTime = new Map();
  for (const event of events) {
    const key = event.job;
    if (event.from === 'running' && open.has(key)) {
      const run = open.get(key);
      open.delete(key);
      run.end = event.time;
      run.outcome = outcomeOf(event);
      run.reason = event.reason;
    }
    if (event.to === 'running') {
      const run = {
        job: event.job, client: event.client_id || '?', attempt: event.attempt,
        queued: lastTime.get(key) || event.time, start: event.time, end: null,
        outcome: 'running', upload: null,
      };
      open.set(key, run);
      runs.push(run);
    }
    lastTime.set(key, event.time);
  }
  const byId = new Map(jobs.map((job) => [job.id, job]));
  for (const run of open.values()) run.end = now;
  // The server keeps when the job's latest run began to upload: it belongs to the run
  // it falls in.
  for (const run of runs) {
    const since = byId.get(run.job)?.uploading_since;
    if (since && since >= run.start && since <= run.end) run.upload = since;
  }
  return runs;
}

function outcomeOf(event) {
  const reason = event.reason || '';
  if (event.to === 'finished') return 'finished';
  if (event.to === 'cancelled') return 'cancelled';
  if (reason.startsWith('timeout')) return 'timed_out';
  if (reason.startsWith('restarted')) return 'restarted';
  if (event.to === 'failed' && !reason.startsWith('lost')) return 'failed';
  // Back in the queue (or failed as lost) without its client's report: taken back.
  if (event.to === 'queued' && /exit|retry/.test(reason)) return 'failed';
  return 'reclaimed';
}

const MARKS = { failed: '✕', timed_out: '!', reclaimed: '↺', cancelled: '∅', restarted: '↻' };

function gantt(runs, jobsById, now) {
  const clients = [...new Set(runs.map((run) => run.client))].sort();
  const box = h('div', { class: 'gantt scroll', id: 'gantt' });
  if (!runs.length) {
    box.append(h('p', { class: 'muted', text: 'No run has started yet.' }));
    return box;
  }
  // A client with several slots runs jobs side by side: each run takes the first
  // lane of its client's row that is free when it starts.
  const lanes = new Map();
  for (const run of [...runs].sort((a, b) => a.start - b.start)) {
    const ends = lanes.get(run.client) || [];
    let lane = ends.findIndex((end) => end <= run.start);
    if (lane < 0) {
      lane = ends.length;
      ends.push(0);
    }
    ends[lane] = run.end || now;
    run.lane = lane;
    lanes.set(run.client, ends);
  }
  const top = new Map();
  let nLanes = 0;
  for (const client of clients) {
    top.set(client, nLanes);
    nLanes += lanes.get(client).length;
  }
  const t0 = Math.min(...runs.map((run) => run.queued));
  const t1 = Math.max(now, ...runs.map((run) => run.end || now));
  const label = 110;
  const width = Math.max(320, Math.min(1280, (main().clientWidth || 900) - 30));
  const plot = width - label - 10;
  const rowHeight = 26;
  const height = nLanes * rowHeight + 26;
  const x = (t) => label + ((t - t0) / Math.max(1, t1 - t0)) * plot;
  const svg = s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': 'Timeline: one row per client, one bar per run' });
  clients.forEach((client) => {
    const y = top.get(client) * rowHeight;
    svg.append(
      s('rect', { class: 'lane', x: label, y: y + 2, width: plot,
        height: lanes.get(client).length * rowHeight - 4 }),
      s('text', { x: 4, y: y + rowHeight / 2 + 4, class: 'client-name', 'data-client': client }, client),
    );
  });
  for (const run of runs) {
    const y = (top.get(run.client) + run.lane) * rowHeight;
    const job = jobsById.get(run.job);
    const upload = run.upload && run.upload < run.end ? run.upload : null;
    const title = `${run.job} (${job ? job.title : ''}) attempt ${run.attempt} on ${run.client}\n` +
      `waited ${duration((run.start - run.queued) / 1e6)}, ran ${duration(((upload || run.end) - run.start) / 1e6)}` +
      (upload ? `, uploaded ${duration((run.end - upload) / 1e6)}` : '') +
      `\n${run.outcome}${run.reason ? `: ${run.reason}` : ''}`;
    const bar = s('g', {
      class: `bar outcome-${run.outcome}`, 'data-job': run.job, 'data-client': run.client,
      'data-attempt': run.attempt, 'data-outcome': run.outcome,
      onclick: () => { location.hash = `#/jobs/${enc(currentBuild)}/${enc(run.job)}`; },
    }, s('title', {}, title));
    if (run.start > run.queued) {
      bar.append(s('line', { class: 'wait', x1: x(run.queued), x2: x(run.start), y1: y + rowHeight / 2, y2: y + rowHeight / 2 }));
    }
    const runEnd = upload || run.end;
    bar.append(s('rect', { class: 'run', x: x(run.start), y: y + 5, height: rowHeight - 10,
      width: Math.max(2, x(runEnd) - x(run.start)) }));
    if (upload) {
      bar.append(s('rect', { class: 'upload', x: x(upload), y: y + 5, height: rowHeight - 10,
        width: Math.max(2, x(run.end) - x(upload)) }));
    }
    if (MARKS[run.outcome]) {
      bar.append(s('text', { class: `mark mark-${run.outcome}`, x: x(run.end) + 2, y: y + rowHeight / 2 + 4 }, MARKS[run.outcome]));
    }
    svg.append(bar);
  }
  const axisY = nLanes * rowHeight + 16;
  const ticks = width < 600 ? 2 : 4;
  for (let i = 0; i <= ticks; i += 1) {
    const t = t0 + ((t1 - t0) * i) / ticks;
    svg.append(s('text', { class: 'axis', x: Math.min(x(t), width - 70), y: axisY }, clock(t)));
  }
  box.append(svg, h('div', { class: 'legend' },
    h('span', {}, h('i', { class: 'seg-queued' }), 'waiting (dashed)'),
    h('span', {}, h('i', { class: 'seg-running' }), 'running'),
    h('span', {}, h('i', { class: 'legend-upload' }), 'uploading'),
    h('span', {}, h('i', { class: 'seg-finished' }), 'finished'),
    h('span', {}, h('i', { class: 'seg-failed' }), `failed ${MARKS.failed}, timed out ${MARKS.timed_out}`),
    h('span', {}, h('i', { class: 'legend-reclaimed' }), `reclaimed ${MARKS.reclaimed}`)));
  return box;
}

let currentBuild = null;

function buildPage(number) {
  currentBuild = number;
  const jobsBody = h('tbody', { id: 'jobs' });
  const timeline = h('div', { id: 'timeline' });
  const summary = h('div', { class: 'chips', id: 'build-counts' });
  show(
    h('h1', {}, 'Build ', number),
    summary,
    h('h2', { text: 'Timeline' }),
    timeline,
    h('h2', { text: 'Jobs' }),
    h('div', { class: 'scroll' }, h('table', {},
      h('thead', {}, h('tr', {}, ['Job', 'State', 'Client', 'Stage', 'Percent', 'ETA',
        'Attempt'].map((name) => h('th', { text: name })))),
      jobsBody)),
  );
  const events = [];
  let jobs = [];
  const draw = () => {
    const now = Date.now() * 1000;
    const byId = new Map(jobs.map((job) => [job.id, job]));
    timeline.replaceChildren(gantt(runsOf(events, jobs, now), byId, now));
  };
  follow(`/v1/builds/${enc(number)}/stream`, {
    jobs(list) {
      jobs = list;
      const counts = {};
      for (const job of list) counts[job.state] = (counts[job.state] || 0) + 1;
      summary.replaceChildren(...Object.entries(counts).map(([state, n]) =>
        h('span', { class: 'chip' }, stateCell(state), ` ${n}`)));
      jobsBody.replaceChildren(...list.map((job) => h('tr', { 'data-job': job.id, 'data-state': job.state },
        h('td', {}, h('a', { href: `#/jobs/${enc(number)}/${enc(job.id)}`, text: job.id })),
        h('td', {}, stateCell(job.state)),
        h('td', { text: job.client_id || '' }),
        h('td', { text: [job.major_state, job.minor_state].filter(Boolean).join(' / ') }),
        h('td', { text: job.percent === null || job.percent === undefined ? '' : `${job.percent} %` }),
        h('td', { text: job.eta_seconds === null || job.eta_seconds === undefined ? '' : duration(job.eta_seconds) }),
        h('td', { text: job.attempt }))));
      draw();
    },
    transition(event) {
      events.push(event);
      draw();
    },
  });
  // Running bars grow with the clock.
  ticker = setInterval(() => {
    if (jobs.some((job) => job.state === 'running')) draw();
  }, 2000);
}

// ---- a job ---------------------------------------------------------------------

const MAX_LOG_LINES = 2000;

function jobPage(number, id) {
  const base = `/v1/jobs/${enc(number)}/${enc(id)}`;
  const status = h('dl', { class: 'kv', id: 'job-status' });
  const actions = h('div', { class: 'actions' });
  const message = h('p', { id: 'action-message', class: 'muted' });
  const images = h('tbody', { id: 'images' });
  const eventsBody = h('tbody', { id: 'events' });
  const log = h('pre', { class: 'log', id: 'log' });
  if (session.loggedIn) {
    const act = (what) => async () => {
      message.textContent = `${what}…`;
      try {
        await api(`${base}/${what}`, 'POST');
        message.textContent = `${what}: done`;
      } catch (err) {
        message.textContent = `${what}: ${err.message}`;
      }
    };
    actions.append(
      h('button', { type: 'button', id: 'restart', onclick: act('restart'), text: 'Restart' }),
      h('button', { type: 'button', id: 'cancel', class: 'danger', onclick: act('cancel'), text: 'Cancel' }),
    );
  }
  show(
    h('h1', {}, h('a', { href: `#/builds/${enc(number)}`, text: `Build ${number}` }), ' / ', id),
    h('div', { class: 'card' }, status, actions, message,
      h('a', { href: `${base}/status.xml`, target: '_blank', text: 'status.xml' })),
    h('h2', { text: 'Log' }),
    log,
    h('h2', { text: 'Images' }),
    h('div', { class: 'scroll' }, h('table', {},
      h('thead', {}, h('tr', {}, ['Image', 'Size', 'SHA-256'].map((name) => h('th', { text: name })))),
      images)),
    h('h2', { text: 'Events' }),
    h('div', { class: 'scroll' }, h('table', {},
      h('thead', {}, h('tr', {}, ['Time', 'From', 'To', 'Client', 'Attempt', 'Reason'].map((name) =>
        h('th', { text: name })))),
      eventsBody)),
  );
  let imagesState = null;
  const loadImages = async (state) => {
    if (state === imagesState) return;
    imagesState = state;
    try {
      const list = (await api(`/v1/builds/${enc(number)}/images`)).filter((image) => image.job_id === id);
      images.replaceChildren(...list.map((image) => h('tr', { 'data-image': image.name },
        h('td', {}, h('a', { href: `${base}/images/${enc(image.name)}`, download: image.name, text: image.name })),
        h('td', { text: bytes(image.size) }),
        h('td', { class: 'wrap' }, h('code', { text: image.sha256 })))));
      if (!list.length) images.replaceChildren(h('tr', {}, h('td', { colspan: 3, class: 'muted', text: 'No images (yet).' })));
    } catch (err) {
      images.replaceChildren(h('tr', {}, h('td', { colspan: 3, class: 'error', text: err.message })));
    }
  };
  follow(`${base}/stream`, {
    job(job) {
      const fields = [
        ['State', stateCell(job.state)], ['Title', job.title], ['Config type', job.config_type],
        ['Client', job.client_id || ''], ['Attempt', job.attempt],
        ['Stage', [job.major_state, job.minor_state].filter(Boolean).join(' / ')],
        ['Percent', job.percent === null || job.percent === undefined ? '' : `${job.percent} %`],
        ['Started', time(job.time_start)], ['Ended', time(job.time_complete)],
        ['Error', job.error || ''],
      ];
      status.replaceChildren(...fields.flatMap(([name, value]) => [h('dt', { text: name }), h('dd', {}, value)]));
      status.setAttribute('data-state', job.state);
      loadImages(job.state);
    },
    transition(event) {
      eventsBody.append(h('tr', {},
        h('td', { text: time(event.time) }), h('td', { text: event.from || '' }),
        h('td', {}, stateCell(event.to)), h('td', { text: event.client_id || '' }),
        h('td', { text: event.attempt }), h('td', { class: 'wrap', text: event.reason || '' })));
    },
    log(lines) {
      const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      for (const line of lines) {
        log.append(h('span', { class: line.stream, 'data-seq': line.seq }, `${line.text}\n`));
      }
      while (log.childNodes.length > MAX_LOG_LINES) log.firstChild.remove();
      if (stick) log.scrollTop = log.scrollHeight;
    },
  });
}

// ---- clients and storage -------------------------------------------------------

async function clientsPage() {
  stopFollowing();
  const body = h('tbody', { id: 'clients' });
  show(h('h1', { text: 'Clients' }), h('div', { class: 'scroll' }, h('table', {},
    h('thead', {}, h('tr', {}, ['Client', 'Types', 'Slots', 'Version', 'Address', 'Last contact',
      'Session', 'Running', 'Claimed', 'Finished', 'Failed', 'Lost', 'Image bytes'].map((name) =>
      h('th', { text: name })))),
    body)));
  const render = (list) => {
    body.replaceChildren(...list.map((client) => h('tr', { 'data-client': client.id },
      h('td', { text: client.id }), h('td', { text: client.include.join(' ') }),
      h('td', { text: client.slots ?? '' }), h('td', { text: client.version || '' }),
      h('td', { text: client.address || '' }), h('td', { text: time(client.last_contact) }),
      h('td', { text: client.session_open ? 'open' : '' }),
      h('td', {}, ...client.held.map((held, i) => [i ? ', ' : '',
        h('a', { href: `#/jobs/${enc(held.build)}/${enc(held.job)}`, text: `${held.build}/${held.job}` })])),
      h('td', { text: client.n_claimed }), h('td', { text: client.n_finished }),
      h('td', { text: client.n_failed }), h('td', { text: client.n_lost }),
      h('td', { text: bytes(client.image_bytes) }))));
  };
  render(await api('/v1/clients'));
  // The farm's stream says when the clients' load changed: read the inventory again.
  follow('/v1/stream', { async clients() { render(await api('/v1/clients')); } });
}

async function storagePage() {
  stopFollowing();
  const grid = h('div', { class: 'grid', id: 'storage' });
  show(h('h1', { text: 'Storage' }), grid);
  const render = (stats) => {
    const figures = [
      ['Images', stats.images, 'images'], ['Bytes of images', bytes(stats.image_bytes), 'image_bytes'],
      ['Bytes stored (chunks on disk)', bytes(stats.bytes_stored), 'bytes_stored'],
      ['Chunks stored', stats.chunks_stored, 'chunks_stored'],
      ['Bytes received', bytes(stats.bytes_received), 'bytes_received'],
      ['Bytes saved by deduplication', bytes(stats.bytes_deduplicated), 'bytes_deduplicated'],
    ];
    grid.replaceChildren(...figures.map(([name, value, key]) => h('div', { class: 'card', 'data-figure': key },
      h('div', { class: 'muted', text: name }), h('div', { class: 'figure', text: value }))));
  };
  render(await api('/v1/storage'));
  follow('/v1/stream', { async builds() { render(await api('/v1/storage')); } });
}

// ---- routing -------------------------------------------------------------------

async function route() {
  stopFollowing();
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  // With --public-read a build's page is open to all; the rest needs the login.
  const needsAdmin = parts[0] !== 'builds';
  if (!session.loggedIn && (needsAdmin || !session.publicRead)) {
    loginPage();
    return;
  }
  try {
    if (parts[0] === 'builds' && parts[1]) buildPage(parts[1]);
    else if (parts[0] === 'jobs' && parts[1] && parts[2]) jobPage(parts[1], parts[2]);
    else if (parts[0] === 'clients') await clientsPage();
    else if (parts[0] === 'storage') await storagePage();
    else farmPage();
  } catch (err) {
    if (err instanceof NeedLogin) loginPage('Your session ended: log in again.');
    else show(h('p', { class: 'error', text: err.message }));
  }
}

window.addEventListener('hashchange', route);
document.getElementById('logout').addEventListener('click', logout);
loadSession().then(route);
