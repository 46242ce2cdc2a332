// Soak: a bounded run of mixed requests (plain, streamed, streams dropped mid-way, bad JSON, wrong key,
// completions) from concurrent clients over loopback. Afterwards the server must still answer, have
// counted every request, and be back within bounds on open file descriptors and resident memory
// (read from /proc/PID), and its cache folder must stay within its size cap.
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";

import { makeModel, processUsage, startServer } from "./harness.mjs";

const TOTAL = Number(process.env.DSV3_SOAK_REQUESTS || 300);
const CLIENTS = 8;
const CACHE_CAP = 2e6;  // bytes: small, so that the disk tier has to evict during the run
let model, server, cacheDir;

before(async () => {
  model = makeModel();
  cacheDir = path.join(model.dir, "cache");
  // An ASan build keeps up to 256 MiB of freed memory in quarantine, which reads as resident-memory
  // growth; a small quarantine keeps the memory check about leaks (no effect on other builds).
  const asan = [process.env.ASAN_OPTIONS, "quarantine_size_mb=16"].filter(Boolean).join(":");
  server = await startServer(model.model, ["--api-key", "sk-soak", "--ctx", "256", "--cache-dir", cacheDir,
                                           "--cache-dir-max-gb", String(CACHE_CAP / 1e9)], { ASAN_OPTIONS: asan });
});
after(async () => {
  if (server) await server.stop();
  if (model) model.remove();
});

const auth = { Authorization: "Bearer sk-soak", "Content-Type": "application/json" };
const post = (p, body, headers = auth, signal = undefined) =>
  fetch(server.url + p, { method: "POST", headers, body: typeof body === "string" ? body : JSON.stringify(body), signal });

// One request of kind i % 6; returns the status it got (0 for a stream the client dropped).
async function one(i) {
  const messages = [{ role: "user", content: `Soak request ${i % 17}: say something.` }];
  switch (i % 6) {
    case 0: {  // long enough to fill prefix-cache blocks, which go to the disk tier
      const long = [{ role: "user", content: `Soak ${i % 23}:` + " and then the river".repeat(40) }];
      const r = await post("/v1/chat/completions", { messages: long, max_tokens: 4, temperature: 0 });
      await r.json();
      return r.status;
    }
    case 1: {
      const r = await post("/v1/chat/completions", { messages, max_tokens: 6, stream: true });
      const text = await r.text();
      assert.ok(text.endsWith("data: [DONE]\n\n"), text.slice(-200));
      return r.status;
    }
    case 2: {  // the client goes away after the first chunk
      const ctl = new AbortController();
      const r = await post("/v1/chat/completions", { messages, max_tokens: 200, stream: true }, auth, ctl.signal);
      const reader = r.body.getReader();
      await reader.read();
      ctl.abort();
      await reader.read().catch(() => {});
      return 0;
    }
    case 3: {
      const r = await post("/v1/chat/completions", "{not json");
      assert.equal((await r.json()).error.type, "invalid_request_error");
      return r.status;
    }
    case 4: {
      const r = await post("/v1/chat/completions", { messages }, { ...auth, Authorization: "Bearer nope" });
      await r.json();
      return r.status;
    }
    default: {
      const r = await post("/v1/completions", { prompt: "soak", max_tokens: 3, stream: true, stream_options: { include_usage: true } });
      await r.text();
      return r.status;
    }
  }
}

async function run(from, to, statuses) {
  let next = from;
  await Promise.all(Array.from({ length: CLIENTS }, async () => {
    while (next < to) {
      const i = next++;
      const s = await one(i);
      statuses[s] = (statuses[s] || 0) + 1;
    }
  }));
}

test(`soak: ${TOTAL} mixed requests leave no leaks`, async () => {
  const statuses = {};
  const warm = Math.min(60, TOTAL / 5);
  await run(0, warm, statuses);
  await new Promise((r) => setTimeout(r, 500));
  const before = processUsage(server.pid);
  await run(warm, TOTAL, statuses);
  // Dropped streams finish their cancellation and their sockets close: under a loaded machine (ASan,
  // parallel tests) that can take a few seconds, so wait for the count to settle; a leak never does.
  let end = processUsage(server.pid);
  for (let waited = 0; end.fds > before.fds + 2 && waited < 20000; waited += 500) {
    await new Promise((r) => setTimeout(r, 500));
    end = processUsage(server.pid);
  }
  console.log(`soak: statuses ${JSON.stringify(statuses)}; fds ${before.fds} -> ${end.fds}; RSS ${before.rss.toFixed(0)} -> ${end.rss.toFixed(0)} MiB`);

  assert.equal((await fetch(server.url + "/health")).status, 200);
  assert.ok(end.fds <= before.fds + 2, `file descriptors grew from ${before.fds} to ${end.fds}`);
  assert.ok(end.rss <= before.rss + 128, `resident memory grew from ${before.rss} to ${end.rss} MiB`);
  assert.equal(statuses[200] + statuses[400] + statuses[401] + statuses[0], TOTAL);
  assert.ok(statuses[400] > 0 && statuses[401] > 0 && statuses[200] > 0);

  // Every request the server saw is counted in /metrics (the dropped streams as 200s).
  const metrics = await (await fetch(server.url + "/metrics")).text();
  let counted = 0;
  for (const m of metrics.matchAll(/^dsv3_requests_total\{endpoint="\/v1\/(?:chat\/)?completions",status="\d+"\} (\d+)$/gm))
    counted += Number(m[1]);
  assert.equal(counted, TOTAL);

  let files = 0, bytes = 0;
  for (const f of fs.readdirSync(cacheDir, { recursive: true })) {
    const st = fs.statSync(path.join(cacheDir, f));
    if (st.isFile()) {
      ++files;
      bytes += st.size;
    }
  }
  console.log(`soak: the cache folder holds ${files} files, ${bytes} bytes (cap ${CACHE_CAP})`);
  assert.ok(files > 0, "the disk tier wrote nothing");
  assert.ok(bytes <= CACHE_CAP, `the cache folder holds ${bytes} bytes, over its cap of ${CACHE_CAP}`);
});
