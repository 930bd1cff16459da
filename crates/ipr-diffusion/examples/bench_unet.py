#!/usr/bin/env python3
"""Denoising steps per second of diffusers' UNet2DConditionModel on the CPU, for the same configs
and the same step as examples/bench_unet.rs (one UNet forward on 2 x images samples with a 77-token
context, CFG 5, a DDIM update). Run from the repository root:

    /root/venv/bin/python crates/ipr-diffusion/examples/bench_unet.py [--threads N]
"""

import argparse
import json
import os
import time

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {
    "tiny": os.path.join(HERE, "..", "tests", "fixtures", "tiny-sd15", "unet", "config.json"),
    "toy": os.path.join(HERE, "toy_unet_config.json"),
}


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'config':<6} {'images':>7} {'steps/s':>10} {'ms/step':>12}   (torch {torch.__version__}, {args.threads} threads)")
    for name, path in CONFIGS.items():
        with open(path) as f:
            config = json.load(f)
        unet = UNet2DConditionModel.from_config(config).eval()
        s = unet.config.sample_size
        for images in (1, 8):
            sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
            sched.set_timesteps(50)
            x = torch.randn(images, unet.config.in_channels, s, s)
            ctx = torch.randn(2 * images, 77, unet.config.cross_attention_dim)

            def step(i, x):
                t = sched.timesteps[i]
                out = unet(torch.cat([x, x]), t, ctx).sample
                u, c = out.chunk(2)
                return sched.step(u + 5.0 * (c - u), t, x).prev_sample

            x = step(0, x)
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < 3.0 and n < 49:
                x = step(n + 1, x)
                n += 1
            per = (time.perf_counter() - start) / n
            print(f"{name:<6} {images:>7} {1 / per:>10.2f} {per * 1e3:>12.1f}")


if __name__ == "__main__":
    main()
