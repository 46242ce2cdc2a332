#!/usr/bin/env python3
"""Aggregates `ncu --csv --page raw --metrics gpu__time_duration.sum --print-units base` output into a
per-kernel table (total us per decode step, calls, share). Usage: kernel_table.py NCU_CSV [STEPS]"""
import csv, re, sys
from collections import defaultdict

path, steps = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
rows = list(csv.reader(open(path, errors="replace")))
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
cols = rows[head]
kn, tm = cols.index("Kernel Name"), cols.index("gpu__time_duration.sum")
tot, cnt = defaultdict(float), defaultdict(int)
for r in rows[head + 1:]:
    if len(r) <= max(kn, tm):
        continue
    try:
        t = float(r[tm].replace(",", ""))
    except ValueError:
        continue
    name = re.sub(r"\(.*", "", r[kn]).split("::")[-1]
    name = re.sub(r"<(\w+::)*", "<", r[kn].split("(")[0])[-80:] if "gemv" in r[kn] or "gemm" in r[kn] else name
    tot[name] += t
    cnt[name] += 1
total = sum(tot.values())
print(f"{'kernel':<60} {'us/step':>9} {'calls':>6} {'share':>6}")
for k, v in sorted(tot.items(), key=lambda kv: -kv[1]):
    print(f"{k[-60:]:<60} {v / 1e3 / steps:9.1f} {cnt[k] / steps:6.0f} {100 * v / total:5.1f}%")
print(f"{'sum of kernel times':<60} {total / 1e3 / steps:9.1f} {sum(cnt.values()) / steps:6.0f}")
