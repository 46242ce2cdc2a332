#!/usr/bin/env python3
"""Draws the loss curve of a `dsv3 train` log as an SVG (standard library only).

usage: tools/plot_loss.py LOG OUT.svg

Plots the main-model training loss of the progress lines (`step N/M | loss L (main X mtp Y ...`) and the
held-out main loss of the eval lines (`eval N | loss L (main X, ppl P, mtp Y)`) against the step.
"""
import math
import re
import sys


def read(path):
    train, evals = [], []
    for line in open(path, encoding="utf-8"):
        m = re.match(r"step\s+(\d+)/\d+ \| loss \S+ \(main (\S+) mtp (\S+)", line)
        if m:
            train.append((int(m.group(1)), float(m.group(2)), float(m.group(3))))
        m = re.match(r"eval\s+(\d+) \| loss \S+ \(main (\S+), ppl \S+, mtp (\S+)\)", line)
        if m:
            evals.append((int(m.group(1)), float(m.group(2)), float(m.group(3))))
    return train, evals


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    train, evals = read(sys.argv[1])
    if not train:
        sys.exit(f"{sys.argv[1]}: no progress lines found (is it a dsv3 train log?)")
    W, H, L, R, T, B = 720, 420, 60, 20, 30, 50
    x_max = max(s for s, _, _ in train + evals)
    y_max = math.ceil(max(v for _, v, _ in train + evals))
    sx = lambda s: L + (W - L - R) * s / x_max
    sy = lambda v: T + (H - T - B) * (1 - v / y_max)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    for v in range(0, y_max + 1):
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 8}" y="{sy(v) + 4:.1f}" text-anchor="end">{v}</text>')
    step = 250 if x_max > 1000 else 100
    for s in range(0, x_max + 1, step):
        out.append(f'<text x="{sx(s):.1f}" y="{H - B + 18}" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle">optimizer step</text>')
    out.append(f'<text x="16" y="{(T + H - B) / 2}" transform="rotate(-90 16 {(T + H - B) / 2})" '
               'text-anchor="middle">cross-entropy (nats/token)</text>')

    def path(points, color, dash=""):
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(s):.1f},{sy(v):.1f}" for i, (s, v) in enumerate(points))
        return f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2" {dash}/>'

    out.append(path([(s, v) for s, v, _ in train], "#1f77b4"))
    out.append(path([(s, v) for s, _, v in train], "#aec7e8", 'stroke-dasharray="4 3"'))
    if evals:
        out.append(path([(s, v) for s, v, _ in evals], "#d62728"))
        for s, v, _ in evals:
            out.append(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3" fill="#d62728"/>')
    legend = [("#1f77b4", "train, main model"), ("#aec7e8", "train, MTP module"), ("#d62728", "held-out, main model")]
    for i, (color, text) in enumerate(legend):
        y = T + 12 + 18 * i
        out.append(f'<line x1="{W - R - 190}" x2="{W - R - 165}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{W - R - 158}" y="{y + 4}">{text}</text>')
    out.append("</svg>")
    open(sys.argv[2], "w", encoding="utf-8").write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
