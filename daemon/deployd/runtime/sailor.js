'use strict';
/*
 * The Node.js sailor: loads one component function and speaks the step protocol
 * (deployd/runtime/protocol.py: JSON lines over the daemon's Unix socket).
 *
 *   node sailor.js SPEC_JSON          start as the step described by SPEC (stdout = step log)
 *   node sailor.js --pool POOL_JSON   start idle: connect, say hello, wait for {"t": "spec"};
 *                                     then write console output to the step log named there
 *
 * The contract honoured is the one of the integration platform's Node.js runtime: the module
 * exports process(msg, cfg, snapshot), called with `this` bound to a context (an EventEmitter
 * whose emit(event, payload) returns a promise) that has logger, getFlowVariables(),
 * getConfig() and getApiClient(); optional init(cfg), startup(cfg), shutdown(cfg, data).
 * cfg is a deep copy for every call. A "service" spec (protocol.py) answers "method" requests:
 * getMetaModel(cfg), select model methods and a verifier's verifyCredentials(cfg, cb), as the
 * platform's service.js calls them; emit('updateKeys', keys) goes to the daemon, which keeps
 * the keys of the step's credential. The step's environment (ELASTICIO_*, the flow file's
 * env) is set from its spec before the component is loaded.
 * require('elasticio-node') resolves to the helper shipped next to this file when the
 * component does not install that package itself. No npm dependency of its own.
 * When the daemon goes away (socket closed) the process exits: no orphans.
 */

const fs = require('fs');
const net = require('net');
const path = require('path');
const Module = require('module');
const crypto = require('crypto');
const util = require('util');
const { EventEmitter } = require('events');
const { pathToFileURL } = require('url');

const SHIM_DIR = path.join(__dirname, '..', 'toolchains', 'node_shim');
const SHIMMED = 'elasticio-node';

// -- require('elasticio-node') without installing it -------------------------------------------
const originalResolve = Module._resolveFilename;
Module._resolveFilename = function resolveWithShim(request, parent, isMain, options) {
  try {
    return originalResolve.call(this, request, parent, isMain, options);
  } catch (err) {
    if (err && err.code === 'MODULE_NOT_FOUND' &&
        (request === SHIMMED || request.startsWith(SHIMMED + '/'))) {
      return originalResolve.call(this, path.join(SHIM_DIR, request), parent, isMain, options);
    }
    throw err;
  }
};

// -- console output: the step log, never the protocol ------------------------------------------
function redirectOutput(logPath) {
  // A pooled sailor was started before its step was known: from now on everything written
  // through process.stdout/stderr (console.*, the logger) goes to the step's log file.
  const fd = fs.openSync(logPath, 'a', 0o640);
  const write = function (chunk, encoding, cb) {
    if (typeof encoding === 'function') {
      cb = encoding;
      encoding = undefined;
    }
    try {
      fs.writeSync(fd, typeof chunk === 'string' ? Buffer.from(chunk, encoding || 'utf8') : chunk);
    } catch (_err) {
      // a full disk must not take the step down
    }
    if (typeof cb === 'function') cb();
    return true;
  };
  process.stdout.write = write;
  process.stderr.write = write;
}

function describe(err) {
  if (err instanceof Error) return err.stack || `${err.name}: ${err.message}`;
  if (typeof err === 'string') return err;
  try {
    return JSON.stringify(err);
  } catch (_e) {
    return String(err);
  }
}

function shortError(err) {
  if (err instanceof Error) return `${err.name}: ${err.message}`;
  return describe(err);
}

// An error event: its first line, and (for an Error) the whole stack for the dead letter.
function errorEvent(err, prefix = '') {
  const obj = { t: 'error', error: prefix + shortError(err) };
  if (err instanceof Error && err.stack) obj.stack = prefix + err.stack;
  return obj;
}

// The component logger: printf-style like the platform's (util.format: '%s', '%d', '%j',
// objects inspected), an Error first with its stack; child(fields) adds fields to its lines.
function makeLogger(step, fields = {}) {
  const suffix = Object.keys(fields).length ? ` ${JSON.stringify(fields)}` : '';
  const out = (level) => (...args) => {
    if (args.length && args[0] instanceof Error) args[0] = describe(args[0]);
    const text = util.format(...args);
    process.stderr.write(`${new Date().toISOString()} ${level} step.${step}: ${text}${suffix}\n`);
  };
  return {
    trace: out('TRACE'),
    debug: out('DEBUG'),
    info: out('INFO'),
    warn: out('WARNING'),
    error: out('ERROR'),
    fatal: out('CRITICAL'),
    child: (more) => makeLogger(step, { ...fields, ...(isPlainObject(more) ? more : {}) }),
  };
}

// A deep copy of the step config for each call, as the platform's sailor makes (cloneDeep):
// what a call changes in its cfg is not seen by the next.
function copyConfig(cfg) {
  return structuredClone(cfg);
}

// `this` of process() and the hooks: the platform's TaskExec. emit() does what the event
// means (data, snapshot, end, …), then runs the component's own listeners of that event
// (this.on/once), in order; it returns a promise resolved when they have run.
class StepContext extends EventEmitter {
  constructor(sailor, owner) {
    super();
    this._sailor = sailor;
    this._owner = owner;
    this.flow = sailor.spec.flow;
    this.step = sailor.spec.step;
    this.logger = sailor.logger;
    this.emit = this.emit.bind(this); // components pass this.emit around unbound
  }

  emit(event, ...args) {
    this._sailor.emit(this._owner, event, args[0]); // a misuse throws here, at the call
    const listeners = this.rawListeners(event);
    if (!listeners.length) return Promise.resolve(true);
    return (async () => {
      for (const fn of listeners) await fn.apply(this, args);
      return true;
    })();
  }

  getFlowVariables() {
    return { ...this._sailor.variables };
  }

  getConfig() {
    return this._sailor.settings;
  }

  getApiClient() {
    throw new Error(
      "getApiClient() is not available on deployd: steps get no credentials for deployd's " +
      'API (its url is ELASTICIO_API_URI); use the step config (cfg) and this.getFlowVariables()',
    );
  }
}

function isPlainObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

// getConfig(): the platform's settings, read from the ELASTICIO_* environment (names without
// the prefix: FLOW_ID, STEP_ID, FUNCTION, API_URI, …).
function settingsFrom(env) {
  const out = {};
  for (const [key, value] of Object.entries(env)) {
    if (key.startsWith('ELASTICIO_')) out[key.slice('ELASTICIO_'.length)] = value;
  }
  return out;
}

class Sailor {
  constructor(sock) {
    this.sock = sock;
    this.spec = null;
    this.variables = {}; // the flow's variables (getFlowVariables)
    this.settings = {}; // ELASTICIO_* without the prefix (getConfig)
    this.logger = null;
    this.module = null;
    this.current = null; // the call/message being handled: {ref, finish}
    this.late = []; // events emitted while no call/message was running
    this.chain = Promise.resolve();
    this.buffer = '';
    this.onSpec = null;
    this.snapshot = {}; // the step snapshot as the daemon has it (protocol.py)
    this.out = []; // lines not written yet: one write per turn of the event loop
    this.flushing = false;
    this.outSince = 0;
  }

  // Lines go out once per turn of the event loop, or at once when the oldest waiting line is
  // 2 ms old (a slow step's results must not wait for the messages handed to it ahead).
  send(obj) {
    if (!this.out.length) this.outSince = Date.now();
    this.out.push(JSON.stringify(obj) + '\n');
    if (Date.now() - this.outSince >= 2) {
      this.flush();
    } else if (!this.flushing) {
      this.flushing = true;
      setImmediate(() => {
        this.flushing = false;
        this.flush();
      });
    }
  }

  flush() {
    if (this.out.length) this.sock.write(this.out.splice(0).join(''));
  }

  // An event of a context. Emitted while its own call runs it belongs to that call; emitted
  // later (a listener, a timer) it is kept and sent with the next call, so a long-lived
  // listener's data is not lost (and an unguarded listener per call shows up as duplicates).
  event(_owner, obj) {
    if (this.current !== null) this.send(obj);
    else this.late.push(obj);
  }

  get config() {
    return (this.spec && this.spec.config) || {};
  }

  context(owner) {
    return new StepContext(this, owner);
  }

  dataEvent(payload) {
    let body = payload;
    let headers = {};
    let attachments = null;
    if (isPlainObject(payload) && isPlainObject(payload.body)) {
      body = payload.body;
      headers = isPlainObject(payload.headers) ? payload.headers : {};
      // {name: {url, size, "content-type"}}, as the platform's messages carry them
      if (isPlainObject(payload.attachments) && Object.keys(payload.attachments).length) {
        attachments = payload.attachments;
      }
    }
    if (!isPlainObject(body)) body = { value: body === undefined ? null : body };
    // headers first, attachments (when any) before the body: see sailor_py.py
    if (attachments) return { t: 'data', headers, attachments, body };
    return { t: 'data', headers, body };
  }

  emit(owner, event, payload) {
    switch (event) {
      case 'data':
        this.event(owner, this.dataEvent(payload));
        break;
      case 'snapshot':
      case 'updateSnapshot':
        if (!isPlainObject(payload)) {
          throw new TypeError(`this.emit('${event}', …) needs an object`);
        }
        this.snapshot = event === 'snapshot' ? { ...payload } : { ...this.snapshot, ...payload };
        this.event(owner, { t: event, data: payload });
        break;
      case 'error':
        process.stderr.write(`emitted error: ${describe(payload)}\n`);
        this.event(owner, errorEvent(payload));
        break;
      case 'rebound':
        this.event(owner, { t: 'rebound', error: shortError(payload || 'rebound') });
        if (owner.finish) owner.finish();
        break;
      case 'end':
        if (owner.finish) owner.finish();
        break;
      case 'updateKeys':
        // Refreshed keys of the step's credential: the daemon stores them (encrypted) and
        // merges them into cfg at the next start of every step using it (the platform PUTs
        // them to the account, which its steps read at their start). Sent at once, whenever
        // emitted (an OAuth refresh on a timer too); never logged here.
        if (!isPlainObject(payload)) {
          throw new TypeError("this.emit('updateKeys', …) needs an object of the credential's fields");
        }
        this.send({ t: 'updateKeys', data: payload });
        break;
      case 'httpReply':
        // {statusCode, body, headers}: answers the sync HTTP request this flow execution came
        // from (builtin = "http", reply = "sync"), as the platform's sailor sends it to the
        // message's reply_to; the first reply wins.
        if (!isPlainObject(payload)) {
          throw new TypeError("this.emit('httpReply', …) needs an object {statusCode, body, headers}");
        }
        this.event(owner, { t: 'httpReply', data: payload });
        break;
      default:
        throw new Error(`unknown event '${event}' (data, error, snapshot, updateSnapshot, end, rebound, updateKeys, httpReply)`);
    }
  }

  async load() {
    // The step's environment, before its code loads (a pooled sailor started without it).
    Object.assign(process.env, this.spec.env || {});
    this.variables = isPlainObject(this.spec.variables) ? this.spec.variables : {};
    this.settings = settingsFrom(process.env);
    this.logger = makeLogger(this.spec.step);
    const root = this.spec.artifact_dir;
    process.chdir(root);
    const file = path.resolve(root, this.spec.main);
    let mod;
    try {
      mod = require(file);
    } catch (err) {
      if (!err || err.code !== 'ERR_REQUIRE_ESM') throw err;
      mod = await import(pathToFileURL(file).href);
    }
    if (mod && typeof mod.process !== 'function' && mod.default && typeof mod.default.process === 'function') {
      mod = mod.default;
    }
    if (this.spec.service) {
      // A one-off process for the platform's service verbs (getMetaModel, select model
      // methods): the module only, no init() and no process() needed, as in its service.js.
      this.module = mod || {};
      return;
    }
    if (!mod || typeof mod.process !== 'function') {
      throw new Error(`${this.spec.main} exports no process() function`);
    }
    this.module = mod;
    if (typeof mod.init === 'function') {
      await mod.init.call(this.context({}), copyConfig(this.config));
    }
  }

  // Run process() once; resolves when the message is finished (end, promise settled, rebound,
  // or the end timeout).
  runProcess(msg, snapshot) {
    return new Promise((resolve) => {
      const owner = { finish: null };
      let finished = false;
      const timeoutMs = Math.max(1, Number(this.spec.end_timeout || 60) * 1000);
      const timer = setTimeout(() => {
        const text = `process() did not emit 'end' within ${timeoutMs / 1000}s; ` +
          'the message was finished anyway (emit end, or return a promise)';
        process.stderr.write(`WARNING ${text}\n`);
        this.send({ t: 'error', error: text });
        finish();
      }, timeoutMs);
      const finish = () => {
        if (finished) return;
        finished = true;
        owner.finish = null;
        clearTimeout(timer);
        resolve();
      };
      owner.finish = finish;
      this.current = owner;
      const ctx = this.context(owner);
      let ret;
      try {
        ret = this.module.process.call(ctx, msg, copyConfig(this.config), snapshot);
      } catch (err) {
        process.stderr.write(`process() threw: ${describe(err)}\n`);
        this.send(errorEvent(err));
        finish();
        return;
      }
      if (ret && typeof ret.then === 'function') {
        ret.then(
          (value) => {
            if (finished) return;
            if (value) this.send(this.dataEvent(value));
            finish();
          },
          (err) => {
            if (finished) return;
            process.stderr.write(`process() rejected: ${describe(err)}\n`);
            this.send(errorEvent(err));
            finish();
          },
        );
      } else if (isPlainObject(ret) && !finished) {
        this.send(this.dataEvent(ret)); // a plain returned object: its data, then end
        finish();
      }
      // returned nothing: the function calls this.emit('end') itself
    });
  }

  // A service verb: the module's method `name` called as the platform's service calls it,
  // with `this` a context (logger, getConfig, …) and (cfg, callback); it may return a value
  // or a promise, or call the callback (err, result).
  callMethod(name, cfg) {
    const mod = this.module;
    let fn = mod[name];
    if (typeof fn !== 'function' && mod.default) fn = mod.default[name];
    if (typeof fn !== 'function') {
      throw new Error(`Method "${name}" is not found in "${this.spec.function}" action or trigger`);
    }
    const ctx = this.context({});
    return new Promise((resolve, reject) => {
      const callback = (err, result) => (err ? reject(err) : resolve(result));
      const result = fn.call(ctx, cfg, callback);
      if (result) resolve(result);
    });
  }

  // verifyCredentials(cfg, callback) of a verifier module (module.exports = function), as
  // the platform's service.js calls it: `this` a context; it may return a promise or call
  // the callback. An answer without `verified` counts as verified; an error (thrown,
  // rejected, or given to the callback) is {verified: false, reason: its message}.
  async verifyCredentials(cfg) {
    const mod = this.module;
    const fn = [mod, mod && mod.default, mod && mod.verifyCredentials, mod && mod.verify]
      .find((f) => typeof f === 'function');
    if (!fn) throw new Error(`${this.spec.main} exports no verifyCredentials function`);
    const ctx = this.context({});
    let result;
    try {
      result = await new Promise((resolve, reject) => {
        const callback = (err, res) => (err ? reject(err) : resolve(res));
        const ret = fn.call(ctx, cfg, callback);
        if (ret) resolve(ret);
      });
    } catch (err) {
      process.stderr.write(`verifyCredentials() failed: ${describe(err)}\n`);
      const reason = err instanceof Error ? err.message : describe(err);
      return { verified: false, reason };
    }
    if (!isPlainObject(result) || !('verified' in result)) return { verified: true };
    return result;
  }

  async hook(name, args) {
    const fn = this.module[name];
    if (typeof fn !== 'function') return null;
    return fn.call(this.context({}), copyConfig(this.config), ...args);
  }

  async handle(cmd) {
    const kind = cmd.t;
    if (kind === 'call' || kind === 'msg') {
      const base = kind === 'msg' ? cmd.msg || {} : {};
      const msg = {
        id: base.id !== undefined ? String(base.id) : crypto.randomUUID(),
        body: isPlainObject(base.body) ? base.body : {},
        headers: isPlainObject(base.headers) ? base.headers : {},
        attachments: isPlainObject(base.attachments) ? base.attachments : {},
        metadata: {},
        // what each earlier step of this flow execution emitted, by step id (protocol.py)
        passthrough: isPlainObject(base.passthrough) ? base.passthrough : {},
      };
      this.current = { finish: null };
      for (const obj of this.late.splice(0)) this.send(obj);
      const began = process.hrtime.bigint();
      try {
        if (isPlainObject(cmd.snapshot)) this.snapshot = cmd.snapshot;
        await this.runProcess(msg, this.snapshot);
      } finally {
        this.current = null;
      }
      const took = Number(process.hrtime.bigint() - began) / 1e9;
      this.send({ t: 'done', ref: cmd.ref, took });
    } else if (kind === 'startup' || kind === 'shutdown') {
      this.current = { finish: null };
      let data = null;
      try {
        const args = kind === 'shutdown' ? [cmd.data === undefined ? null : cmd.data] : [];
        data = await this.hook(kind, args);
        data = data === undefined ? null : JSON.parse(JSON.stringify(data));
      } catch (err) {
        process.stderr.write(`${kind}() failed: ${describe(err)}\n`);
        this.send(errorEvent(err, `${kind}(): `));
        data = null;
      } finally {
        this.current = null;
      }
      this.send({ t: 'result', ref: cmd.ref, data });
    } else if (kind === 'method') {
      this.current = { finish: null };
      let data = null;
      try {
        const cfg = isPlainObject(cmd.cfg) ? cmd.cfg : {};
        data = cmd.name === 'verifyCredentials'
          ? await this.verifyCredentials(cfg)
          : await this.callMethod(String(cmd.name), cfg);
        data = data === undefined ? null : JSON.parse(JSON.stringify(data));
      } catch (err) {
        process.stderr.write(`${cmd.name}() failed: ${describe(err)}\n`);
        this.send(errorEvent(err));
        data = null;
      } finally {
        this.current = null;
      }
      this.send({ t: 'result', ref: cmd.ref, data });
    } else if (kind === 'stop') {
      if (this.late.length) {
        process.stderr.write(`${this.late.length} event(s) emitted after the last call were dropped at stop\n`);
      }
      this.flush();
      this.sock.end(() => process.exit(0));
      setTimeout(() => process.exit(0), 2000).unref();
    }
  }

  onData(chunk) {
    this.buffer += chunk;
    let nl;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + 1);
      if (!line.trim()) continue;
      const cmd = JSON.parse(line);
      if (cmd.t === 'spec' && this.onSpec) {
        const cb = this.onSpec;
        this.onSpec = null;
        cb(cmd.spec);
        continue;
      }
      this.chain = this.chain.then(() => this.handle(cmd)).catch((err) => {
        process.stderr.write(`sailor: ${describe(err)}\n`);
      });
    }
  }

  async start() {
    try {
      await this.load();
    } catch (err) {
      process.stderr.write(`${describe(err)}\n`);
      this.send({ t: 'failed', error: shortError(err) });
      this.flush();
      this.sock.end(() => process.exit(3));
      setTimeout(() => process.exit(3), 2000).unref();
      return;
    }
    this.send({ t: 'ready' });
  }
}

function main(argv) {
  const pooled = argv[0] === '--pool';
  // The spec (with the step's token and config) comes in the environment, which only this
  // user can read, not on the command line, which every user can (`ps`).
  const spec = JSON.parse(process.env.DEPLOYD_SPEC || (pooled ? argv[1] : argv[0]));
  delete process.env.DEPLOYD_SPEC;
  const sock = net.createConnection({ path: spec.socket });
  sock.setEncoding('utf8');
  const sailor = new Sailor(sock);

  process.on('uncaughtException', (err) => {
    // An error thrown by a callback of the component: an error of the current message.
    process.stderr.write(`uncaught exception: ${describe(err)}\n`);
    if (sailor.module) sailor.event(sailor.current, errorEvent(err));
    else process.exit(3);
  });
  process.on('unhandledRejection', (err) => {
    process.stderr.write(`unhandled rejection: ${describe(err)}\n`);
    if (sailor.module) sailor.event(sailor.current, errorEvent(err));
  });

  sock.on('connect', () => {
    sailor.send({ t: 'hello', token: spec.token, pid: process.pid });
    if (pooled) {
      // While idle, load what every step needs anyway, so taking this sailor costs less.
      require(path.join(SHIM_DIR, SHIMMED));
      sailor.onSpec = (stepSpec) => {
        sailor.spec = stepSpec;
        if (stepSpec.log) redirectOutput(stepSpec.log);
        sailor.start();
      };
    } else {
      sailor.spec = spec;
      sailor.start();
    }
  });
  sock.on('data', (chunk) => sailor.onData(chunk));
  // The daemon is gone: exit rather than linger as an orphan.
  sock.on('close', () => process.exit(0));
  sock.on('error', (err) => {
    process.stderr.write(`sailor: connection to the daemon failed: ${err.message}\n`);
    process.exit(2);
  });
}

main(process.argv.slice(2));
