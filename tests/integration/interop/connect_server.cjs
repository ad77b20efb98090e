// An HTTP/2 CONNECT server written with Node.js's own http2 module: the far end of an HBONE tunnel
// that is not nodeagent.
//
// mTLS 1.3 with ALPN h2, a client certificate required and verified against the mesh root(s)
// (requestCert + rejectUnauthorized). For each CONNECT it records the client's SPIFFE URI SAN, opens TCP
// to the requested :authority, answers 200 once that connect succeeded (503 if it failed, 400 for any
// other method or a bad authority) and pipes bytes both ways; END_STREAM and FIN map onto each other.
//
// Usage: node connect_server.cjs '<json>' with keys host, port, ca, cert, key (PEM file paths).
// Prints JSON lines: {"event":"listening","port":N} once, {"event":"session"} per HTTP/2 connection, then
// per stream {"event":"connect",...} and {"event":"closed","up":N,"down":N}. A line `goaway` on stdin
// closes every session gracefully (http2session.close(): GOAWAY, open streams run to their end, no new
// ones) and prints {"event":"goaway","sessions":N}.
'use strict';

const fs = require('node:fs');
const http2 = require('node:http2');
const net = require('node:net');

const cfg = JSON.parse(process.argv[2]);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

function uriSans(cert) {
  return (cert.subjectaltname || '')
    .split(', ')
    .filter((s) => s.startsWith('URI:'))
    .map((s) => s.slice(4));
}

const server = http2.createSecureServer({
  ca: fs.readFileSync(cfg.ca),
  cert: fs.readFileSync(cfg.cert),
  key: fs.readFileSync(cfg.key),
  requestCert: true,
  rejectUnauthorized: true,
  ALPNProtocols: ['h2'],
  minVersion: 'TLSv1.3',
  allowHTTP1: false,
});

const sessions = new Set();
server.on('session', (session) => {
  sessions.add(session);
  session.on('close', () => sessions.delete(session));
  emit({ event: 'session' });
});

process.stdin.setEncoding('utf8');
let commands = '';
process.stdin.on('data', (chunk) => {
  commands += chunk;
  let nl;
  while ((nl = commands.indexOf('\n')) >= 0) {
    const command = commands.slice(0, nl).trim();
    commands = commands.slice(nl + 1);
    if (command === 'goaway') {
      for (const session of sessions) session.close();
      emit({ event: 'goaway', sessions: sessions.size });
    }
  }
});

server.on('tlsClientError', (err) => emit({ event: 'tlsClientError', error: err.message }));
server.on('sessionError', (err) => emit({ event: 'sessionError', error: err.message }));

server.on('stream', (stream, headers) => {
  const socket = stream.session.socket;
  const info = {
    event: 'connect',
    method: headers[':method'],
    authority: headers[':authority'],
    path: headers[':path'] === undefined ? null : headers[':path'],
    forwarded: headers.forwarded === undefined ? null : headers.forwarded,
    clientId: uriSans(socket.getPeerCertificate()).join(','),
    authorized: socket.authorized,
    alpn: socket.alpnProtocol,
    tlsVersion: socket.getProtocol(),
  };
  emit(info);
  if (headers[':method'] !== 'CONNECT') {
    stream.respond({ ':status': 400 }, { endStream: true });
    return;
  }
  const match = /^(.+):(\d+)$/.exec(headers[':authority'] || '');
  if (!match) {
    stream.respond({ ':status': 400 }, { endStream: true });
    return;
  }
  const host = match[1].replace(/^\[|\]$/g, '');
  let up = 0;
  let down = 0;
  let answered = false;
  const upstream = net.connect({ host, port: Number(match[2]) });
  upstream.on('connect', () => {
    answered = true;
    stream.respond({ ':status': 200 });
    stream.on('data', (chunk) => (up += chunk.length));
    upstream.on('data', (chunk) => (down += chunk.length));
    stream.pipe(upstream); // the client's END_STREAM ends (FIN) the upstream
    upstream.pipe(stream); // the upstream's FIN ends the stream (END_STREAM)
  });
  upstream.on('error', (err) => {
    if (!answered) {
      stream.respond({ ':status': 503 }, { endStream: true });
    } else {
      stream.close(http2.constants.NGHTTP2_CONNECT_ERROR);
    }
    emit({ event: 'upstreamError', error: err.message });
  });
  stream.on('error', () => upstream.destroy());
  stream.on('close', () => {
    emit({ event: 'closed', up, down, rstCode: stream.rstCode });
    // A clean close already ended the upstream through pipe() (which flushes first); a reset did not.
    if (stream.rstCode !== http2.constants.NGHTTP2_NO_ERROR) upstream.destroy();
  });
});

server.listen(cfg.port, cfg.host, () => emit({ event: 'listening', port: server.address().port }));
process.on('SIGTERM', () => process.exit(0));
