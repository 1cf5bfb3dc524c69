'use strict';
// usercouch's launcher for PouchDB Server: builds the server from express-pouchdb and closes
// the gaps of the stock `pouchdb-server` bin for a private, per-user couch:
//   * listens on the configured port (0 = any free one) and reports the real port(s) as one
//     JSON line on the ready fd: an event the parent waits for, not a log line to poll;
//   * require_valid_user: anonymous requests get 401 when basic auth is on;
//   * no crash on a non-admin PUT /db (pouchdb-server #374) or on a failed replication;
//   * no CORS, no runtime _config changes, no Fauxton;
//   * PUT/DELETE /db answered only once the database list is written (durable on a kill);
//   * a document's ETag is its revision, as CouchDB's is;
//   * no credentials in the debug log's request headers;
//   * exits at once on SIGTERM/SIGINT, and when the owning process goes away.
//
// Usage: node launcher.js --modules DIR/node_modules --config FILE [--ready-fd N]

const fs = require('fs');
const path = require('path');
const http = require('http');
const https = require('https');
const { createRequire } = require('module');

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || i + 1 >= argv.length) {
      throw new Error('bad arguments: ' + argv.join(' '));
    }
    out[argv[i].slice(2)] = argv[i + 1];
  }
  for (const key of ['modules', 'config']) {
    if (!out[key]) {
      throw new Error('missing --' + key);
    }
  }
  return out;
}

function sendJSON(res, status, body) {
  res.status(status).set('Content-Type', 'application/json').send(JSON.stringify(body) + '\n');
}

// A database path: one segment that does not start with '_' (so not /_session, /_config...).
const DB_PATH = /^\/[^/_][^/]*\/?$/;

function makeGuard(requireValidUser) {
  return function usercouchGuard(req, res, next) {
    const ctx = (req.couchSession && req.couchSession.userCtx) || { name: null, roles: [] };
    const isAdmin = (ctx.roles || []).indexOf('_admin') !== -1;
    if (requireValidUser && !ctx.name && !(req.method === 'POST' && req.path === '/_session')) {
      res.set('WWW-Authenticate', 'Basic realm="usercouch"');
      return sendJSON(res, 401, { error: 'unauthorized', reason: 'Authentication required.' });
    }
    // After the 401 above: who is asking is settled before what is refused (as CouchDB does).
    if (req.method !== 'GET' && req.method !== 'HEAD' && /^\/_config(\/|$)/.test(req.path)) {
      return sendJSON(res, 403, {
        error: 'forbidden',
        reason: 'usercouch: runtime configuration changes are disabled',
      });
    }
    if (req.method === 'PUT' && DB_PATH.test(req.path) && !isAdmin) {
      return sendJSON(res, 401, { error: 'unauthorized', reason: 'You are not a server admin.' });
    }
    if (req.path === '/_up') {
      return sendJSON(res, 200, { status: 'ok' });
    }
    return next();
  };
}

// Put `guard` right after express-pouchdb's session layer (the middleware after
// cookieParser), where req.couchSession is known but no route has run yet. This relies on
// Express 4 internals, which is why package-lock.json pins Express.
function insertAfterSessionLayer(pouchApp, guard) {
  pouchApp.use(guard);
  const stack = pouchApp._router && pouchApp._router.stack;
  const cookie = stack ? stack.findIndex((layer) => layer.name === 'cookieParser') : -1;
  const session = cookie === -1 ? null : stack[cookie + 1];
  if (!session || !String(session.handle).includes('couchSession')) {
    throw new Error('usercouch launcher: express-pouchdb session layer not found');
  }
  stack.splice(cookie + 2, 0, stack.pop());
}

// CouchDB keeps _bulk_docs results in request order; express-pouchdb may not. Restore it.
function reorderBulkDocs(req, res, next) {
  if (req.method !== 'POST' || !/^\/[^/]+\/_bulk_docs$/.test(req.path)) {
    return next();
  }
  const send = res.send.bind(res);
  res.send = function (body) {
    try {
      const docs = req.body && Array.isArray(req.body.docs) ? req.body.docs : null;
      const rows = JSON.parse(typeof body === 'string' ? body : String(body));
      if (docs && Array.isArray(rows) && rows.length === docs.length &&
          docs.every((d) => d && typeof d._id === 'string')) {
        const byId = new Map();
        rows.forEach((row) => {
          const list = byId.get(row.id) || [];
          list.push(row);
          byId.set(row.id, list);
        });
        const ordered = docs.map((d) => (byId.get(d._id) || []).shift());
        if (ordered.every(Boolean)) {
          return send(JSON.stringify(ordered) + '\n');
        }
      }
    } catch (e) {
      // not JSON: leave the body alone
    }
    return send(body);
  };
  return next();
}

// At debug level express-pouchdb logs every request's headers, as CouchDB 1.x did: the Basic
// credentials and session cookies would land in the log. Write them redacted.
const CREDENTIAL_HEADER = /\{'(Authorization|Proxy-Authorization|Cookie)', [^\n]*\}/g;

function redactCredentials(logger) {
  const write = logger._write;
  if (typeof write !== 'function') {
    throw new Error('usercouch launcher: express-pouchdb logger not found');
  }
  logger._write = function (level, message) {
    return write.call(logger, level, String(message).replace(CREDENTIAL_HEADER, "{'$1', <redacted>}"));
  };
}

// A document: /db/id or /db/_design/id (CouchDB tags _local docs with a hash, not a rev).
const DOC_PATH = /^\/[^/]+\/(?:_design\/[^/]+|[^/_][^/]*)$/;

// CouchDB sends a document's revision as its ETag, and clients rely on it (pycouchdb's
// delete(id) takes the rev from HEAD's ETag); express-pouchdb sends a hash of the body.
function revisionETag(req, res, next) {
  if ((req.method !== 'GET' && req.method !== 'HEAD') || !DOC_PATH.test(req.path)) {
    return next();
  }
  const send = res.send.bind(res);
  res.send = function (body) {
    if (res.statusCode === 200 && !res.get('ETag')) {
      try {
        const doc = JSON.parse(Buffer.isBuffer(body) ? body.toString('utf8') : String(body));
        if (doc && typeof doc._rev === 'string') {
          res.set('ETag', '"' + doc._rev + '"');
        }
      } catch (e) {
        // not a JSON document (an attachment, multipart): leave it alone
      }
    }
    return send(body);
  };
  return next();
}

// PouchDB records databases in pouch__all_dbs__ from a queue, after it has answered PUT /db
// or DELETE /db: a server stopped right after a 201 lost the database. Hold the answer until
// that queue has caught up (allDbs() runs behind the pending write), so an acknowledged
// creation or deletion is on disk.
function durableDbChanges(req, res, next) {
  if ((req.method !== 'PUT' && req.method !== 'DELETE') || !DB_PATH.test(req.path)) {
    return next();
  }
  const end = res.end;
  res.end = function (...args) {
    res.end = end;
    const finish = () => end.apply(res, args);
    const allDbs = req.PouchDB && req.PouchDB.allDbs;
    if (typeof allDbs !== 'function') {
      return finish();
    }
    allDbs.call(req.PouchDB).then(finish, finish);
    return res;
  };
  return next();
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const modules = path.resolve(args.modules);
  const requireModule = createRequire(path.join(modules, 'usercouch-launcher.js'));
  const config = JSON.parse(fs.readFileSync(args.config, 'utf8'));
  const options = config.usercouch || {};
  const readyFd = args['ready-fd'] === undefined ? null : parseInt(args['ready-fd'], 10);

  // The replicator's outgoing HTTPS requests go through Node's global agent: trust only the
  // configured CA there, and present the client certificate if one is given.
  if (options.replicator) {
    https.globalAgent.options.ca = fs.readFileSync(options.replicator.ca_file);
    if (options.replicator.cert_file) {
      https.globalAgent.options.cert = fs.readFileSync(options.replicator.cert_file);
      https.globalAgent.options.key = fs.readFileSync(options.replicator.key_file);
    }
  }

  const express = requireModule('express');
  const expressPouchDB = requireModule('express-pouchdb');
  const adapter = options.in_memory ? 'pouchdb-adapter-memory' : 'pouchdb-adapter-leveldb';
  const PouchDB = requireModule('pouchdb-core')
    .plugin(requireModule('pouchdb-adapter-http'))
    .plugin(requireModule('pouchdb-replication'))
    .plugin(requireModule('pouchdb-mapreduce'))
    .plugin(requireModule(adapter));

  const pouchApp = expressPouchDB({
    configPath: args.config,
    logPath: config.log.file,
    mode: 'fullCouchDB',
    overrideMode: { exclude: ['routes/fauxton'] },
  });
  pouchApp.disable('x-powered-by'); // the sub-app sets the header itself
  redactCredentials(pouchApp.couchLogger);
  insertAfterSessionLayer(pouchApp, makeGuard(options.auth === 'basic'));

  const app = express();
  app.disable('x-powered-by');
  app.use(function normalise(req, res, next) {
    // Microfiber-style clients POST to /db/ (trailing slash); express-pouchdb wants /db.
    if (req.method === 'POST' && /^\/[^/_][^/]*\/(\?|$)/.test(req.url)) {
      // express-pouchdb's vhost layer rebuilds req.url from originalUrl: change both.
      req.url = req.url.replace(/^(\/[^/]+)\//, '$1');
      req.originalUrl = req.url;
    }
    return next();
  });
  app.use(reorderBulkDocs);
  app.use(durableDbChanges);
  app.use(revisionETag);
  app.use(pouchApp);

  const dataDir = config.couchdb.database_dir;
  fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  const host = config.httpd.bind_address;
  const port = config.httpd.port;

  const listeners = [{ key: 'port', server: http.createServer(app), port }];
  if (options.ssl) {
    const tls = {
      cert: fs.readFileSync(options.ssl.cert_file),
      key: fs.readFileSync(options.ssl.key_file),
    };
    if (options.ssl.ca_file) {
      tls.ca = fs.readFileSync(options.ssl.ca_file);
    }
    listeners.push({ key: 'https_port', server: https.createServer(tls, app), port: options.ssl.port || 0 });
  }

  function listen(listener) {
    return new Promise((resolve, reject) => {
      listener.server.once('error', reject);
      listener.server.listen(listener.port, host, () => {
        listener.server.removeListener('error', reject);
        resolve(listener.server.address().port);
      });
    });
  }

  return pouchApp.setPouchDB(PouchDB.defaults({ prefix: dataDir + path.sep }))
    .then(() => Promise.all(listeners.map(listen)))
    .then((ports) => {
      const ready = { pid: process.pid, version: requireModule('pouchdb-server/package.json').version };
      listeners.forEach((listener, i) => { ready[listener.key] = ports[i]; });
      pouchApp.couchLogger.info('usercouch launcher ready: ' + JSON.stringify(ready));
      if (readyFd !== null) {
        fs.writeSync(readyFd, JSON.stringify(ready) + '\n');
        fs.closeSync(readyFd);
      }
    });
}

// A failed replication emits an unhandled 'error' that would kill the whole server.
process.on('uncaughtException', (err) => {
  console.error('usercouch launcher: uncaught exception (server kept running):', err);
});
process.on('unhandledRejection', (err) => {
  console.error('usercouch launcher: unhandled rejection (server kept running):', err);
});
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));

// Die with the owner even where the kernel's parent-death signal is not available.
const ownerPid = process.ppid;
setInterval(() => {
  if (process.ppid !== ownerPid) {
    process.exit(0);
  }
}, 500).unref();

try {
  main().catch((err) => {
    console.error('usercouch launcher: start failed:', err && err.stack ? err.stack : err);
    process.exit(1);
  });
} catch (err) {
  console.error('usercouch launcher: start failed:', err && err.stack ? err.stack : err);
  process.exit(1);
}
