#!/usr/bin/env python3
"""Serving benchmark: N concurrent clients send M streamed /v1/completions requests in total to a running
`dsv3 serve` (or any OpenAI-compatible server) over HTTP and it prints throughput, time to first token
(TTFT), time per output token after the first (TPOT, per request) and the gap between streamed chunks
(ITL, every gap of every request) at p50/p99. Python 3 standard library only, so it runs on the GPU
machine too (which has no Node).

    python3 bench/serve_bench.py --url http://127.0.0.1:8080 --clients 8 --requests 32 \
        --prompt-tokens 128 --max-tokens 64

Prompts are distinct from their first token on (a random tag per run, then the request number), so
the prefix cache does not shorten them, also across runs against one server; the table reports the prompt and completion lengths the server counted (usage). Greedy (temperature 0) unless --temperature (then seeded per request); a request
ends at max_tokens or at an end-of-sequence token, so completions can be shorter than --max-tokens (the
"out tok/req" column says how long they were). One warm-up request (--warmup) runs first and is not
counted: it pays for first-touch costs (weight pages, CUDA graph capture).
"""
import argparse
import http.client
import json
import math
import os
import sys
import threading
import time
import urllib.parse

WORDS = ["the", "sea", "stone", "river", "light", "green", "cloud", "north", "paper", "glass", "wind", "bread"]


def prompt(tag, i, n_words):
    # About one token per word for common short English words; the server reports the real count.
    return f"{tag} request {i}:" + "".join(" " + WORDS[(i * 7 + k * 5) % len(WORDS)] for k in range(max(n_words - 4, 0)))


def one(url, headers, body, timeout):
    """One streamed request: (ttft s, [chunk arrival times], usage dict) or raises on an HTTP error."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        chunks, usage = [], None
        for raw in r:  # SSE: "data: {...}" lines separated by blank lines
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            j = json.loads(line[6:])
            if j.get("usage"):
                usage = j["usage"]
            if j.get("choices"):
                chunks.append(time.perf_counter())
        if not chunks:
            raise RuntimeError("the stream carried no completion chunk")
        return chunks[0] - start, chunks, usage or {}
    finally:
        conn.close()


def pct(xs, p):
    s = sorted(x for x in xs if not math.isnan(x))
    return s[min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1)] if s else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    ap.add_argument("--requests", type=int, default=32, help="requests in total (default 32)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="approximate prompt length (default 128)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default 1)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted requests first (default 1)")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--label", default="", help="first column of the row (e.g. model and device)")
    ap.add_argument("--tag", default=os.urandom(4).hex(), help="starts every prompt (default: random per run)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request before it fails")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--no-header", action="store_true", help="print the table row only")
    a = ap.parse_args()
    for name in ("clients", "requests", "prompt_tokens", "max_tokens"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(a, name)}")
    if a.warmup < 0:
        ap.error("--warmup must be >= 0")
    headers = {"Content-Type": "application/json"}
    if a.api_key:
        headers["Authorization"] = "Bearer " + a.api_key

    def body(i):
        return {"prompt": prompt(a.tag, i, a.prompt_tokens), "max_tokens": a.max_tokens, "temperature": a.temperature,
                "top_p": a.top_p, "seed": i,
                "stream": True, "stream_options": {"include_usage": True}}

    for w in range(a.warmup):
        one(a.url, headers, body(10_000_000 + w), a.timeout)

    results, errors = [], []
    lock = threading.Lock()
    next_i = [0]

    def client():
        while True:
            with lock:
                i = next_i[0]
                if i >= a.requests:
                    return
                next_i[0] += 1
            try:
                r = one(a.url, headers, body(i), a.timeout)
                with lock:
                    results.append(r)
            except Exception as e:  # counted and shown, the others go on
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    n = len(results)
    out_tokens = sum(u.get("completion_tokens", 0) for _, _, u in results)
    tpot = [(c[-1] - c[0]) / (u["completion_tokens"] - 1) for _, c, u in results if u.get("completion_tokens", 0) > 1]
    itl = [b - a_ for _, c, _ in results for a_, b in zip(c, c[1:])]
    ttft = [t for t, _, _ in results]
    ms = lambda x: round(x * 1000, 1)
    row = {
        "label": a.label, "clients": a.clients, "requests": a.requests, "errors": len(errors),
        "prompt tok": round(sum(u.get("prompt_tokens", 0) for _, _, u in results) / max(n, 1)),
        "out tok/req": round(out_tokens / max(n, 1), 1),
        "wall s": round(wall, 2), "req/s": round(n / wall, 2), "out tok/s": round(out_tokens / wall, 1),
        "TTFT p50 ms": ms(pct(ttft, 50)), "TTFT p99 ms": ms(pct(ttft, 99)),
        "TPOT p50 ms": ms(pct(tpot, 50)), "TPOT p99 ms": ms(pct(tpot, 99)),
        "ITL p50 ms": ms(pct(itl, 50)), "ITL p99 ms": ms(pct(itl, 99)),
    }
    if a.json:
        print(json.dumps(row))
    else:
        if not a.no_header:
            print("| " + " | ".join(row) + " |")
            print("|" + "|".join("---" for _ in row) + "|")
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    for e in errors[:5]:
        print("error:", e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
