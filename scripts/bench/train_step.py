#!/usr/bin/env python3
"""One LoRA training step of diffusers' UNet2DConditionModel on the CPU: the PyTorch twin of
`ipr bench train-step` (crates/ipr-diffusion/src/train/bench.rs), same config and settings:
rank-4 PEFT adapters (lora_alpha 4, init "gaussian" as diffusers' LoRA script) on to_q, to_k,
to_v, to_out.0; random inputs of the UNet's sample size; 8 text tokens of the cross-attention
width; per-sample timesteps (DDPM linear betas) and weights (1, 0.5, ...); loss =
sum_i w_i mse_i / batch; backward; clip_grad_norm_(1.0); AdamW(lr 1e-4, diffusers' defaults); fp32.

    /root/venv/bin/python scripts/bench/train_step.py --unet UNET_DIR_OR_CONFIG --batch 8 --iters 5 \
        --threads 2 --json
prints {"ms_per_step": median}.
"""

import argparse
import json
import os
import statistics
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--unet", required=True, help="a UNet folder (config.json) or a config file")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = args.unet if os.path.isfile(args.unet) else os.path.join(args.unet, "config.json")
    with open(path) as f:
        config = json.load(f)
    unet = UNet2DConditionModel.from_config(config)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    sched = DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
    c = unet.config
    s, b = c.sample_size, args.batch
    weights = torch.tensor([1.0 if j % 2 == 0 else 0.5 for j in range(b)])
    times, fwd_times = [], []
    for i in range(args.iters + 1):
        x0 = torch.randn(b, c.in_channels, s, s)
        noise = torch.randn_like(x0)
        ctx = torch.randn(b, 8, c.cross_attention_dim)
        t = torch.tensor([(j * 997 + i * 131) % 1000 for j in range(b)])
        start = time.perf_counter()
        noisy = sched.add_noise(x0, noise, t)
        pred = unet(noisy, t, ctx).sample
        mse = ((pred.float() - noise.float()) ** 2).mean(dim=list(range(1, pred.ndim)))
        loss = (weights * mse).sum() / b
        fwd = (time.perf_counter() - start) * 1e3
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        ms = (time.perf_counter() - start) * 1e3
        if i > 0:
            times.append(ms)
            fwd_times.append(fwd)
    out = {"ms_per_step": statistics.median(times), "ms_steps": times,
           "ms_forward": statistics.median(fwd_times),
           "ms_backward_and_update": statistics.median([t - f for t, f in zip(times, fwd_times)]), "batch": b,
           "lora_parameters": sum(p.numel() for p in params), "threads": args.threads,
           "torch": torch.__version__}
    print(json.dumps(out) if args.json else out)


if __name__ == "__main__":
    main()
