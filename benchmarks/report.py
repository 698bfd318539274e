"""Turn benchmarks/results.csv into benchmarks/RESULTS.md (tables) and PNG plots.

    python benchmarks/report.py [--run RUN_ID] [--csv PATH] [--out benchmarks/RESULTS.md]

By default the newest run of each op is reported: ratios are only taken between figures of
one run, measured side by side.
"""
from __future__ import annotations

import argparse
import csv
import os
from collections import OrderedDict, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
OURS = ("fused", "attnkern")
NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"
COMMAND = "./run.sh test --benchmark benchmarks/ && .venv/bin/python benchmarks/report.py"


def load(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def newest_runs(rows):
    """op -> newest run id that has rows for it."""
    best = {}
    for r in rows:
        best[r["op"]] = max(best.get(r["op"], ""), r["run"])
    return best


def tables(rows, run_of):
    out = []
    plots = []
    by_op = defaultdict(list)
    for r in rows:
        if r["run"] == run_of.get(r["op"]):
            by_op[r["op"]].append(r)
    for op, rs in by_op.items():
        first = rs[0]
        out.append(f"## {op}\n")
        out.append(f"Run `{first['run']}` on {first['device']}, {first['version']}, {first['date']}.\n")
        times = [r for r in rs if r["metric"] == "time_ms" and r["variant"] != "copy"]
        groups = OrderedDict()
        for r in times:
            groups.setdefault((r["pass"], r["shape"], r["dtype"]), {})[r["variant"]] = float(r["median"])
        variants = []
        for g in groups.values():
            for v in g:
                if v not in variants:
                    variants.append(v)
        ours = next((v for v in variants if v in OURS), None)
        others = [v for v in variants if v not in OURS and v != "floor"]
        head = ["pass", "shape", "dtype"] + [f"{v} ms" for v in variants]
        if ours:
            head += [f"{ours} speed-up vs {v}" for v in others]
            if "floor" in variants:
                head.append(f"{ours} / memory floor")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for (pass_, shape, dtype), g in groups.items():
            cells = [pass_, shape, dtype] + [f"{g[v]:.3g}" if v in g else "" for v in variants]
            if ours:
                for v in others:
                    cells.append(f"{g[v] / g[ours]:.2f}x" if v in g and ours in g else "")
                if "floor" in variants:
                    cells.append(f"{g[ours] / g['floor']:.2f}" if "floor" in g and ours in g else "")
            out.append("| " + " | ".join(cells) + " |")
            plots.append((op, pass_, shape, dtype, g))
        other = [r for r in rs if r["metric"] != "time_ms"]
        if other:
            out.append("")
            out.append("| variant | pass | shape | dtype | metric | value |")
            out.append("|---|---|---|---|---|---|")
            for r in other:
                out.append(f"| {r['variant']} | {r['pass']} | {r['shape']} | {r['dtype']} | {r['metric']} | {float(r['median']):.4g} |")
        out.append("")
    return out, plots


def plot(plots, folder):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    by_op = defaultdict(list)
    for p in plots:
        by_op[p[0]].append(p)
    for op, ps in by_op.items():
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(ps)), 4))
        variants = []
        for p in ps:
            for v in p[4]:
                if v not in variants:
                    variants.append(v)
        width = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            xs = [j + i * width for j in range(len(ps))]
            ax.bar(xs, [p[4].get(v, 0) for p in ps], width, label=v)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ps))])
        ax.set_xticklabels([f"{p[1]}\n{p[2]}" for p in ps], fontsize=7)
        ax.set_ylabel("median ms (lower is better)")
        ax.set_yscale("log")
        ax.set_title(f"{op}: time per call")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{op.replace(' ', '_')}.png"
        fig.savefig(os.path.join(folder, name), dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default=os.path.join(HERE, "results.csv"))
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--run", default=None, help="report this run id for every op (default: newest per op)")
    args = ap.parse_args(argv)
    rows = load(args.csv)
    run_of = newest_runs(rows)
    if args.run:
        run_of = {op: args.run for op in run_of}
    body, plots = tables(rows, run_of)
    pngs = plot(plots, os.path.dirname(os.path.abspath(args.out)))
    notes = ""
    if os.path.exists(args.out):  # keep the hand-written analysis between the markers
        old = open(args.out).read()
        a, b = old.find(NOTES_BEGIN), old.find(NOTES_END)
        if a >= 0 and b > a:
            notes = old[a:b + len(NOTES_END)] + "\n"
    lines = ["# Benchmark results", "",
             f"Made by `{COMMAND}` (tables from `benchmarks/results.csv`, newest run per op).",
             "Medians of repeated calls; speed-ups are ratios of figures from the same run.", ""]
    if notes:
        lines += [notes]
    lines += body
    lines += [f"![{p}]({p})" for p in pngs]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}" + (f" and {', '.join(pngs)}" if pngs else ""))


if __name__ == "__main__":
    main()
