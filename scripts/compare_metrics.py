"""Compare every target's metrics.json between two results directories (before and after a change), leaving out
what differs run to run by nature: timings, speeds, memory peaks, paths, provenance (commit, write time, versions).
Nested values are compared by their dotted path; a target whose keys were renamed or regrouped is compared by the
multiset of its numeric values. Exit 1 when any value differs.

    python scripts/compare_metrics.py results_before results_after
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

RUN_TO_RUN = re.compile(r"(seconds|_per_s|per_second|speedup|runtime|elapsed|peak|rss|_mb$|wall_s|written_at|"
                        r"git_commit|^version_|(^|\.)version_|_path$|^merged$|^converter|source|_dir$)")


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def kept(m: dict) -> dict:
    return {k: v for k, v in flat(m).items() if not RUN_TO_RUN.search(k)}


def numbers(m: dict) -> Counter:
    return Counter(round(v, 9) for v in m.values() if isinstance(v, (int, float)) and not isinstance(v, bool))


def compare(before: dict, after: dict) -> list[str]:
    """The differences between two metrics.json files, outside run-to-run keys; [] when none."""
    a, b = kept(before), kept(after)
    diffs = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    if a.keys() != b.keys():  # renamed or regrouped keys: their numeric values must still be the same ones
        na = numbers({k: a[k] for k in a.keys() - b.keys()})
        nb = numbers({k: b[k] for k in b.keys() - a.keys()})
        if na - nb:
            diffs.append(f"values of renamed keys differ: {sorted((na - nb).elements())[:5]} became "
                         f"{sorted((nb - na).elements())[:5]}")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    a = p.parse_args(argv)
    bad = 0
    files = sorted(a.before.rglob("metrics.json"))
    for f in files:
        rel = f.relative_to(a.before)
        g = a.after / rel
        if not g.is_file():
            print(f"{rel.parent}: missing after")
            bad += 1
            continue
        diffs = compare(json.loads(f.read_text()), json.loads(g.read_text()))
        bad += bool(diffs)
        print(f"{rel.parent}: " + ("same" if not diffs else "; ".join(diffs)[:600]))
    print(f"compare_metrics: {len(files) - bad} of {len(files)} targets the same, {bad} differ")
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
