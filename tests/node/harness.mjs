// Shared by the Node tests: a tiny random model with the real DeepSeek-V3 tokenizer, a `dsv3 serve`
// process on a free loopback port, and the OpenAI SDK from .cache/node (scripts/fetch_node_deps.sh).
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const dsv3 = process.env.DSV3_BIN || path.join(root, "build/release/dsv3");

// Missing prerequisites skip (exit 77, which ctest reports as skipped) unless the run requires them.
export function need(ok, what) {
  if (ok) return;
  if (process.env.DSV3_REQUIRE_NODE) throw new Error(`missing: ${what}`);
  console.log(`SKIP: ${what}`);
  process.exit(77);
}

export async function openai() {
  const entry = path.join(root, ".cache/node/node_modules/openai/index.mjs");
  need(fs.existsSync(entry), "the OpenAI Node SDK: run scripts/fetch_node_deps.sh");
  return (await import(pathToFileURL(entry).href)).default;
}

// A 3-layer random DeepSeek-V3 model (bench/configs/tiny_v3.json) with the real vocabulary.
export function makeModel() {
  const tok = path.join(root, ".cache/tokenizer");
  need(fs.existsSync(path.join(tok, "tokenizer.json")), "the DeepSeek-V3 tokenizer: run scripts/fetch_tokenizer.sh");
  need(fs.existsSync(dsv3), `the dsv3 binary at ${dsv3} (set DSV3_BIN)`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "dsv3-node-"));
  const cfg = JSON.parse(fs.readFileSync(path.join(root, "bench/configs/tiny_v3.json"), "utf8"));
  cfg.vocab_size = 129280;
  fs.writeFileSync(path.join(dir, "config.in.json"), JSON.stringify(cfg));
  const model = path.join(dir, "model");
  execFileSync(dsv3, ["random-checkpoint", "--config", path.join(dir, "config.in.json"), "--out", model, "--std", "0.1"],
               { stdio: "inherit" });
  for (const f of ["tokenizer.json", "tokenizer_config.json"]) fs.copyFileSync(path.join(tok, f), path.join(model, f));
  return { dir, model, remove: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

// Starts `dsv3 serve` on a free port (with `env` added to this process's environment) and waits until
// /health says ok.
export async function startServer(modelDir, args = [], env = {}) {
  const proc = spawn(dsv3, ["serve", "--model", modelDir, "--port", "0", "--model-name", "tiny", ...args],
                     { stdio: ["ignore", "inherit", "pipe"], env: { ...process.env, ...env } });
  let log = "";
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("dsv3 serve did not start:\n" + log)), 60000);
    proc.stderr.on("data", (d) => {
      log += d;
      process.stderr.write(d);
      const m = /listening on (http:\/\/[^\s]+)/.exec(log);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    proc.on("exit", (code) => reject(new Error(`dsv3 serve exited with ${code}:\n${log}`)));
  });
  for (let i = 0; i < 600; ++i) {
    const r = await fetch(url + "/health").catch(() => null);
    if (r && r.status === 200) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  const exited = new Promise((resolve) => proc.on("exit", (code, signal) => resolve({ code, signal })));
  return {
    url,
    pid: proc.pid,
    // SIGTERM, then the exit status (0 expected: a graceful stop).
    stop: async () => {
      proc.kill("SIGTERM");
      return exited;
    },
  };
}

// What /proc says about a process: open file descriptors and resident memory in MiB.
export function processUsage(pid) {
  const fds = fs.readdirSync(`/proc/${pid}/fd`).length;
  const rss = Number(/VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"))[1]) / 1024;
  return { fds, rss };
}
