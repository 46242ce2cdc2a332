// The official OpenAI Node SDK (6.x) against `dsv3 serve` on loopback, unchanged except for baseURL:
// chat, streaming, completions with suffix (FIM), tools, logprobs, JSON mode, usage with the cache-hit
// fields, errors as the SDK's typed exceptions, and concurrent clients matching solo greedy runs.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";

import { dsv3, makeModel, openai, startServer } from "./harness.mjs";

const OpenAI = await openai();
const execFileAsync = promisify(execFile);
let model, server, client;

before(async () => {
  model = makeModel();
  server = await startServer(model.model, ["--api-key", "sk-node", "--ctx", "512"]);
  client = new OpenAI({ baseURL: server.url + "/v1", apiKey: "sk-node", maxRetries: 0, timeout: 120000 });
});

after(async () => {
  if (server) assert.deepEqual(await server.stop(), { code: 0, signal: null });  // SIGTERM stops it cleanly
  if (model) model.remove();
});

const user = (content) => [{ role: "user", content }];

test("chat: a reply, usage with cache-hit fields, and the cache hit on a repeated prompt", async () => {
  // Long enough to fill whole 64-token blocks, the prefix cache's unit.
  const messages = user("Tell me about the sea in one sentence, please. " + "Waves and wind. ".repeat(25));
  const a = await client.chat.completions.create({ model: "tiny", messages, max_tokens: 8, temperature: 0 });
  assert.equal(a.object, "chat.completion");
  assert.equal(a.model, "tiny");
  assert.equal(typeof a.choices[0].message.content, "string");
  assert.ok(["stop", "length"].includes(a.choices[0].finish_reason));
  const u = a.usage;
  assert.ok(u.prompt_tokens > 64 && u.completion_tokens >= 1 && u.completion_tokens <= 8);
  assert.equal(u.total_tokens, u.prompt_tokens + u.completion_tokens);
  assert.equal(u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens, u.prompt_tokens);
  assert.equal(u.prompt_tokens_details.cached_tokens, u.prompt_cache_hit_tokens);
  // The same prompt again: its whole blocks (all but the one holding the last token) come from the cache.
  const b = await client.chat.completions.create({ model: "tiny", messages, max_tokens: 8, temperature: 0 });
  const blocks = Math.floor((b.usage.prompt_tokens - 1) / 64) * 64;
  assert.equal(b.usage.prompt_cache_hit_tokens, blocks, JSON.stringify(b.usage));
  assert.equal(b.choices[0].message.content, a.choices[0].message.content);  // greedy: the same reply
});

test("chat streaming equals the non-streamed greedy reply, and ends with usage", async () => {
  const messages = user("Count: one, two,");
  const whole = await client.chat.completions.create({ model: "tiny", messages, max_tokens: 12, temperature: 0 });
  const stream = await client.chat.completions.create({
    model: "tiny", messages, max_tokens: 12, temperature: 0, stream: true, stream_options: { include_usage: true },
  });
  let text = "", finish = null, usage = null, chunks = 0;
  for await (const chunk of stream) {
    ++chunks;
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      text += c.delta.content ?? "";
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  assert.equal(text, whole.choices[0].message.content);
  assert.equal(finish, whole.choices[0].finish_reason);
  assert.equal(usage.completion_tokens, whole.usage.completion_tokens);
  assert.ok(chunks >= 3);
});

test("completions with suffix (FIM) and with legacy logprobs", async () => {
  const fim = await client.completions.create({
    model: "tiny", prompt: "def add(a, b):\n    ", suffix: "\n\nprint(add(1, 2))\n", max_tokens: 6, temperature: 0,
  });
  assert.equal(fim.object, "text_completion");
  assert.equal(typeof fim.choices[0].text, "string");
  assert.ok(fim.usage.prompt_tokens > 5);
  const c = await client.completions.create({ model: "tiny", prompt: "Once upon a time", max_tokens: 5, temperature: 0, logprobs: 2 });
  const lp = c.choices[0].logprobs;
  const n = lp.tokens.length;
  assert.ok(n >= 1 && n <= 5);
  assert.equal(lp.token_logprobs.length, n);
  assert.equal(lp.text_offset.length, n);
  for (let i = 0; i < n; ++i) {
    assert.ok(lp.token_logprobs[i] <= 0);
    assert.equal(Object.keys(lp.top_logprobs[i]).length <= 2, true);
    if (i > 0) assert.ok(lp.text_offset[i] >= lp.text_offset[i - 1]);
    // Greedy: the chosen token is the most likely one.
    assert.ok(Math.abs(Math.max(...Object.values(lp.top_logprobs[i])) - lp.token_logprobs[i]) < 1e-5);
  }
});

test("completions echo with logprobs: the prompt's logprobs are a direct forward pass's log-softmax", async () => {
  const prompt = "The quick brown fox jumps over the lazy dog, and then";
  const body = { model: "tiny", prompt, max_tokens: 3, temperature: 0, echo: true, logprobs: 1 };
  const r = await client.completions.create(body);
  assert.ok(r.choices[0].text.startsWith(prompt), r.choices[0].text);
  const lp = r.choices[0].logprobs;
  // The prompt's ids (BOS first when the tokenizer adds one) and `dsv3 logits` over them.
  const bos = JSON.parse(fs.readFileSync(path.join(model.model, "tokenizer_config.json"), "utf8")).add_bos_token;
  // The CLI runs asynchronously: a blocking run can outlast the server's keep-alive timeout (5 s under the
  // sanitizers) without the client seeing the idle connection close, and its next request on that pooled
  // connection then fails with a connection error (this client has no retries).
  const ids = JSON.parse((await execFileAsync(dsv3, ["tokenize", "--model", model.model, "--text", prompt,
                                                     ...(bos ? ["--bos"] : [])], { encoding: "utf8" })).stdout).ids;
  assert.equal(r.usage.prompt_tokens, ids.length);
  assert.equal(lp.tokens.length, ids.length + r.usage.completion_tokens);
  const out = path.join(model.dir, "prompt_logits.f32");
  await execFileAsync(dsv3, ["logits", "--model", model.model, "--tokens", ids.join(","), "--out", out]);
  const raw = fs.readFileSync(out);
  const logits = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length));
  const vocab = logits.length / ids.length;
  assert.equal(lp.token_logprobs[0], null);  // nothing precedes the first token
  assert.equal(lp.top_logprobs[0], null);
  for (let j = 1; j < ids.length; ++j) {
    const row = logits.subarray((j - 1) * vocab, j * vocab);
    let m = -Infinity, sum = 0;
    for (const v of row) m = Math.max(m, v);
    for (const v of row) sum += Math.exp(v - m);
    const expected = row[ids[j]] - m - Math.log(sum);
    assert.ok(Math.abs(lp.token_logprobs[j] - expected) < 1e-3, `prompt token ${j}: ${lp.token_logprobs[j]} vs ${expected}`);
    assert.equal(Object.keys(lp.top_logprobs[j]).length, 1);
  }
  assert.equal(lp.text_offset[ids.length], prompt.length);  // the generated tokens come after the echo
  // Streamed: the same text and the same logprobs, chunk by chunk.
  const stream = await client.completions.create({ ...body, stream: true });
  let text = "";
  const streamed = [];
  for await (const chunk of stream)
    for (const c of chunk.choices) {
      text += c.text;
      if (c.logprobs) streamed.push(...c.logprobs.token_logprobs);
    }
  assert.equal(text, r.choices[0].text);
  assert.deepEqual(streamed, lp.token_logprobs);
});

test("chat logprobs: one entry per token with bytes and top alternatives, streamed too", async () => {
  const body = { model: "tiny", messages: user("Hello"), max_tokens: 6, temperature: 0, logprobs: true, top_logprobs: 3 };
  const r = await client.chat.completions.create(body);
  const content = r.choices[0].logprobs.content;
  const eos = r.choices[0].finish_reason === "stop" ? 1 : 0;
  assert.equal(content.length, r.usage.completion_tokens - eos);
  for (const e of content) {
    assert.equal(e.top_logprobs.length, 3);
    assert.equal(e.logprob, e.top_logprobs[0].logprob);  // greedy
    assert.ok(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob && e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob);
    assert.ok(Array.isArray(e.bytes) && e.bytes.every((b) => b >= 0 && b < 256));
  }
  assert.equal(Buffer.from(content.flatMap((e) => e.bytes)).toString("utf8"), r.choices[0].message.content);
  const stream = await client.chat.completions.create({ ...body, stream: true });
  const streamed = [];
  for await (const chunk of stream) for (const c of chunk.choices) if (c.logprobs) streamed.push(...c.logprobs.content);
  assert.deepEqual(streamed.map((e) => e.logprob), content.map((e) => e.logprob));
});

const tools = [
  { type: "function", function: { name: "get_weather", description: "Weather in a city.",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } } },
  { type: "function", function: { name: "get_time", parameters: { type: "object", properties: {} } } },
];

test("tools: a named tool_choice gives a tool call with finish_reason tool_calls, streamed too", async () => {
  const body = { model: "tiny", messages: user("Weather in Paris?"), tools, max_tokens: 16, temperature: 0,
                 tool_choice: { type: "function", function: { name: "get_weather" } } };
  const r = await client.chat.completions.create(body);
  const m = r.choices[0].message;
  assert.equal(r.choices[0].finish_reason, "tool_calls");
  assert.equal(m.tool_calls.length, 1);
  assert.equal(m.tool_calls[0].type, "function");
  assert.equal(m.tool_calls[0].function.name, "get_weather");
  assert.equal(typeof m.tool_calls[0].function.arguments, "string");
  assert.match(m.tool_calls[0].id, /^call_/);
  // Streamed piecewise, OpenAI's shape: the call's first delta has index, id, type and name, later ones
  // only index and an arguments fragment, as the model writes them.
  const stream = await client.chat.completions.create({ ...body, stream: true });
  const deltas = [];
  let finish = null;
  for await (const chunk of stream)
    for (const c of chunk.choices) {
      deltas.push(...(c.delta.tool_calls ?? []));
      if (c.finish_reason) finish = c.finish_reason;
    }
  assert.equal(finish, "tool_calls");
  assert.ok(deltas.length >= 2, JSON.stringify(deltas));
  assert.equal(deltas[0].index, 0);
  assert.match(deltas[0].id, /^call_/);
  assert.equal(deltas[0].type, "function");
  assert.equal(deltas[0].function.name, "get_weather");
  for (const d of deltas.slice(1)) {
    assert.equal(d.index, 0);
    assert.equal(d.id, undefined);
    assert.equal(d.function.name, undefined);
  }
  assert.equal(deltas.map((d) => d.function.arguments).join(""), m.tool_calls[0].function.arguments);
  // The SDK's stream helper accumulates the pieces to the non-streamed call.
  const helper = client.chat.completions.stream(body);
  const final = await helper.finalChatCompletion();
  assert.equal(final.choices[0].finish_reason, "tool_calls");
  assert.equal(final.choices[0].message.tool_calls.length, 1);
  assert.equal(final.choices[0].message.tool_calls[0].function.name, "get_weather");
  assert.equal(final.choices[0].message.tool_calls[0].function.arguments, m.tool_calls[0].function.arguments);
  // "required" opens the call; the model names the function (a random model writes some name).
  const req = await client.chat.completions.create({ ...body, tool_choice: "required" });
  assert.equal(req.choices[0].finish_reason, "tool_calls");
  assert.ok(req.choices[0].message.tool_calls.length >= 1);
});

test("tools: a conversation with a tool result goes through the chat template", async () => {
  const messages = [
    ...user("Weather in Paris?"),
    { role: "assistant", content: null, tool_calls: [{ id: "call_1", type: "function",
      function: { name: "get_weather", arguments: "{\"city\": \"Paris\"}" } }] },
    { role: "tool", tool_call_id: "call_1", content: "{\"temperature\": 21}" },
  ];
  const r = await client.chat.completions.create({ model: "tiny", messages, tools, max_tokens: 4, temperature: 0 });
  assert.ok(r.usage.prompt_tokens > 100);  // the tool definitions are part of the prompt
  const none = await client.chat.completions.create({ model: "tiny", messages, tools, tool_choice: "none", max_tokens: 4, temperature: 0 });
  assert.ok(none.usage.prompt_tokens < r.usage.prompt_tokens);  // tool_choice none leaves them out
  assert.equal(none.choices[0].message.tool_calls, undefined);
});

test("response_format json_object: the reply is JSON (or a cut-off prefix of it)", async () => {
  const r = await client.chat.completions.create({
    model: "tiny", messages: user("Reply in JSON."), max_tokens: 40, temperature: 0.8, seed: 5,
    response_format: { type: "json_object" },
  });
  const text = r.choices[0].message.content;
  assert.ok(text.startsWith("{"), text);
  if (r.choices[0].finish_reason === "stop") assert.equal(typeof JSON.parse(text), "object");
});

test("penalties, min_p and seeds are accepted and seeded sampling is reproducible", async () => {
  const body = { model: "tiny", messages: user("Say something."), max_tokens: 10, temperature: 1, seed: 42, min_p: 0.05,
                 presence_penalty: 0.5, frequency_penalty: 0.5, repetition_penalty: 1.3 };
  const a = await client.chat.completions.create(body);
  const b = await client.chat.completions.create(body);
  assert.equal(a.choices[0].message.content, b.choices[0].message.content);
});

test("errors are the SDK's typed exceptions with the status and the parameter", async () => {
  await assert.rejects(client.chat.completions.create({ model: "tiny", messages: user("x"), temperature: 5 }),
                       (e) => e instanceof OpenAI.BadRequestError && e.status === 400 && e.param === "temperature");
  await assert.rejects(client.chat.completions.create({ model: "tiny", messages: user("x"), top_logprobs: 2 }),
                       (e) => e instanceof OpenAI.BadRequestError && e.param === "top_logprobs");
  await assert.rejects(client.chat.completions.create({ model: "tiny", messages: user("x"), tools: [{ type: "function", function: { name: "bad name" } }] }),
                       (e) => e instanceof OpenAI.BadRequestError && e.param === "tools[0].function.name");
  await assert.rejects(client.chat.completions.create({ model: "tiny", messages: user("x"), response_format: { type: "json_schema", json_schema: { name: "s" } } }),
                       (e) => e instanceof OpenAI.BadRequestError && e.param === "response_format");
  await assert.rejects(client.chat.completions.create({ model: "tiny", messages: user("x ".repeat(600)) }),
                       (e) => e instanceof OpenAI.BadRequestError && /context/.test(e.message));
  const stranger = new OpenAI({ baseURL: server.url + "/v1", apiKey: "wrong", maxRetries: 0 });
  await assert.rejects(stranger.chat.completions.create({ model: "tiny", messages: user("x") }),
                       (e) => e instanceof OpenAI.AuthenticationError && e.status === 401);
  const models = await client.models.list();
  assert.equal(models.data[0].id, "tiny");
});

test("concurrent clients get the same greedy replies as solo runs", async () => {
  const prompts = Array.from({ length: 8 }, (_, i) => `Request ${i}: list ${i + 2} colours.`);
  const ask = (p) => client.chat.completions.create({ model: "tiny", messages: user(p), max_tokens: 8, temperature: 0 })
    .then((r) => r.choices[0].message.content);
  const solo = [];
  for (const p of prompts) solo.push(await ask(p));
  const together = await Promise.all(prompts.map(ask));
  assert.deepEqual(together, solo);
});

test("the disk cache survives a restart: the same long prompt hits after the server comes back", async () => {
  const cacheDir = model.dir + "/disk-cache";
  const messages = user("Remember this: " + "a quiet harbour at dawn, ".repeat(30));
  const ask = async (s) => {
    const c = new OpenAI({ baseURL: s.url + "/v1", apiKey: "x", maxRetries: 0, timeout: 120000 });
    return c.chat.completions.create({ model: "tiny", messages, max_tokens: 2, temperature: 0 });
  };
  const first = await startServer(model.model, ["--cache-dir", cacheDir]);
  const cold = await ask(first);
  assert.equal(cold.usage.prompt_cache_hit_tokens, 0);
  assert.deepEqual(await first.stop(), { code: 0, signal: null });
  const second = await startServer(model.model, ["--cache-dir", cacheDir]);
  try {
    const warm = await ask(second);
    assert.equal(warm.usage.prompt_tokens, cold.usage.prompt_tokens);
    // Whole 64-token blocks come back from disk.
    assert.ok(warm.usage.prompt_cache_hit_tokens >= 64, JSON.stringify(warm.usage));
    assert.equal(warm.usage.prompt_cache_hit_tokens % 64, 0);
    assert.equal(warm.choices[0].message.content, cold.choices[0].message.content);
    const metrics = await (await fetch(second.url + "/metrics")).text();
    assert.match(metrics, /^dsv3_disk_cache_hits_total [1-9]/m);
  } finally {
    await second.stop();
  }
});
