// A broadcast server as Node users write it with the `ws` package:
// GET /ws?channel=C subscribes a WebSocket, POST /publish/C sends the body
// as one text message to every subscriber of C. Messages are the payload
// alone (loadgen --format raw).
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 18403);
const channels = new Map();

const server = http.createServer((req, res) => {
  if (req.method === 'POST' && req.url.startsWith('/publish/')) {
    const channel = decodeURIComponent(req.url.slice('/publish/'.length));
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8');
      const subs = channels.get(channel);
      if (subs) {
        for (const ws of subs) {
          if (ws.readyState === 1) ws.send(body);
        }
      }
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ channel }));
    });
    return;
  }
  res.statusCode = 404;
  res.end();
});

// DEFLATE=1: permessage-deflate as ws offers it, tuned as Herald is
// (level 1, no server context takeover, 128-byte threshold). ws compresses
// each send for its socket: one deflate per delivery.
const perMessageDeflate = process.env.DEFLATE === '1'
  ? { threshold: 128, serverNoContextTakeover: true, zlibDeflateOptions: { level: 1 } }
  : false;
const wss = new WebSocketServer({ server, perMessageDeflate });
wss.on('connection', (ws, req) => {
  const channel = new URL(req.url, 'http://x').searchParams.get('channel') || '';
  let subs = channels.get(channel);
  if (!subs) {
    subs = new Set();
    channels.set(channel, subs);
  }
  subs.add(ws);
  ws.on('close', () => {
    subs.delete(ws);
    if (subs.size === 0) channels.delete(channel);
  });
  ws.on('error', () => {});
});

server.listen(port, '127.0.0.1', () => console.error(`node ws broadcast on 127.0.0.1:${port}`));
