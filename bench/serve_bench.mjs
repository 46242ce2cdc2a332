#!/usr/bin/env node
// Serving benchmark: N concurrent clients send M streamed /v1/completions requests in total to a running
// `dsv3 serve` (or any OpenAI-compatible server) and it prints throughput, time to first token (TTFT)
// and time per output token after the first (TPOT) at p50/p99. Needs only Node (>= 18, for fetch).
//
//   node bench/serve_bench.mjs --url http://127.0.0.1:8080 --clients 4 --requests 32 --prompt-tokens 128 --max-tokens 64
//
// Prompts are distinct from the first word on, so the prefix cache does not shorten them; the table
// reports the prompt length the server counted (usage.prompt_tokens).
import { parseArgs } from "node:util";

const { values: a } = parseArgs({
  options: {
    url: { type: "string", default: "http://127.0.0.1:8080" },
    clients: { type: "string", default: "4" },
    requests: { type: "string", default: "32" },
    "prompt-tokens": { type: "string", default: "128" },
    "max-tokens": { type: "string", default: "64" },
    "api-key": { type: "string", default: "" },
    help: { type: "boolean", default: false },
  },
});
if (a.help) {
  console.log("usage: serve_bench.mjs [--url URL] [--clients N] [--requests M] [--prompt-tokens P] [--max-tokens T] [--api-key KEY]");
  process.exit(0);
}
const num = (name, min) => {
  const v = Number(a[name]);
  if (!Number.isInteger(v) || v < min) {
    console.error(`serve_bench: --${name} must be an integer >= ${min}, got '${a[name]}'`);
    process.exit(2);
  }
  return v;
};
const clients = num("clients", 1), requests = num("requests", 1), promptTokens = num("prompt-tokens", 1), maxTokens = num("max-tokens", 1);
const headers = { "Content-Type": "application/json" };
if (a["api-key"]) headers.Authorization = "Bearer " + a["api-key"];

// About one token per word for common short English words in DeepSeek's vocabulary.
const words = ["the", "sea", "stone", "river", "light", "green", "cloud", "north", "paper", "glass", "wind", "bread"];
const prompt = (i) => `Request ${i}:` + Array.from({ length: Math.max(promptTokens - 4, 0) }, (_, k) => " " + words[(i * 7 + k * 5) % words.length]).join("");

async function one(i) {
  const start = performance.now();
  const r = await fetch(a.url + "/v1/completions", {
    method: "POST", headers,
    body: JSON.stringify({ prompt: prompt(i), max_tokens: maxTokens, temperature: 0, stream: true, stream_options: { include_usage: true } }),
  });
  if (!r.ok) throw new Error(`HTTP ${r.status}: ${await r.text()}`);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", first = 0, usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const j = JSON.parse(event.slice(6));
      if (j.usage) usage = j.usage;
      if (!first && j.choices?.length) first = performance.now();
    }
  }
  const last = performance.now();
  const tokens = usage ? usage.completion_tokens : 0;
  return { ttft: (first - start) / 1000, tpot: tokens > 1 ? (last - first) / 1000 / (tokens - 1) : NaN, tokens,
           prompt: usage ? usage.prompt_tokens : 0 };
}

const results = [];
let next = 0;
const t0 = performance.now();
await Promise.all(Array.from({ length: clients }, async () => {
  while (next < requests) results.push(await one(next++));
}));
const wall = (performance.now() - t0) / 1000;

const pct = (xs, p) => {
  const s = xs.filter((x) => !Number.isNaN(x)).sort((x, y) => x - y);
  return s.length ? s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)] : NaN;
};
const out = results.reduce((s, r) => s + r.tokens, 0);
const ms = (x) => (x * 1000).toFixed(1);
const row = {
  clients, requests, "prompt tok": (results.reduce((s, r) => s + r.prompt, 0) / results.length).toFixed(0), "max tok": maxTokens,
  "wall s": wall.toFixed(2), "req/s": (requests / wall).toFixed(2), "out tok/s": (out / wall).toFixed(1),
  "TTFT p50 ms": ms(pct(results.map((r) => r.ttft), 50)), "TTFT p99 ms": ms(pct(results.map((r) => r.ttft), 99)),
  "TPOT p50 ms": ms(pct(results.map((r) => r.tpot), 50)), "TPOT p99 ms": ms(pct(results.map((r) => r.tpot), 99)),
};
console.log("| " + Object.keys(row).join(" | ") + " |");
console.log("|" + Object.keys(row).map(() => "---").join("|") + "|");
console.log("| " + Object.values(row).join(" | ") + " |");
