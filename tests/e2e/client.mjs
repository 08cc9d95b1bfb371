// Runs one phoenix.js Socket, driven by JSON-lines commands on stdin, reporting
// JSON-lines events on stdout. Used by the end-to-end tests (tests/support/node_client.py).
//
// Every command is an object with "cmd" and an optional "id"; every event is an
// object with "type" and, when it answers a command, that command's "id". Each
// command is answered at once by an "ack" (with any immediate result) or a
// "command_error"; what phoenix.js reports later arrives as further events.
// Binary payloads cross the pipe as {"__binary__": "<base64>"} in both directions,
// and become/come from ArrayBuffers on the phoenix.js side.

import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { LongPoll, Presence, Socket } from "phoenix";
import WebSocket from "ws";

const BINARY_KEY = "__binary__";

function emit(event) {
  process.stdout.write(JSON.stringify(event, (_key, value) => toWire(value)) + "\n");
}

function toWire(value) {
  if (value instanceof ArrayBuffer) {
    return { [BINARY_KEY]: Buffer.from(value).toString("base64") };
  }
  return value;
}

function fromWire(value) {
  if (Array.isArray(value)) return value.map(fromWire);
  if (value === null || typeof value !== "object") return value;
  if (Object.keys(value).length === 1 && typeof value[BINARY_KEY] === "string") {
    const bytes = Buffer.from(value[BINARY_KEY], "base64");
    // A fresh ArrayBuffer: phoenix.js only goes binary when payload.constructor === ArrayBuffer.
    return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  }
  return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, fromWire(v)]));
}

// phoenix.js ships only the V2 serializer; V1 frames are plain objects and never binary.
const v1Serializer = {
  encode(msg, callback) {
    const { topic, event, payload, ref, join_ref } = msg;
    callback(JSON.stringify({ topic, event, payload, ref, join_ref }));
  },
  decode(raw, callback) {
    if (typeof raw !== "string") {
      emit({ type: "decode_error", message: "binary frame on a vsn 1.0.0 socket", data: raw });
      return;
    }
    const { topic, event, payload, ref, join_ref = null } = JSON.parse(raw);
    callback({ topic, event, payload, ref, join_ref });
  },
};

// A backoff list as phoenix.js wants it: a function of the try number, last value repeated.
function backoff(list) {
  return (tries) => list[Math.min(tries, list.length) - 1];
}

// The `ws` WebSocket, trusting an extra CA (caFile) and sending an Origin header as a
// browser page would (origin); plain `ws` sends no Origin.
function webSocketTransport(caFile, origin) {
  if (!caFile && !origin) return WebSocket;
  const options = {};
  if (caFile) options.ca = readFileSync(caFile);
  if (origin) options.origin = origin;
  return class TrustingWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols, options);
    }
  };
}

let socket = null;
const channels = new Map(); // topic -> the latest phoenix.js Channel for it

function requireSocket() {
  if (!socket) throw new Error("no socket: send a connect command first");
  return socket;
}

function requireChannel(topic) {
  const channel = channels.get(topic);
  if (!channel) throw new Error(`no channel for topic ${JSON.stringify(topic)}: join it first`);
  return channel;
}

function reportPush(push, id, type, extra) {
  for (const status of ["ok", "error", "timeout"]) {
    push.receive(status, (response) => emit({ type, id, ...extra, ref: push.ref, status, response }));
  }
}

const commands = {
  connect(cmd) {
    if (socket) throw new Error("already connected: send disconnect first");
    const opts = { params: cmd.params || {} };
    if (cmd.vsn === "1.0.0") {
      opts.vsn = "1.0.0";
      opts.encode = v1Serializer.encode;
      opts.decode = v1Serializer.decode;
    } else if (cmd.vsn && cmd.vsn !== "2.0.0") {
      throw new Error(`unsupported vsn ${JSON.stringify(cmd.vsn)}: use "2.0.0" or "1.0.0"`);
    }
    if (cmd.transport === "longpoll") opts.transport = LongPoll;
    else if (!cmd.transport || cmd.transport === "websocket") opts.transport = webSocketTransport(cmd.caFile, cmd.origin);
    else throw new Error(`unknown transport ${JSON.stringify(cmd.transport)}`);
    for (const key of ["authToken", "longPollFallbackMs", "heartbeatIntervalMs", "timeout", "longpollerTimeout"]) {
      if (cmd[key] !== undefined) opts[key] = cmd[key];
    }
    if (cmd.reconnectAfterMs) opts.reconnectAfterMs = backoff(cmd.reconnectAfterMs);
    if (cmd.rejoinAfterMs) opts.rejoinAfterMs = backoff(cmd.rejoinAfterMs);

    socket = new Socket(cmd.endpoint, opts);
    socket.onOpen(() => emit({ type: "open", transport: socket.transportName(socket.transport) }));
    socket.onClose((event) =>
      emit({ type: "close", code: event.code, reason: event.reason, wasClean: event.wasClean }),
    );
    socket.onError((error) => emit({ type: "error", message: describeError(error) }));
    socket.onMessage((msg) => emit({ type: "message", ...msg }));
    socket.connect();
  },

  disconnect(cmd) {
    const current = requireSocket();
    socket = null;
    channels.clear();
    current.disconnect(() => emit({ type: "disconnected", id: cmd.id }), cmd.code, cmd.reason);
  },

  join(cmd) {
    const channel = requireSocket().channel(cmd.topic, cmd.params || {});
    channels.set(cmd.topic, channel);
    const topic = cmd.topic;
    channel.onError((reason) => emit({ type: "channel_error", topic, reason }));
    channel.onClose(() => emit({ type: "channel_close", topic }));
    const presence = new Presence(channel);
    presence.onSync(() => emit({ type: "presence", topic, state: presence.state }));
    reportPush(channel.join(cmd.timeout), cmd.id, "join", { topic });
  },

  on(cmd) {
    const { topic, event } = cmd;
    requireChannel(topic).on(event, (payload, ref, join_ref) =>
      emit({ type: "channel_event", topic, event, payload, ref, join_ref }),
    );
  },

  push(cmd) {
    const payload = fromWire(cmd.payload ?? {});
    const push = requireChannel(cmd.topic).push(cmd.event, payload, cmd.timeout);
    reportPush(push, cmd.id, "reply", { topic: cmd.topic, event: cmd.event });
  },

  // Socket.push bypasses the channel, so a message can reach the server for a topic
  // the client never joined or already left (phoenix.js channels refuse to send those).
  raw_push(cmd) {
    const current = requireSocket();
    const ref = current.makeRef();
    const payload = fromWire(cmd.payload ?? {});
    current.push({ topic: cmd.topic, event: cmd.event, payload, ref, join_ref: cmd.join_ref ?? null });
    return { ref };
  },

  // phoenix.js resolves a leave "ok" locally at once; the server's own reply shows up
  // as a "message" event carrying the ref reported here.
  leave(cmd) {
    reportPush(requireChannel(cmd.topic).leave(cmd.timeout), cmd.id, "leave", { topic: cmd.topic });
  },

  ping(cmd) {
    const sent = requireSocket().ping((rtt) => emit({ type: "pong", id: cmd.id, rtt }));
    if (!sent) throw new Error("ping not sent: the socket is not connected");
  },

  state() {
    const current = requireSocket();
    return {
      connection: current.connectionState(),
      channels: [...channels.values()].map((c) => ({ topic: c.topic, state: c.state, joinRef: c.joinRef() })),
    };
  },

  exit() {
    if (!socket) process.exit(0);
    // Let the close frame go out before leaving.
    socket.disconnect(() => process.exit(0));
  },
};

function describeError(error) {
  if (error && typeof error === "object") return error.message || error.type || String(error);
  return String(error);
}

function handleLine(line) {
  if (!line.trim()) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (err) {
    emit({ type: "command_error", message: `unreadable command line: ${err.message}` });
    return;
  }
  const run = commands[cmd.cmd];
  try {
    if (!run) throw new Error(`unknown command ${JSON.stringify(cmd.cmd)}`);
    const result = run(cmd);
    emit({ type: "ack", id: cmd.id, cmd: cmd.cmd, ...result });
  } catch (err) {
    emit({ type: "command_error", id: cmd.id, cmd: cmd.cmd, message: err.message });
  }
}

// A throw inside a phoenix.js callback (say, an undecodable frame) is reported, not fatal.
process.on("uncaughtException", (err) => emit({ type: "exception", message: err.stack || String(err) }));

createInterface({ input: process.stdin }).on("line", handleLine).on("close", () => commands.exit());
const phoenixPackage = new URL("./node_modules/phoenix/package.json", import.meta.url);
emit({ type: "ready", phoenix: JSON.parse(readFileSync(phoenixPackage, "utf8")).version });
