#!/usr/bin/env python3
"""Per-launch timeline of traced decode steps (bench_decode's DSV3_TRACE=FILE, from a -DDSV3_CUDA_TRACE=ON
build). Each launch (one %gridid) gets: its first block's start, the first and last pdl_wait() release,
and its last block's end. A launch's boundary is from the previous launch's last block end to its own first
release (what the programmatic-launch boundary costs), its run from its first release to its last end.
Usage: trace_table.py TRACE_CSV [LAYER]  (LAYER: also list that layer's launches one by one)"""
import csv
import sys
from collections import defaultdict

path = sys.argv[1]
show_layer = int(sys.argv[2]) if len(sys.argv) > 2 else None
# A graph replays its kernels under the same %gridid, so one id's blocks split into launches where their
# starts jump by more than 100 us (a step is milliseconds; one launch's blocks start within a few us).
by_grid = defaultdict(list)
for r in csv.DictReader(open(path)):
    by_grid[int(r["grid"])].append((int(r["start"]), int(r["waited"]), int(r["end"]), r["kernel"], int(r.get("mark", -1)), int(r.get("cycles", 0))))
launches = []
for recs in by_grid.values():
    recs.sort()
    L = None
    for s, w, e, k, mk, cy in recs:
        if L is None or s - L["last_start"] > 100_000:
            L = {"kernel": k, "blocks": 0, "start": s, "rel": None, "rel_last": None, "end": e, "last_start": s,
                 "mark": None, "cycles": 0, "ns": 0, "waited_to_end": []}
            launches.append(L)
        L["cycles"] += cy
        L["ns"] += e - s
        if mk >= 0:
            L["mark"] = mk if L["mark"] is None else max(L["mark"], mk)
        L["blocks"] += 1
        L["last_start"] = s
        L["end"] = max(L["end"], e)
        if w > 0:
            L["waited_to_end"].append(e - w)  # this block's own time from its release to its end
        if w >= 0:
            L["rel"] = w if L["rel"] is None else min(L["rel"], w)
            L["rel_last"] = w if L["rel_last"] is None else max(L["rel_last"], w)
for L in launches:  # a launch none of whose blocks waited is released when it starts
    L["release"] = L["rel"] if L["rel"] is not None else L["start"]
seq = sorted(launches, key=lambda L: L["start"])

# Steps start at an embedding launch; names for the GEMVs from their neighbours in a layer.
steps, cur = [], None
for L in seq:
    if L["kernel"] == "embed":
        cur = []
        steps.append(cur)
    if cur is not None:
        cur.append(L)


def label(step):
    out, prev = [], None
    for i, L in enumerate(step):
        k = L["kernel"]
        nxt = step[i + 1]["kernel"] if i + 1 < len(step) else None
        if k == "gemv":
            if nxt == "mla_prepare":
                k = "q/kv_a"
            elif prev == "mla_combine":
                k = "W_UV"
            elif prev in ("mla_combine_values", "W_UV"):
                k = "o_proj"
            elif nxt == "route":
                k = "router"
            elif prev == "swiglu_stream":
                k = "down"
            elif nxt in (None, "draw"):
                k = "lm_head"
        if k == "swiglu_stream":
            k = "gate/up"
        out.append(k)
        prev = "swiglu_stream" if k == "gate/up" else k
    return out


def us(ns):
    return ns / 1e3


for si, step in enumerate(steps):
    names = label(step)
    t0 = step[0]["start"]
    total = step[-1]["end"] - t0
    print(f"## step {si}: {len(step)} launches, {us(total):.1f} us from the embedding's start to the last block's end")
    # Layers start at q/kv_a; MoE layers have a route launch.
    layers, cur_layer = [], None
    for L, n in zip(step, names):
        if n == "q/kv_a":
            cur_layer = []
            layers.append(cur_layer)
        if cur_layer is not None:
            cur_layer.append((n, L))
    # Sums over the MoE layers per launch name (means printed below).
    fields = ("count", "boundary", "run", "early", "blocks", "mark", "marks", "cycles", "ns")
    agg = defaultdict(lambda: dict(dict.fromkeys(fields, 0), waited_to_end=[]))
    gap_sum = run_sum = 0.0
    prev_end = None
    for L in step:
        rel = L["release"]
        if prev_end is not None:
            gap_sum += max(0, rel - prev_end)
            run_sum += L["end"] - max(rel, prev_end)
        prev_end = L["end"] if prev_end is None else max(prev_end, L["end"])
    moe = [ly for ly in layers if any(n == "route" for n, _ in ly)]
    for ly in moe:
        pend = None
        seen = defaultdict(int)
        for n, L in ly:
            seen[n] += 1
            n = n if seen[n] == 1 else f"{n} #{seen[n]}"  # a kernel launched twice in a layer
            rel = L["release"]
            a = agg[n]
            a["count"] += 1
            if pend is not None:
                a["boundary"] += rel - pend  # previous end -> first release
            a["run"] += L["end"] - rel  # first release -> last end
            a["early"] += rel - L["start"]  # how long before its release the first block started
            a["blocks"] = L["blocks"]
            a["cycles"] += L["cycles"]
            a["ns"] += L["ns"]
            a["waited_to_end"] += L["waited_to_end"]
            if L["mark"] is not None:
                a["mark"] += L["mark"] - rel  # release -> the last block's mark
                a["marks"] += 1
            pend = L["end"]
    print(f"step sums: boundaries (previous end -> release) {us(gap_sum):.1f} us, runs {us(run_sum):.1f} us")
    if moe:
        span = sum(ly[-1][1]["end"] - ly[0][1]["start"] for ly in moe) / len(moe)
        print(f"MoE layers: {len(moe)}, mean {us(span):.1f} us from q/kv_a's first block to the down's last end")
        # The last column is per block (its own release to its end, over every MoE layer's launch): a launch's
        # run is its slowest block's, this says whether the others are as slow.
        print(f"| launch | blocks | boundary (us) | run (us) | release to last mark (us) | started before release (us) | SM clock (MHz) | a block's release to its end, p10 / p50 / p90 (us) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for n, a in agg.items():
            c = max(a["count"], 1)
            mark = f"{us(a['mark'] / a['marks']):.2f}" if a["marks"] else "-"
            clock = f"{1e3 * a['cycles'] / a['ns']:.0f}" if a["cycles"] and a["ns"] else "-"
            d = sorted(a["waited_to_end"])
            pct = " / ".join(f"{us(d[min(len(d) - 1, int(q * len(d)))]):.2f}" for q in (0.1, 0.5, 0.9)) if d else "-"
            print(f"| {n} | {a['blocks']} | {us(a['boundary'] / c):.2f} | {us(a['run'] / c):.2f} | {mark} | "
                  f"{us(a['early'] / c):.2f} | {clock} | {pct} |")
    if show_layer is not None and si == 0 and show_layer < len(layers):
        ly = layers[show_layer]
        base = ly[0][1]["start"]
        print(f"layer {show_layer}, times from its first block's start (us): start, first release, last release, last mark, end")
        for n, L in ly:
            f = lambda v: f"{us(v - base):7.2f}" if v is not None else "      -"
            print(f"  {n:<20} {L['blocks']:5d} {f(L['start'])} {f(L['rel'])} {f(L['rel_last'])} {f(L['mark'])} {f(L['end'])}")
