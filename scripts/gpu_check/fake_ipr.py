#!/usr/bin/env python3
"""A stand-in for the ipr binary, for testing gpu_check.py's own plumbing only (never a result):
it answers the `--help` texts of the commands gpu_check uses and implements `sample` and
`bench train-step` with diffusers (via gpu_check's workers), so every ipr-side path of the
harness -- flag detection, child processes, memory polling, latents files, comparisons, JSON
parsing, timing by difference -- runs on a machine whose ipr lacks those commands:

    bash scripts/gpu_check/run.sh --dry-run --ipr scripts/gpu_check/fake_ipr.py

The results JSON then records ipr_version "fake" and the comparisons are exact by construction.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check  # noqa: E402

TOP = """Usage: ipr <COMMAND>

Commands:
  sample   Sample images (fake: diffusers)
  bench    Benchmarks
  help     Print this message
"""
BENCH = """Usage: ipr bench <COMMAND>

Commands:
  train-step  One LoRA training step (fake: diffusers + peft)
  help        Print this message
"""


def main():
    argv = sys.argv[1:]
    if argv in ([], ["--help"]):
        print(TOP)
        return 0
    if argv == ["--version"]:
        print("ipr fake (scripts/gpu_check/fake_ipr.py)")
        return 0
    if argv[0] == "sample":
        ap = argparse.ArgumentParser(prog="ipr sample")
        for flag in ("--model", "--prompt", "--negative-prompt", "--scheduler", "--latents", "--output-latents"):
            ap.add_argument(flag)
        ap.add_argument("--steps", type=int, default=50)
        ap.add_argument("--guidance", type=float, default=7.5)
        ap.add_argument("--device", default="cpu")
        ap.add_argument("--dtype", default=None)
        a = ap.parse_args(argv[1:])
        dtype = a.dtype or ("f32" if a.device == "cpu" else "bf16")
        gpu_check.worker_sample({"model": a.model, "device": a.device, "dtype": dtype, "steps": a.steps,
                                 "latents_in": a.latents, "latents_out": a.output_latents})
        return 0
    if argv[0] == "bench":
        if argv[1:] in ([], ["--help"]):
            print(BENCH)
            return 0
        if argv[1] == "train-step":
            ap = argparse.ArgumentParser(prog="ipr bench train-step")
            ap.add_argument("--unet")
            ap.add_argument("--batch", type=int, default=1)
            ap.add_argument("--iters", type=int, default=5)
            ap.add_argument("--json", action="store_true")
            ap.add_argument("--device", default="cpu")
            ap.add_argument("--dtype", default=None)
            a = ap.parse_args(argv[2:])
            dtype = a.dtype or ("f32" if a.device == "cpu" else "bf16")
            r = gpu_check.worker_train({"unet_dir": a.unet, "device": a.device, "dtype": dtype, "batch": a.batch,
                                        "iters": a.iters, "warmup": 1})
            print(json.dumps({"ms_per_step": r["ms_per_step"]}))
            return 0
    print(f"fake ipr: unknown command {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
