#!/usr/bin/env python3
"""The headline table of a GPU check results file, as Markdown (for the README beside the JSON).

    python3 scripts/gpu_check/results_table.py scripts/gpu_check/results/<run>.json

One row per check: parity of each tiny pipeline and dtype, the denoising step and the LoRA step
at each size (ipr and diffusers ms, their ratio, peak GPU memory of each: NVML per process, else
the device's used memory over its baseline, else the CPU's peak RSS in a dry run), the op
self-test and the gradient exchange. The per-op tables: scripts/gpu_check/ops_table.py.
"""

import json
import sys


def mem(m):
    if not m:
        return "n/a"
    for key in ("gpu_process_peak_mib", "gpu_device_peak_over_baseline_mib", "cpu_peak_rss_mib"):
        if m.get(key):
            return f"{m[key]:,.0f} MiB"
    return "n/a"


def ms(v):
    return f"{v:.1f}" if isinstance(v, (int, float)) else "n/a"


def main(path):
    with open(path) as f:
        r = json.load(f)
    s = r.get("sections", {})
    gpu = r.get("gpu") or {}
    out = [f"Run: {r.get('mode')} on {gpu.get('name', r.get('host', '?'))}, {r.get('started_utc')}, "
           f"{r.get('elapsed_s')} s, {r.get('ipr_version', 'ipr ?')} "
           f"(commit {(r.get('ipr_manifest') or {}).get('git_commit', '?')}, features "
           f"{','.join((r.get('ipr_manifest') or {}).get('cargo_features', []))}); ok: {r.get('ok')}"]
    if r.get("ipr_env"):
        out.append(f"ipr ran with {r['ipr_env']} after its self-test failed with the project's kernels.")
    out += ["", "| check | ipr | diffusers | ipr / diffusers | result |", "| --- | ---: | ---: | ---: | --- |"]
    for key, e in s.get("parity", {}).items():
        c = e.get("compare", {})
        out.append(f"| parity {key}, rel. max diff | | | | {c.get('rel_max_diff', float('nan')):.1e} "
                   f"(tolerance {c.get('tolerance', float('nan')):.0e}) {'OK' if c.get('ok') else 'FAIL'} |")
    for kind, label in (("denoise", "denoising step"), ("train", "LoRA step")):
        for size, e in s.get(kind, {}).items():
            i, d = e.get("ipr", {}), e.get("diffusers", {})
            extra = f"batch {e['batch']}, " if kind == "train" else ""
            ratio = e.get("ipr_over_diffusers")
            parity = e.get("compare", {}).get("rel_max_diff")
            result = f"parity {parity:.1e}" if parity is not None else ""
            if i.get("error") or d.get("error"):
                result = "ipr: " + (i.get("error") or "ok")[:80] + "; diffusers: " + (d.get("error") or "ok")[:80]
            out.append(f"| {label} {size} ({extra}{e.get('dtype') or e.get('dtype_base')}), ms | {ms(i.get('ms_per_step'))} "
                       f"| {ms(d.get('ms_per_step'))} | {f'{ratio:.2f}' if ratio else 'n/a'} | {result} |")
            out.append(f"| {label} {size}, peak memory | {mem(i.get('memory'))} | {mem(d.get('memory'))} | | |")
    for dt, e in s.get("selftest", {}).items():
        checks = e.get("checks") or []
        worst = max((c["rel_max_diff"] for c in checks), default=float("nan"))
        bad = sum(1 for c in checks if not c["ok"]) + len(e.get("errors") or [])
        out.append(f"| op self-test {dt} ({len(checks)} checks, tolerance {e.get('tolerance', float('nan')):.0e}) | "
                   f"worst {worst:.1e} | | | {'OK' if e.get('ok') else f'{bad} failed'} |")
    c = s.get("collective")
    if c:
        out.append(f"| gradient exchange ({'NCCL' if c.get('nccl_in_binary') else 'host'}) vs host, adapters | | | | "
                   f"{'equal' if c.get('adapters_equal') else 'DIFFER'} |")
    for k in ("skipped", "failures"):
        for x in r.get(k, []):
            out.append(f"\n{k[:-1] if k == 'failures' else 'skipped'}: {x['where']}: {x['why'][:200]}")
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
