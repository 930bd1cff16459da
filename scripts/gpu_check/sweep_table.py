#!/usr/bin/env python3
"""Markdown table of the last round of toy runs made by toy_run.sh (standard library only).

    python3 scripts/gpu_check/sweep_table.py OUT_DIR ...    # OUT_DIR/<config>/table.txt
    python3 scripts/gpu_check/sweep_table.py wave1.log ...  # toy_run.sh's printed output

One row per run: its last round's seen VISOR_uncond and held-out OA, VISOR_uncond, VISOR_cond,
with the held-out gain over the base model (round 0).
"""
import pathlib
import re
import sys


def tables(path):
    """Yield (name, lines of its table) from a toy_run.sh log or an OUT_DIR."""
    p = pathlib.Path(path)
    if p.is_dir():
        for t in sorted(p.glob("*/table.txt")):
            yield t.parent.name, t.read_text().splitlines()
        return
    name, lines = None, []
    for line in p.read_text().splitlines():
        m = re.match(r"== (\S+)$", line.strip())
        if m:
            if name:
                yield name, lines
            name, lines = m.group(1), []
        elif name:
            lines.append(line)
    if name:
        yield name, lines


def main(paths):
    rows = {}
    for path in paths:
        for name, lines in tables(path):
            cells = [l.split() for l in lines if len(l.split()) == 11 and l.split()[1].isdigit()]
            if not cells:
                continue
            last = max(int(c[1]) for c in cells)
            get = {(int(c[1]), c[2]): c for c in cells}
            if (last, "heldout") not in get or (0, "heldout") not in get:
                continue
            seen, held, base = get[(last, "seen")], get[(last, "heldout")], get[(0, "heldout")]
            rows[name] = (held[0], last, float(seen[4]), float(held[3]), float(held[4]),
                          float(held[4]) - float(base[4]), float(held[5]))
    print("| config | method | round | seen VISOR_uncond | held-out OA | held-out VISOR_uncond | gain | held-out VISOR_cond |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in sorted(rows):
        m, r, s, oa, u, g, c = rows[name]
        print(f"| {name} | {m} | {r} | {s:.1f} | {oa:.1f} | {u:.1f} | {g:+.1f} | {c:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
