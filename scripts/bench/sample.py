#!/usr/bin/env python3
"""The diffusers twin of `ipr bench sample`: text-to-image denoising steps per second of a pipeline
folder's UNet in f32 on the CPU, `batch` images with classifier-free guidance (one UNet call on
2 x batch samples per step), the folder's DDIM scheduler; text embeddings are random (the speed does
not depend on them). Run from the repository root:

    python scripts/bench/sample.py [--model models/toy-base] [--batch 64] [--steps 10] [--threads N] [--json]
"""

import argparse
import json
import os
import statistics
import time

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/toy-base")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(args.model, "unet")).eval()
    sched = DDIMScheduler.from_pretrained(os.path.join(args.model, "scheduler"))
    with open(os.path.join(args.model, "text_encoder", "config.json")) as f:
        tokens = json.load(f)["max_position_embeddings"]
    s, c = unet.config.sample_size, unet.config.in_channels
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2 * args.batch, tokens, unet.config.cross_attention_dim, generator=g)

    def run():
        sched.set_timesteps(args.steps)
        x = torch.randn(args.batch, c, s, s, generator=g) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            u, cnd = unet(inp, t, ctx).sample.chunk(2)
            x = sched.step(u + args.guidance * (cnd - u), t, x).prev_sample
        return x

    run()
    runs = []
    for _ in range(max(args.iters, 1)):
        start = time.perf_counter()
        run()
        runs.append(time.perf_counter() - start)
    report = {
        "steps_per_s": args.steps / statistics.median(runs),
        "s_runs": runs,
        "batch": args.batch,
        "steps": args.steps,
        "threads": args.threads,
        "torch": torch.__version__,
    }
    print(json.dumps(report) if args.json else report)


if __name__ == "__main__":
    main()
