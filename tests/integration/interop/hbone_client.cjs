// An HBONE client written with Node.js's own http2 module (independent of nodeagent and python-h2).
//
// Opens one mTLS 1.3 + ALPN h2 connection to a tunnel's :15008 without SNI, checks that the server's
// certificate carries exactly the expected SPIFFE URI SAN (there is no DNS name to check), sends
// `CONNECT <authority>`, and on a 200 relays `size` random bytes up (then half-closes with END_STREAM)
// while reading everything that comes back until the server's END_STREAM.
//
// Usage: node hbone_client.cjs '<json>' with keys host, port, localAddress, authority, ca, cert, key
// (PEM file paths), expectId, size; optional pauseAt (bytes) and resumeWhen (a file path): after pauseAt
// bytes it prints {"event":"paused"} and sends the rest once that file exists. Prints one JSON line:
// status, sent/received byte counts and SHA-256 digests, the server's URI SAN, the negotiated ALPN, TLS
// version and cipher, and any GOAWAY received ({code, lastStreamID}); or {"error": ...} and exit 1.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const http2 = require('node:http2');

const cfg = JSON.parse(process.argv[2]);
const result = { status: null, sent: 0, sentSha256: '', received: 0, receivedSha256: '' };

function fail(message) {
  process.stdout.write(JSON.stringify({ ...result, error: String(message) }) + '\n');
  process.exit(1);
}

setTimeout(() => fail(`timed out after ${cfg.timeoutMs || 60000} ms`), cfg.timeoutMs || 60000).unref();

function uriSans(cert) {
  return (cert.subjectaltname || '')
    .split(', ')
    .filter((s) => s.startsWith('URI:'))
    .map((s) => s.slice(4));
}

const client = http2.connect(`https://${cfg.host}:${cfg.port}`, {
  ca: fs.readFileSync(cfg.ca),
  cert: fs.readFileSync(cfg.cert),
  key: fs.readFileSync(cfg.key),
  ALPNProtocols: ['h2'],
  minVersion: 'TLSv1.3',
  servername: '', // HBONE sends no SNI
  localAddress: cfg.localAddress,
  // The default check compares host names / IP SANs; an SVID has neither, only its SPIFFE ID.
  checkServerIdentity: (_host, cert) => {
    const uris = uriSans(cert);
    if (uris.length !== 1 || uris[0] !== cfg.expectId) {
      return new Error(`server SPIFFE ID ${JSON.stringify(uris)} is not ${cfg.expectId}`);
    }
    return undefined;
  },
});
client.on('error', (err) => fail(`session: ${err.message}`));
client.on('goaway', (code, lastStreamID) => {
  result.goaway = { code, lastStreamID };
});
client.on('connect', (session, socket) => {
  result.peerId = uriSans(socket.getPeerCertificate()).join(',');
  result.alpn = socket.alpnProtocol;
  result.tlsVersion = socket.getProtocol();
  result.cipher = socket.getCipher().name;
});

const req = client.request({ ':method': 'CONNECT', ':authority': cfg.authority }, { endStream: false });
req.on('error', (err) => fail(`stream: ${err.message}`));

const recvHash = crypto.createHash('sha256');
req.on('response', (headers) => {
  result.status = headers[':status'];
  if (result.status !== 200) {
    req.close();
    client.close(() => {
      process.stdout.write(JSON.stringify(result) + '\n');
      process.exit(0);
    });
    return;
  }
  send();
});
req.on('data', (chunk) => {
  recvHash.update(chunk);
  result.received += chunk.length;
});
function done() {
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(0);
}
req.on('end', () => {
  result.receivedSha256 = recvHash.digest('hex');
  // The server may have closed the session already (it does once a GOAWAY'd connection has no streams
  // left): then close()'s callback never runs.
  if (client.closed || client.destroyed) done();
  else client.close(done);
});

function send() {
  const sendHash = crypto.createHash('sha256');
  let left = cfg.size;
  let paused = cfg.pauseAt === undefined;
  const write = () => {
    while (left > 0) {
      if (!paused && result.sent >= cfg.pauseAt) {
        paused = true;
        process.stdout.write(JSON.stringify({ event: 'paused' }) + '\n');
        const poll = setInterval(() => {
          if (fs.existsSync(cfg.resumeWhen)) {
            clearInterval(poll);
            write();
          }
        }, 10);
        return;
      }
      const chunk = crypto.randomBytes(Math.min(left, 64 * 1024, paused ? left : cfg.pauseAt - result.sent));
      left -= chunk.length;
      sendHash.update(chunk);
      result.sent += chunk.length;
      if (!req.write(chunk)) {
        req.once('drain', write);
        return;
      }
    }
    result.sentSha256 = sendHash.digest('hex');
    req.end(); // half-close: END_STREAM; the reply keeps flowing
  };
  write();
}
