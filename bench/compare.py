#!/usr/bin/env python3
"""compare.py QSD_RESULTS FLEECEFS_RESULTS: one markdown table from two runs of
../shared/bench/anchors.sh. Every ratio is against the plain file measured in
the same anchors run (medians over repetitions); p99 in ms."""
import csv
import os
import statistics as st
import sys


def load(d):
    rows = list(csv.DictReader(open(os.path.join(d, "results.tsv")), delimiter="\t"))
    idle = []
    p = os.path.join(d, "backups.tsv")
    if os.path.exists(p):
        idle = list(csv.DictReader(open(p), delimiter="\t"))
    return rows, idle


def med(vals):
    v = [float(x) for x in vals if x not in ("", None)]
    return st.median(v) if v else None


def cell(rows, cfg, wl, key):
    return med(r[key] for r in rows if r["config"] == cfg and r["workload"] == wl)


qsd, qidle = load(sys.argv[1])
fl, fidle = load(sys.argv[2])
wls = ["seqwrite", "seqread", "randwrite", "randread"]
names = {"seqwrite": "1 MiB seq write", "seqread": "1 MiB seq read",
         "randwrite": "4 KiB rand write", "randread": "4 KiB rand read"}
phases = [("fuse", "no job"), ("fuse+full", "during full backup (unlimited)"),
          ("fuse+none", "copy-before-write only*")]


def ratio(rows, cfg, wl):
    base, v = cell(rows, "direct", wl, "mbps"), cell(rows, cfg, wl, "mbps")
    return (v / base) if (base and v is not None) else None


def f3(x):
    return "—" if x is None else f"{x:.3f}"


def ms(x):
    return "—" if x is None else f"{x / 1000:.1f}"


print("## fleecefs vs qemu-storage-daemon vs the plain file\n")
print("Fraction of the plain file's throughput (median over repetitions; each layer against the plain file "
      "measured in its own run), and p99 completion latency in ms. fio QD16, O_DIRECT, libaio.\n")
print("| workload | phase | plain MB/s (qsd run / fleecefs run) | qsd | fleecefs | fleecefs / qsd | qsd p99 | fleecefs p99 |")
print("|---|---|---|---|---|---|---|---|")
for wl in wls:
    for cfg, label in phases:
        rq, rf = ratio(qsd, cfg, wl), ratio(fl, cfg, wl)
        if rq is None and rf is None:
            continue
        pq, pf = cell(qsd, "direct", wl, "mbps"), cell(fl, "direct", wl, "mbps")
        rel = f"{rf / rq:.1f}×" if (rq and rf) else "—"
        print(f"| {names[wl]} | {label} | {pq or 0:.0f} / {pf or 0:.0f} | {f3(rq)} | {f3(rf)} | {rel} "
              f"| {ms(cell(qsd, cfg, wl, 'p99_us'))} | {ms(cell(fl, cfg, wl, 'p99_us'))} |")
print("\n\\* a sync=none job on both sides (fleecefs runs before 2026-12-01: a full backup limited to "
      "1 KiB/s), so every guest write to an uncopied cluster pays the copy-before-write.\n")

print("## Full backup under load: how long it took (s, median)\n")
print("| workload | qsd | fleecefs |")
print("|---|---|---|")
for wl in wls:
    print(f"| {names[wl]} | {cell(qsd, 'fuse+full', wl, 'backup_s') or 0:.2f} | {cell(fl, 'fuse+full', wl, 'backup_s') or 0:.2f} |")

print("\n## Idle full backup of the image (s, median over repetitions)\n")
print("| method | qsd run | fleecefs run |")
print("|---|---|---|")
methods = []
for r in qidle + fidle:
    if r["method"] not in methods:
        methods.append(r["method"])
for m in methods:
    q = med(r["seconds"] for r in qidle if r["method"] == m and r["rc"] == "0")
    f = med(r["seconds"] for r in fidle if r["method"] == m and r["rc"] == "0")
    label = {"fuse-backup": "the layer's own full backup job"}.get(m, m)
    print(f"| {label} | {q or 0:.2f} | {f or 0:.2f} |")
qi = med(r["seconds"] for r in fidle if r["method"] == "qemu-img" and r["rc"] == "0")
fb = med(r["seconds"] for r in fidle if r["method"] == "fuse-backup" and r["rc"] == "0")
if qi and fb:
    print(f"\nfleecefs full backup / qemu-img convert (same run): {fb / qi:.2f}")
