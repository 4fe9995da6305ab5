#!/usr/bin/env node
// A Node.js client for lmx, to show that any language with gRPC can use it:
// the project's .proto files are loaded as they are (no generated code).
//
//   1. admission's Status: each device's cap, leased and free bytes;
//   2. a worker: OpenSession, then the server-streaming Generate (tokens are
//      printed as they arrive), then CloseSession.
//
//   node client.js --admission 127.0.0.1:50051 --worker 127.0.0.1:50061 \
//       --prompt "The three primary colors are" --max-tokens 16 [--json]
//
// With --json, stdout holds one JSON line at the end and nothing else:
//   {"devices": [...], "session": {...}, "text": "...", "token_ids": [...],
//    "num_tokens": N, "finish": {...}}
// int64 fields (bytes) are strings, as in the proto3 JSON mapping.
//
// Exit codes: 0 done; 1 a call failed (the message names the RPC and its gRPC
// status code, e.g. UNAVAILABLE); 2 bad command line.

'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');

let grpc;
let protoLoader;
try {
  grpc = require('@grpc/grpc-js');
  protoLoader = require('@grpc/proto-loader');
} catch (error) {
  if (error.code !== 'MODULE_NOT_FOUND') throw error;
  process.stderr.write(`client.js: ${error.message.split('\n')[0]}: run \`npm ci\` in ${__dirname} first\n`);
  process.exit(1);
}

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILES = ['lmx/v1/admission.proto', 'lmx/v1/worker.proto'];
const UNARY_TIMEOUT_MS = 10_000;
const GENERATE_TIMEOUT_MS = 120_000;

const USAGE = `usage: node client.js [--admission HOST:PORT] [--worker HOST:PORT]
                      [--prompt TEXT] [--max-tokens N] [--model NAME] [--json]

  --admission   admission service (default 127.0.0.1:50051)
  --worker      worker service (default 127.0.0.1:50061)
  --prompt      raw text to open the session's context with
  --max-tokens  tokens to generate at most, greedy (default 16)
  --model       the model the worker must serve (refused otherwise); optional
  --json        print one JSON summary line at the end instead of text`;

class UsageError extends Error {}

// A failed call: which RPC, and the gRPC error (code, details).
class CallError extends Error {
  constructor(rpc, address, error) {
    super(error.details || error.message);
    this.rpc = rpc;
    this.address = address;
    this.code = error.code;
  }
}

const STATUS_NAMES = Object.fromEntries(
  Object.entries(grpc.status).map(([name, code]) => [code, name]));

function parseCommandLine(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        admission: { type: 'string', default: '127.0.0.1:50051' },
        worker: { type: 'string', default: '127.0.0.1:50061' },
        prompt: { type: 'string', default: 'The three primary colors are' },
        'max-tokens': { type: 'string', default: '16' },
        model: { type: 'string', default: '' },
        json: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (error) {
    throw new UsageError(error.message);
  }
  const maxTokens = Number(values['max-tokens']);
  if (!Number.isInteger(maxTokens) || maxTokens <= 0) {
    throw new UsageError(`--max-tokens must be a positive integer, not ${values['max-tokens']}`);
  }
  return { ...values, maxTokens };
}

function loadLmx() {
  const definition = protoLoader.loadSync(PROTO_FILES, {
    includeDirs: [PROTO_ROOT], // imports resolve package-absolute, like `protoc -I protos`
    keepCase: true,            // field names as in the .proto: cap_bytes, session_id
    longs: String,             // int64/uint64 as decimal strings, never rounded
    enums: String,             // enum values by name: FINISH_REASON_LENGTH
    defaults: true,            // unset fields read as their zero values
    oneofs: true,              // a oneof's field name in `kind` / `input`
  });
  return grpc.loadPackageDefinition(definition).lmx.v1;
}

function deadline(ms) {
  return new Date(Date.now() + ms);
}

// A unary call as a promise; a failure becomes a CallError naming the RPC.
function unary(client, address, rpc, request) {
  return new Promise((resolve, reject) => {
    client[rpc](request, { deadline: deadline(UNARY_TIMEOUT_MS) }, (error, response) => {
      if (error) reject(new CallError(rpc, address, error));
      else resolve(response);
    });
  });
}

// 4294967296 -> '4.00 GiB' (services/common/units.py's format_bytes).
function formatBytes(text) {
  const num = Number(text);
  const sign = num < 0 ? '-' : '';
  let value = Math.abs(num);
  for (const unit of ['B', 'KiB', 'MiB', 'GiB', 'TiB']) {
    if (value < 1024 || unit === 'TiB') {
      return unit === 'B' ? `${sign}${value.toFixed(0)} ${unit}` : `${sign}${value.toFixed(2)} ${unit}`;
    }
    value /= 1024;
  }
  throw new Error('unreachable');
}

function deviceTable(devices) {
  const rows = [['device', 'name', 'cap', 'leased', 'free', 'leases', 'waiting']];
  for (const d of devices) {
    rows.push([d.device, d.name, formatBytes(d.cap_bytes), formatBytes(d.leased_bytes),
      formatBytes(d.free_bytes), String(d.num_leases), String(d.num_waiting)]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
  return rows.map((row) => row.map((cell, i) => (i < 2 ? cell.padEnd(widths[i])
    : cell.padStart(widths[i]))).join('  ').trimEnd()).join('\n');
}

async function admissionDevices(lmx, address) {
  const client = new lmx.AdmissionService(address, grpc.credentials.createInsecure());
  try {
    const status = await unary(client, address, 'Status', {});
    return status.devices.map((d) => ({
      device: d.device, name: d.name, total_bytes: d.total_bytes, cap_bytes: d.cap_bytes,
      foreign_bytes: d.foreign_bytes, budget_bytes: d.budget_bytes,
      leased_bytes: d.leased_bytes, free_bytes: d.free_bytes,
      num_leases: d.num_leases, num_waiting: d.num_waiting,
    }));
  } finally {
    client.close();
  }
}

// Reads Generate's stream: each delta is handed to onDelta as it arrives.
async function generate(client, address, request, onDelta) {
  const call = client.Generate(request, { deadline: deadline(GENERATE_TIMEOUT_MS) });
  const stopOnInterrupt = () => call.cancel(); // the session keeps what it received
  process.once('SIGINT', stopOnInterrupt);
  const tokenIds = [];
  const pieces = [];
  let finish = null;
  try {
    for await (const response of call) {
      if (response.kind === 'delta') {
        tokenIds.push(...response.delta.token_ids);
        pieces.push(response.delta.text);
        onDelta(response.delta);
      } else if (response.kind === 'finish') {
        finish = response.finish;
      }
    }
  } catch (error) {
    throw new CallError('Generate', address, error);
  } finally {
    process.removeListener('SIGINT', stopOnInterrupt);
  }
  return { text: pieces.join(''), token_ids: tokenIds, num_tokens: tokenIds.length, finish };
}

async function runSession(lmx, address, options, onDelta) {
  const client = new lmx.WorkerService(address, grpc.credentials.createInsecure());
  try {
    const opened = await unary(client, address, 'OpenSession', { model: options.model });
    const session = { session_id: opened.session_id, token: opened.token };
    try {
      const result = await generate(client, address, {
        ...session,
        prompt: options.prompt,
        sampling: { max_tokens: options.maxTokens }, // temperature 0: greedy
      }, onDelta);
      return {
        session: { session_id: opened.session_id, model: opened.model,
          max_context: opened.max_context },
        ...result,
      };
    } finally {
      await unary(client, address, 'CloseSession', session).catch((error) => {
        process.stderr.write(`warning: ${describe(error)}\n`);
      });
    }
  } finally {
    client.close();
  }
}

function describe(error) {
  if (error instanceof CallError) {
    const name = STATUS_NAMES[error.code] ?? 'UNKNOWN';
    return `${error.rpc} at ${error.address} failed: ${name} (gRPC status ${error.code}): ` +
      error.message;
  }
  return error.stack || String(error);
}

async function main(argv) {
  const options = parseCommandLine(argv);
  if (options.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const lmx = loadLmx();
  const say = options.json ? () => {} : (text) => process.stdout.write(text);

  const devices = await admissionDevices(lmx, options.admission);
  say(`admission ${options.admission}\n${deviceTable(devices)}\n\n`);

  say(`worker ${options.worker}: ${options.prompt}`);
  const result = await runSession(lmx, options.worker, options, (delta) => say(delta.text));
  const finish = result.finish || {};
  say(`\n\n${result.num_tokens} tokens from ${result.session.model} ` +
    `(${finish.reason || 'no finish'}; context ${finish.context_tokens ?? '?'} tokens)\n`);

  if (options.json) {
    process.stdout.write(`${JSON.stringify({ devices, ...result })}\n`);
  }
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (error) => {
    if (error instanceof UsageError) {
      process.stderr.write(`client.js: ${error.message}\n${USAGE}\n`);
      process.exitCode = 2;
    } else {
      process.stderr.write(`client.js: ${describe(error)}\n`);
      process.exitCode = 1;
    }
  });
