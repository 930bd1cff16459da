#!/usr/bin/env python3
"""The per-op tables of a GPU check results file, as Markdown (for the README beside it).

    python3 scripts/gpu_check/ops_table.py scripts/gpu_check/results/<run>.json

One table per profiled step (`sections.ops.<size>.<denoise|train>`, from `ipr bench ...
--profile-ops`): each op kind's calls and milliseconds per step and its share of the profiled step
(every op timed between device synchronisations, so the step is a little slower than the timed
one; `(untimed)` is what no op covers: elementwise ops, candle's backward of primitive ops, the
optimizer, the scheduler). Then the op self-test's worst differences, if the file has them.
"""

import json
import sys


def main(path):
    with open(path) as f:
        r = json.load(f)
    sections = r.get("sections", {})
    out = []
    for size, kinds in sections.get("ops", {}).items():
        for kind, t in kinds.items():
            step = t.get("ms_profiled_step") or 0.0
            out.append(f"### {size} {kind}: profiled step {step:.1f} ms\n")
            out.append("| op | calls | ms | share |")
            out.append("| --- | ---: | ---: | ---: |")
            for o in t.get("ops") or []:
                share = 100.0 * o["ms"] / step if step else float("nan")
                out.append(f"| {o['op']} | {o['calls']} | {o['ms']:.2f} | {share:.1f}% |")
            out.append("")
    for dt, s in sections.get("selftest", {}).items():
        checks = s.get("checks") or []
        if not checks:
            continue
        worst = sorted(checks, key=lambda c: -c["rel_max_diff"])[:5]
        out.append(f"### op self-test, {dt} (tolerance {s.get('tolerance', float('nan')):.0e}): "
                   f"{'passed' if s.get('ok') else 'FAILED'}, {len(checks)} checks\n")
        out.append("| case | output | rel. max diff | ok |")
        out.append("| --- | --- | ---: | --- |")
        for c in worst:
            out.append(f"| {c['case']} | {c['output']} | {c['rel_max_diff']:.2e} | {'yes' if c['ok'] else 'NO'} |")
        for case, err in s.get("errors") or []:
            out.append(f"| {case} | error | {err} | NO |")
        out.append("")
    print("\n".join(out) if out else "no op tables or self-test in " + path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
