// The chat page at GET / in real headless Chromium (Debian's `chromium`), driven over the DevTools
// protocol on --remote-debugging-pipe (no npm packages): type a message, press Send, wait for the
// streamed reply and its tokens/s line, then keep a screenshot in docs/images/chat-page.png.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";

import { makeModel, need, startServer } from "./harness.mjs";

const chromiumPath = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].find((p) => fs.existsSync(p));
need(chromiumPath, "Debian's chromium (scripts/setup.sh installs it)");

// A minimal DevTools client over the pipe: messages are JSON terminated by a NUL byte, sent on fd 3
// and received on fd 4.
class Browser {
  constructor() {
    this.profile = fs.mkdtempSync(path.join(os.tmpdir(), "dsv3-chromium-"));
    this.proc = spawn(chromiumPath, ["--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                                     "--no-first-run", "--no-default-browser-check", `--user-data-dir=${this.profile}`,
                                     "--window-size=1100,800"],
                      { stdio: ["ignore", "ignore", "pipe", "pipe", "pipe"] });
    this.proc.stderr.on("data", () => {});  // chromium is chatty on stderr
    this.next = 1;
    this.waiting = new Map();
    this.buffer = Buffer.alloc(0);
    this.proc.stdio[4].on("data", (d) => {
      this.buffer = Buffer.concat([this.buffer, d]);
      let end;
      while ((end = this.buffer.indexOf(0)) >= 0) {
        const msg = JSON.parse(this.buffer.subarray(0, end).toString("utf8"));
        this.buffer = this.buffer.subarray(end + 1);
        const w = this.waiting.get(msg.id);
        if (!w) continue;
        this.waiting.delete(msg.id);
        if (msg.error) w.reject(new Error(JSON.stringify(msg.error)));
        else w.resolve(msg.result);
      }
    });
  }
  send(method, params = {}, sessionId = undefined) {
    const id = this.next++;
    this.proc.stdio[3].write(JSON.stringify({ id, method, params, sessionId }) + "\0");
    return new Promise((resolve, reject) => this.waiting.set(id, { resolve, reject }));
  }
  async close() {
    await this.send("Browser.close").catch(() => {});
    await new Promise((r) => (this.proc.exitCode !== null ? r() : this.proc.on("exit", r)));
    fs.rmSync(this.profile, { recursive: true, force: true });
  }
}

let model, server, browser;
before(async () => {
  model = makeModel();
  server = await startServer(model.model, ["--api-key", "sk-page"]);
  browser = new Browser();
});
after(async () => {
  if (browser) await browser.close();
  if (server) await server.stop();
  if (model) model.remove();
});

test("the page streams a reply, shows tokens/s and keeps the conversation", async () => {
  const page = await fetch(server.url + "/");
  assert.equal(page.status, 200);
  assert.match(page.headers.get("content-type"), /text\/html/);
  const html = await page.text();
  assert.ok(!/(src|href)=["']?https?:/.test(html), "the page must not load anything from elsewhere");

  const { targetId } = await browser.send("Target.createTarget", { url: "about:blank" });
  const { sessionId } = await browser.send("Target.attachToTarget", { targetId, flatten: true });
  const cdp = (method, params) => browser.send(method, params, sessionId);
  const js = async (expression) => {
    const r = await cdp("Runtime.evaluate", { expression, awaitPromise: true, returnByValue: true });
    if (r.exceptionDetails) throw new Error(r.exceptionDetails.text + " " + JSON.stringify(r.exceptionDetails.exception));
    return r.result.value;
  };
  const waitFor = async (expression, ms = 60000) => {
    for (const start = Date.now(); Date.now() - start < ms;) {
      const v = await js(expression);
      if (v) return v;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error("timed out waiting for " + expression);
  };
  await cdp("Page.enable");
  await cdp("Page.navigate", { url: server.url + "/" });
  await waitFor("document.readyState === 'complete' && !!document.getElementById('send')");

  // A wrong key shows the server's 401 message in the page.
  await js(`document.getElementById('key').value = 'wrong'; document.getElementById('input').value = 'Hi';
            document.getElementById('send').click(); true`);
  const error = await waitFor("document.querySelector('.msg.error .stats')?.textContent");
  assert.match(error, /API key/);

  await js(`document.getElementById('clear').click(); document.getElementById('key').value = 'sk-page';
            document.getElementById('max_tokens').value = '24'; document.getElementById('temperature').value = '0';
            document.getElementById('input').value = 'Write a haiku about the sea.';
            document.getElementById('send').click(); true`);
  const stats = await waitFor(`(() => { const s = document.querySelectorAll('.msg.assistant .stats');
                                        const t = s.length ? s[s.length - 1].textContent : '';
                                        return /tokens\\/s/.test(t) && !document.getElementById('send').disabled ? t : ''; })()`);
  assert.match(stats, /\d+ tokens · [\d.]+ tokens\/s/);
  const reply = await js("document.querySelector('.msg.assistant .content').textContent");
  assert.ok(reply.length > 0, "a reply appeared");

  // What the page showed is what the API gives for the same greedy request.
  const api = await fetch(server.url + "/v1/chat/completions", {
    method: "POST", headers: { Authorization: "Bearer sk-page", "Content-Type": "application/json" },
    body: JSON.stringify({ messages: [{ role: "user", content: "Write a haiku about the sea." }], max_tokens: 24, temperature: 0 }),
  }).then((r) => r.json());
  assert.equal(reply, api.choices[0].message.content);

  // A second turn carries the first: two user messages and two assistant replies on the page.
  await js(`document.getElementById('input').value = 'And one about mountains?'; document.getElementById('send').click(); true`);
  await waitFor(`document.querySelectorAll('.msg.assistant .stats').length === 2 &&
                 /tokens/.test(document.querySelectorAll('.msg.assistant .stats')[1].textContent) &&
                 !document.getElementById('send').disabled`);
  assert.equal(await js("document.querySelectorAll('.msg.user').length"), 2);

  const shot = await cdp("Page.captureScreenshot", { format: "png" });
  // DSV3_SCREENSHOT=docs/images/chat-page.png refreshes the one in the docs.
  const out = process.env.DSV3_SCREENSHOT || path.join(os.tmpdir(), `dsv3-chat-page-${process.pid}.png`);
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, Buffer.from(shot.data, "base64"));
  assert.ok(fs.statSync(out).size > 5000);
  if (!process.env.DSV3_SCREENSHOT) fs.rmSync(out);
});
