#!/usr/bin/env python3
"""GPU check: ipr (candle, built with `--features cuda`) vs diffusers on the same GPU, one JSON out.

Run it through run.sh (which finds the CUDA libraries the binary needs and installs missing Python
packages from a wheel folder); see README.md beside this file. Sections:

  parity      the repo's tiny parity pipelines (crates/ipr-diffusion/tests/fixtures/tiny-*):
              `ipr sample --latents IN --output-latents OUT` vs diffusers' pipeline from the same
              latents (DDIM, 4 steps, CFG 5, a negative prompt), in bf16 (and f32 where ipr takes
              --dtype), compared with the tolerances in TOLERANCE.
  denoise     ms per denoising step (one UNet forward on 2 samples for CFG + a DDIM update) for a
              toy-size pixel pipeline and an SD-2.1-size latent pipeline (random weights, 768 px,
              96x96 latents), measured as the difference between a long and a short run divided
              by the extra steps (load and start-up cancel out), ipr and diffusers alike; the short
              runs are also compared (parity at full size).
  train       one LoRA training step (rank 4 on to_q/to_k/to_v/to_out.0, AdamW, frozen base in
              bf16, LoRA and optimizer in f32, random inputs, 8 text tokens): `ipr bench
              train-step --json` vs diffusers + peft, toy size and SD-2.1 size; median ms/step.
  selftest    `ipr selftest --device cuda --dtype f32|bf16 --json`: every layer op, forward and
              backward, on the GPU against the same op on the CPU in f64 (inside the binary).
  ops         where a step's time goes, op by op: `ipr bench sample --profile-ops` (SD-2.1 size
              denoising step) and the train section's `ipr bench train-step --profile-ops` (each op
              timed between device synchronisations, in extra steps after the timed ones).
  memory      every ipr and diffusers run is a child process whose GPU memory is polled (NVML via
              pynvml, else nvidia-smi) -- the same measure for both; diffusers also reports
              torch.cuda.max_memory_allocated.

--dry-run runs everything on the CPU with tiny sizes (f32, memory = peak RSS), exercising every
path except the GPU itself. The orchestrator never touches CUDA: the diffusers side runs in
`--worker` child processes of this same file.
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))

PROMPT = "a photo of a red cube to the left of a blue sphere"
NEGATIVE = "blurry, bad quality"
# max|ipr - diffusers| / max|diffusers| allowed for the final latents, per dtype: bf16 has an 8-bit
# mantissa (~4e-3 per rounding) and the two engines round at different places over several steps;
# f32 on the GPU differs only by kernel summation order (TF32 is switched off in diffusers; candle
# does not use it for f32 unless told); f32 on the CPU is what the repo's parity tests hold (1e-4).
TOLERANCE = {"bf16": 5e-2, "f16": 1e-2, "f32": 1e-3, "f32-cpu": 1e-4}
TORCH_DTYPE = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


def log(msg):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Memory polling of a child process (the same measure for ipr and diffusers)
# ---------------------------------------------------------------------------------------------

class MemPoller:
    """Peak memory of one child process while it runs. GPU: NVML per-process usage when the pid is
    visible (else device used memory minus the baseline before the start); CPU: peak VmRSS."""

    def __init__(self, gpu, interval=0.05):
        self.gpu, self.interval = gpu, interval
        self.nvml = None
        self.source = "rss"
        if gpu:
            try:
                import pynvml  # nvidia-ml-py
                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                self.source = "nvml"
            except Exception:
                self.source = "nvidia-smi" if shutil.which("nvidia-smi") else "none"

    def _device_used_mib(self):
        if self.nvml:
            return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20
        if self.source == "nvidia-smi":
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(out.strip().splitlines()[0])
        return None

    def _proc_mib(self, pid):
        if self.nvml:
            try:
                for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                    if p.pid == pid and p.usedGpuMemory is not None:
                        return p.usedGpuMemory / 2**20
            except Exception:
                return None
        return None

    def _rss_mib(self, pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:") or line.startswith("VmRSS:"):
                        kb = int(line.split()[1])
                        if line.startswith("VmHWM:"):
                            return kb / 1024
        except OSError:
            return None
        return None

    def start(self, pid):
        self.pid, self.stop_flag = pid, False
        self.peak_proc = self.peak_dev = self.peak_rss = None
        self.baseline = self._device_used_mib() if self.gpu else None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop_flag:
            self.sample()
            time.sleep(self.interval)

    def sample(self):
        try:
            if self.gpu:
                d = self._device_used_mib()
                if d is not None:
                    self.peak_dev = max(self.peak_dev or 0.0, d)
                p = self._proc_mib(self.pid)
                if p is not None:
                    self.peak_proc = max(self.peak_proc or 0.0, p)
            r = self._rss_mib(self.pid)
            if r is not None:
                self.peak_rss = max(self.peak_rss or 0.0, r)
        except Exception:
            pass

    def stop(self):
        self.stop_flag = True
        self.thread.join(timeout=5)
        out = {"source": self.source}
        if self.gpu:
            out["gpu_process_peak_mib"] = round(self.peak_proc, 1) if self.peak_proc else None
            if self.peak_dev is not None and self.baseline is not None:
                out["gpu_device_peak_over_baseline_mib"] = round(self.peak_dev - self.baseline, 1)
        out["cpu_peak_rss_mib"] = round(self.peak_rss, 1) if self.peak_rss else None
        return out


def run_child(cmd, gpu, timeout, env=None):
    """Runs a child, polling its memory. Returns dict(rc, wall_s, memory, stdout, stderr)."""
    poller = MemPoller(gpu)
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    except OSError as e:
        return {"rc": None, "error": str(e), "wall_s": 0.0, "memory": None, "stdout": "", "stderr": str(e)}
    poller.start(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        rc, err = "timeout", (err or "") + f"\n[killed after {timeout} s]"
    poller.sample()
    wall = time.perf_counter() - t0
    return {"rc": rc, "wall_s": round(wall, 3), "memory": poller.stop(), "stdout": out, "stderr": err}


def tail(s, n=1500):
    s = (s or "").strip()
    return s[-n:]


# ---------------------------------------------------------------------------------------------
# The ipr side
# ---------------------------------------------------------------------------------------------

class Ipr:
    def __init__(self, path):
        self.path = path
        # A .py path (fake_ipr.py, the harness self-test) runs with this Python.
        self.cmd = [sys.executable, path] if path.endswith(".py") else [path]
        self._help = {}

    def help(self, *sub):
        if sub not in self._help:
            try:
                r = subprocess.run([*self.cmd, *sub, "--help"], capture_output=True, text=True, timeout=60)
                self._help[sub] = r.stdout if r.returncode == 0 else None
            except OSError:
                self._help[sub] = None
        return self._help[sub]

    def has_command(self, *sub):
        parent = self.help(*sub[:-1])
        if not parent:
            return False
        return re.search(rf"^\s+{re.escape(sub[-1])}\s", parent, re.M) is not None

    def missing_flags(self, sub, flags):
        h = self.help(*sub) or ""
        return [f for f in flags if not re.search(rf"{re.escape(f)}\b", h)]


def latents_file_write(path, tensor):
    from safetensors.torch import save_file
    save_file({"latents": tensor.float().contiguous().cpu()}, path)


def latents_file_read(path):
    from safetensors.torch import load_file
    return load_file(path)["latents"].float()


def compare(a_path, b_path, tol):
    a, b = latents_file_read(a_path), latents_file_read(b_path)
    if a.shape != b.shape:
        return {"ok": False, "error": f"shapes differ: ipr {list(a.shape)} vs diffusers {list(b.shape)}"}
    finite = bool(a.isfinite().all() and b.isfinite().all())
    scale = float(b.abs().max()) or 1.0
    max_abs = float((a - b).abs().max())
    mean_abs = float((a - b).abs().mean())
    rel = max_abs / scale
    return {"ok": finite and rel <= tol, "finite": finite, "max_abs_diff": max_abs, "mean_abs_diff": mean_abs,
            "max_abs_ref": scale, "rel_max_diff": rel, "tolerance": tol, "shape": list(a.shape)}


SAMPLE_FLAGS = ["--model", "--prompt", "--negative-prompt", "--steps", "--guidance", "--scheduler",
                "--latents", "--output-latents", "--device"]


def ipr_sample(ipr, model, latents_in, latents_out, steps, device, dtype, gpu, timeout, use_dtype_flag):
    cmd = [*ipr.cmd, "sample", "--model", model, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
           "--steps", str(steps), "--guidance", "5.0", "--scheduler", "ddim", "--latents", latents_in,
           "--output-latents", latents_out, "--device", device]
    if use_dtype_flag:
        cmd += ["--dtype", dtype]
    r = run_child(cmd, gpu, timeout)
    r["cmd"] = " ".join(cmd)
    return r


# ---------------------------------------------------------------------------------------------
# Workers (child processes that import torch / diffusers)
# ---------------------------------------------------------------------------------------------

def torch_setup(spec):
    import torch
    if spec["device"] == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.cuda.reset_peak_memory_stats()
    else:
        torch.set_num_threads(spec.get("threads") or os.cpu_count())
    return torch


def torch_mem(torch, spec):
    if spec["device"] != "cuda":
        return {}
    return {"torch_max_memory_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "torch_max_memory_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1)}


def sync(torch, spec):
    if spec["device"] == "cuda":
        torch.cuda.synchronize()


def worker_versions(spec):
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "diffusers", "transformers", "peft", "safetensors", "pynvml"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "present")
        except Exception as e:
            out[name] = None
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        import torch
        out["torch_cuda"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available() if spec.get("gpu") else None
        if spec.get("gpu") and torch.cuda.is_available():
            out["gpu_name"] = torch.cuda.get_device_name(0)
            out["compute_capability"] = list(torch.cuda.get_device_capability(0))
    except Exception:
        pass
    return out


def worker_build(spec):
    """A diffusers pipeline folder with a random UNet of the given config, a 1-layer random CLIP text
    encoder of the UNet's cross-attention width, the template's tokenizer and scheduler, and (latent
    pipelines) a small random 4-level VAE (scale factor 8, as SD's). Also a unet-only folder."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(spec.get("seed", 0))
    with open(spec["unet_config"]) as f:
        cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    init_dev = "cuda" if spec["device"] == "cuda" else "cpu"
    with torch.device(init_dev):
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to("cpu")
    template = spec["template"]
    with open(os.path.join(template, "text_encoder", "config.json")) as f:
        tcfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    hidden = cfg["cross_attention_dim"]
    heads = next(h for h in (16, 8, 4, 2, 1) if hidden % h == 0)
    tcfg.update(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads, intermediate_size=2 * hidden)
    tcfg.pop("architectures", None)
    tcfg.pop("dtype", None)
    tcfg.pop("transformers_version", None)
    tcfg.pop("model_type", None)
    te = CLIPTextModel(CLIPTextConfig(**tcfg))
    tok = CLIPTokenizer.from_pretrained(os.path.join(template, "tokenizer"))
    sched = DDIMScheduler.from_pretrained(os.path.join(template, "scheduler"))
    vae = None
    if spec["kind"] == "latent":
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg["in_channels"],
                            block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=cfg["sample_size"] * 8)
    if cfg.get("addition_embed_type") == "text_time":
        # SDXL: two text encoders whose widths add up to the cross-attention width, the second's
        # projection the pooled embedding of the added conditioning (1280 + 6 x 256 = 2816).
        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPTextModelWithProjection
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        te = CLIPTextModel(CLIPTextConfig(**dict(tcfg, hidden_size=hidden - pooled, intermediate_size=2 * (hidden - pooled),
                                                 num_attention_heads=next(h for h in (16, 8, 4, 2, 1) if (hidden - pooled) % h == 0))))
        with open(os.path.join(template, "text_encoder_2", "config.json")) as f:
            t2 = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        for key in ("architectures", "dtype", "transformers_version", "model_type"):
            t2.pop(key, None)
        t2.update(hidden_size=pooled, projection_dim=pooled, num_hidden_layers=1, intermediate_size=2 * pooled,
                  num_attention_heads=next(h for h in (16, 8, 4, 2, 1) if pooled % h == 0))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**t2))
        tok2 = CLIPTokenizer.from_pretrained(os.path.join(template, "tokenizer_2"))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                         unet=unet, scheduler=sched, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if spec.get("save_dtype") == "bf16":
        pipe.unet.to(torch.bfloat16)  # SDXL size: 5 GB on disk instead of 10 (the GPU runs read bf16)
    pipe.save_pretrained(spec["out"], safe_serialization=True)
    n = sum(p.numel() for p in unet.parameters())
    return {"unet_parameters": n, "folder": spec["out"]}


def load_pipe(spec, torch):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    model = spec["model"]
    xl = os.path.isdir(os.path.join(model, "text_encoder_2"))
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    dtype = getattr(torch, TORCH_DTYPE[spec["dtype"]])
    extra = {} if xl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if not os.path.isdir(os.path.join(model, "vae")):
        extra["vae"] = None
    pipe = cls.from_pretrained(model, torch_dtype=dtype, **extra).to(spec["device"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def worker_sample(spec):
    """diffusers' pipeline from given latents (parity), then the per-step time by difference."""
    torch = torch_setup(spec)
    pipe = load_pipe(spec, torch)
    lat = latents_file_read(spec["latents_in"]).to(spec["device"], getattr(torch, TORCH_DTYPE[spec["dtype"]]))
    size = lat.shape[-1]
    hw = size * (pipe.vae_scale_factor if pipe.vae is not None else 1)

    stamps = []

    def on_step_end(_pipe, _i, _t, kwargs):
        sync(torch, spec)
        stamps.append(time.perf_counter())
        return kwargs

    @torch.no_grad()
    def run(steps, callback=None):
        return pipe([PROMPT] * lat.shape[0], negative_prompt=[NEGATIVE] * lat.shape[0], num_inference_steps=steps,
                    guidance_scale=5.0, height=hw, width=hw, latents=lat.clone(), output_type="latent",
                    callback_on_step_end=callback).images

    out = run(spec["steps"])
    latents_file_write(spec["latents_out"], out)
    res = {"dtype": spec["dtype"]}
    if spec.get("time_steps"):
        lo, hi = spec["time_steps"]
        run(lo)  # warm-up
        times = {}
        for steps in (lo, hi, lo, hi):
            sync(torch, spec)
            t0 = time.perf_counter()
            run(steps)
            sync(torch, spec)
            times.setdefault(steps, []).append(time.perf_counter() - t0)
        # The same measure as ipr's (whole runs, by difference), and a cross-check: the median
        # interval between step ends of one long run (synchronised at each step).
        res["ms_per_step"] = 1e3 * (min(times[hi]) - min(times[lo])) / (hi - lo)
        res["seconds"] = {str(k): v for k, v in times.items()}
        run(hi, on_step_end)
        res["ms_per_step_callback_median"] = 1e3 * statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    res.update(torch_mem(torch, spec))
    return res


def worker_train(spec):
    """One LoRA training step of diffusers' UNet (+ peft when present), the settings of
    `ipr bench train-step` and its CPU twin scripts/bench/train_step.py: rank 4 (alpha 4, gaussian
    init) on to_q/to_k/to_v/to_out.0, random inputs of the UNet's sample size, 8 text tokens,
    per-sample timesteps and weights, weighted MSE, grad clipping 1.0, AdamW lr 1e-4; the frozen
    base in `dtype` (bf16 on the GPU), LoRA, optimizer state and loss in f32."""
    torch = torch_setup(spec)
    from diffusers import UNet2DConditionModel
    dev = spec["device"]
    dtype = getattr(torch, TORCH_DTYPE[spec["dtype"]])
    unet = UNet2DConditionModel.from_pretrained(spec["unet_dir"], torch_dtype=dtype).to(dev)
    unet.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    try:
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
        lora_impl = "peft"
    except ImportError:
        lora_impl = "manual (peft missing)"
        import torch.nn as nn

        class LoRALinear(nn.Module):
            def __init__(self, base):
                super().__init__()
                self.base = base
                self.A = nn.Linear(base.in_features, 4, bias=False, device=dev)
                self.B = nn.Linear(4, base.out_features, bias=False, device=dev)
                nn.init.normal_(self.A.weight, std=0.25)
                nn.init.zeros_(self.B.weight)

            def forward(self, x):
                return self.base(x) + self.B(self.A(x.to(self.A.weight.dtype))).to(x.dtype)

        for name, mod in list(unet.named_modules()):
            for child_name, child in list(mod.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, nn.Linear) and any(full.endswith(t) for t in targets):
                    setattr(mod, child_name, LoRALinear(child))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # LoRA and optimizer state in f32
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
    cfg = unet.config
    b, s = spec["batch"], cfg.sample_size
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(b, cfg.in_channels, s, s, generator=g).to(dev)
    noise = torch.randn(b, cfg.in_channels, s, s, generator=g).to(dev)
    ctx = torch.randn(b, 8, cfg.cross_attention_dim, generator=g).to(dev, dtype)
    t = torch.tensor([(j * 997 + 131) % 1000 for j in range(b)]).to(dev)
    weights = torch.tensor([1.0 if j % 2 == 0 else 0.5 for j in range(b)], device=dev)
    added = None
    if cfg.addition_embed_type == "text_time":
        # SDXL, as `ipr bench train-step` passes it: a random pooled embedding, a square image's time ids.
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        px = float(s * 8)
        added = {"text_embeds": torch.randn(b, pooled, generator=g).to(dev, dtype),
                 "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]] * b).to(dev, dtype)}

    def step():
        # as scripts/bench/train_step.py (the CPU twin of `ipr bench train-step`), on `dev` in `dtype`:
        # DDPM noising, per-sample weighted MSE in f32, clip_grad_norm_(1.0), AdamW
        noisy = sched.add_noise(x0, noise, t).to(dtype)
        pred = unet(noisy, t, ctx, added_cond_kwargs=added).sample
        mse = ((pred.float() - noise) ** 2).mean(dim=list(range(1, pred.ndim)))
        loss = (weights * mse).sum() / b
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(spec.get("warmup", 2)):
        step()
    times = []
    for _ in range(spec["iters"]):
        sync(torch, spec)
        t0 = time.perf_counter()
        step()
        sync(torch, spec)
        times.append(time.perf_counter() - t0)
    res = {"ms_per_step": 1e3 * statistics.median(times), "ms_all": [round(1e3 * v, 3) for v in times],
           "lora": lora_impl, "trainable_parameters": sum(p.numel() for p in params), "dtype": spec["dtype"]}
    res.update(torch_mem(torch, spec))
    return res


def worker_prepare(spec):
    """One process for the cheap things (Python imports are slow on small machines): the versions,
    then each random pipeline of spec["builds"]."""
    res = {"versions": worker_versions(spec), "builds": {}}
    if not res["versions"].get("diffusers"):
        return res
    for name, b in spec.get("builds", {}).items():
        t0 = time.perf_counter()
        try:
            r = worker_build(dict(b, device=spec["device"]))
            r["ok"] = True
        except Exception as e:
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1500]}
        r["wall_s"] = round(time.perf_counter() - t0, 2)
        res["builds"][name] = r
    return res


def worker_parity(spec):
    """diffusers on each tiny fixture of spec["jobs"], in one process."""
    out = {}
    for job in spec["jobs"]:
        t0 = time.perf_counter()
        try:
            r = worker_sample(dict(job, device=spec["device"]))
            r["ok"] = True
        except Exception as e:
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1500]}
        r["wall_s"] = round(time.perf_counter() - t0, 2)
        out[job["key"]] = r
    return out


WORKERS = {"prepare": worker_prepare, "parity": worker_parity, "sample": worker_sample, "train": worker_train}


def run_worker(name, spec, gpu, timeout, workdir):
    out = os.path.join(workdir, f"worker-{name}-{time.time_ns()}.json")
    spec = dict(spec, result=out)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--spec", json.dumps(spec)]
    r = run_child(cmd, gpu, timeout)
    res = {"wall_s": r["wall_s"], "memory": r["memory"]}
    if r["rc"] == 0 and os.path.exists(out):
        with open(out) as f:
            res.update(json.load(f))
        res["ok"] = True
    else:
        res.update(ok=False, rc=r["rc"], error=tail(r["stderr"]) or tail(r["stdout"]))
    return res


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------

def gpu_info():
    if not shutil.which("nvidia-smi"):
        return None
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or not r.stdout.strip():
        return None
    name, driver, mem, cc = [s.strip() for s in r.stdout.strip().splitlines()[0].split(",")]
    return {"name": name, "driver": driver, "memory_total": mem, "compute_cap": cc}


class Budget:
    """`seconds`: no section starts after it; `hard`: no child process outlives it (it is killed),
    so the whole check ends by then (the 8-minute limit on a GPU)."""

    def __init__(self, seconds, hard):
        self.t0, self.seconds, self.hard = time.perf_counter(), seconds, hard

    def elapsed(self):
        return time.perf_counter() - self.t0

    def left(self):
        return self.seconds - self.elapsed()

    def child(self):
        return max(15.0, self.hard - self.elapsed())


def log_ops(what, report):
    """Logs the largest rows of an op table (`ops` of an ipr bench report)."""
    ops = report.get("ops") or []
    step = report.get("ms_profiled_step") or 0.0
    rows = ", ".join(f"{o['op']} {o['ms']:.1f}" for o in ops[:8])
    log(f"ops {what}: profiled step {step:.1f} ms: {rows}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ipr", help="the ipr binary (dist/ipr-cuda on a GPU; a CPU build for --dry-run)")
    ap.add_argument("--out", default="gpu_results.json", help="the one JSON results file")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, f32: every path but the GPU")
    ap.add_argument("--workdir", help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--fixtures", default=os.path.join(REPO, "crates", "ipr-diffusion", "tests", "fixtures"))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no section after this many seconds (default 330 on a GPU, 1800 for --dry-run)")
    ap.add_argument("--hard-s", type=float, default=None,
                    help="kill any child still running at this many seconds (default 450 on a GPU: the check ends "
                         "within 8 minutes; 3000 for --dry-run)")
    ap.add_argument("--sd21-batch", type=int, default=2, help="LoRA step batch at SD-2.1 size (default 2)")
    ap.add_argument("--toy-batch", type=int, default=8, help="LoRA step batch at toy size (default 8)")
    ap.add_argument("--sdxl-batch", type=int, default=1, help="LoRA step batch at SDXL size (default 1)")
    ap.add_argument("--sizes", default="sd21,sdxl,toy",
                    help="model sizes to build and time, of sd21, sdxl, toy (default all; run in that order)")
    ap.add_argument("--iters", type=int, default=None, help="timed LoRA steps (default 10; 2 in --dry-run)")
    ap.add_argument("--strict", action="store_true", help="exit 1 also when a section was skipped")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.spec)
        res = WORKERS[args.worker](spec)
        with open(spec["result"], "w") as f:
            json.dump(res, f)
        return 0

    budget = Budget(args.budget_s or (1800.0 if args.dry_run else 330.0),
                    args.hard_s or (3000.0 if args.dry_run else 450.0))
    gpu = not args.dry_run
    device = "cuda" if gpu else "cpu"
    dtypes = ["bf16"] if gpu else ["f32"]
    iters = args.iters or (10 if gpu else 2)
    tmp_owned = args.workdir is None
    workdir = args.workdir or tempfile.mkdtemp(prefix="ipr-gpu-check-")
    os.makedirs(workdir, exist_ok=True)
    results = {"schema": "ipr-gpu-check/1", "mode": "dry-run (cpu)" if args.dry_run else "gpu",
               "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
               "tolerances_rel_max_abs": TOLERANCE, "sections": {}, "skipped": [], "failures": []}
    S = results["sections"]

    def skip(where, why):
        log(f"SKIP {where}: {why}")
        results["skipped"].append({"where": where, "why": why})

    def fail(where, why):
        log(f"FAIL {where}: {why}")
        results["failures"].append({"where": where, "why": why[-600:]})

    # ---- environment, and the toy-size and SD-2.1-size random pipelines (shared by denoise and train)
    gi = gpu_info()
    results["gpu"] = gi
    if gpu and gi is None:
        fail("environment", "no NVIDIA GPU visible (nvidia-smi failed); use --dry-run on a CPU machine")
    sizes = {
        "toy": {"unet_config": os.path.join(REPO, "crates", "ipr-diffusion", "examples", "toy_unet_config.json"),
                "template": os.path.join(args.fixtures, "tiny-pixel"), "kind": "pixel",
                "batch": args.toy_batch if gpu else 2, "time_steps": [4, 104] if gpu else [2, 6]},
        "sd21": {"unet_config": os.path.join(HERE, "sd21_unet_config.json" if gpu else "sd21_unet_config_dry.json"),
                 "template": os.path.join(args.fixtures, "tiny-sd21"), "kind": "latent",
                 "batch": args.sd21_batch if gpu else 1, "time_steps": [4, 34] if gpu else [2, 6]},
        # Built when its turn comes (2.6 B parameters: not before the SD-2.1 numbers), UNet saved in bf16.
        "sdxl": {"unet_config": os.path.join(HERE, "sdxl_unet_config.json" if gpu else "sdxl_unet_config_dry.json"),
                 "template": os.path.join(args.fixtures, "tiny-sdxl"), "kind": "latent", "lazy": True,
                 "save_dtype": "bf16" if gpu else None,
                 "batch": args.sdxl_batch if gpu else 1, "time_steps": [4, 24] if gpu else [2, 6]},
    }
    sizes = {n: sz for n, sz in sizes.items() if n in args.sizes.split(",")}

    def build_spec(n):
        sz = sizes[n]
        return {"unet_config": sz["unet_config"], "template": sz["template"], "kind": sz["kind"],
                "out": os.path.join(workdir, f"pipe-{n}"), "seed": 0, "save_dtype": sz.get("save_dtype")}

    builds = {n: build_spec(n) for n, sz in sizes.items() if not sz.get("lazy")}
    log(f"python versions and random pipelines ({', '.join(builds)}) ...")
    prep = run_worker("prepare", {"device": device, "gpu": gpu, "builds": builds}, gpu, budget.child(), workdir)
    results["python"] = prep.get("versions", {"ok": False, "error": prep.get("error")})
    have_diffusers = bool(results["python"].get("diffusers")) and bool(results["python"].get("torch"))
    if not have_diffusers:
        skip("diffusers side", "torch/diffusers not importable in this python "
             f"({results['python'].get('diffusers_error') or results['python'].get('torch_error') or prep.get('error')}); "
             "give run.sh --wheels DIR with a diffusers wheel")
    if gpu and have_diffusers and not results["python"].get("cuda_available"):
        fail("environment", "torch sees no CUDA device")
    built = {}

    def record_builds(prep):
        for sname, r in prep.get("builds", {}).items():
            S.setdefault("models", {})[sname] = {k: r.get(k) for k in ("ok", "wall_s", "unet_parameters", "error")}
            S["models"][sname]["unet_config"] = os.path.relpath(sizes[sname]["unet_config"], REPO)
            if r["ok"]:
                built[sname] = r["folder"]
                log(f"built {sname}: {r['unet_parameters'] / 1e6:.2f} M UNet parameters in {r['wall_s']:.1f} s")
            else:
                fail(f"build/{sname}", r.get("error", ""))

    record_builds(prep)

    ipr = Ipr(args.ipr) if args.ipr else None
    if ipr and not ipr.help():
        fail("ipr", f"{args.ipr} does not run (`--help` failed); on a GPU run it through run.sh, which sets LD_LIBRARY_PATH")
        ipr = None
    if ipr is None:
        skip("ipr side", "no runnable ipr binary (--ipr)")
    else:
        manifest = args.ipr + ".manifest.json"
        if os.path.exists(manifest):
            with open(manifest) as f:
                results["ipr_manifest"] = json.load(f)
        v = subprocess.run([*ipr.cmd, "--version"], capture_output=True, text=True).stdout.strip()
        results["ipr_version"] = v
    has_sample = bool(ipr) and ipr.has_command("sample")
    if ipr and not has_sample:
        skip("ipr sample", "this ipr binary has no `sample` command (build a newer one)")
    sample_missing = ipr.missing_flags(("sample",), SAMPLE_FLAGS) if has_sample else []
    if sample_missing:
        skip("ipr sample", f"`ipr sample` lacks flags {sample_missing}")
        has_sample = False
    dtype_flag = has_sample and not ipr.missing_flags(("sample",), ["--dtype"])
    has_train = bool(ipr) and ipr.has_command("bench", "train-step")
    if ipr and not has_train:
        skip("ipr bench train-step", "this ipr binary has no `bench train-step` command")
    train_flags = []
    if has_train:
        miss = ipr.missing_flags(("bench", "train-step"), ["--unet", "--batch", "--iters", "--json"])
        if miss:
            skip("ipr bench train-step", f"lacks flags {miss}")
            has_train = False
        elif gpu:
            if ipr.missing_flags(("bench", "train-step"), ["--device"]):
                skip("ipr bench train-step", "has no --device flag (CPU only): not run on the GPU")
                has_train = False
            else:
                train_flags = ["--device", "cuda"]
                if not ipr.missing_flags(("bench", "train-step"), ["--dtype"]):
                    train_flags += ["--dtype", "bf16"]

    def section_time_ok(name, need):
        if budget.left() < need:
            skip(name, f"time budget: {budget.left():.0f} s left, section needs ~{need} s")
            return False
        return True

    def ipr_json(cmd, where, env=None):
        """Runs an ipr command that prints one JSON line; (parsed dict or None, child result)."""
        r = run_child(cmd, gpu, budget.child(), env=env)
        line = [l for l in r["stdout"].strip().splitlines() if l.strip().startswith("{")]
        try:
            v = json.loads(line[-1]) if line else None
        except json.JSONDecodeError:
            v = None
        if v is None:
            fail(where, f"rc {r['rc']}, no JSON line: " + tail(r["stderr"] or r["stdout"]))
        return v, r

    # ---- (0) the op self-test: each layer op on the device against the CPU in f64. If it fails (or
    # crashes) with the project's CUDA kernels, it runs again without them (IPR_CUDA_KERNELS=0); if
    # the kernels add failures of their own, every later ipr command runs without them too, so a
    # broken kernel costs its own numbers, not the run's.
    def selftest(tag):
        """Runs the self-test in f32 and bf16; returns the failing (dtype, case, output) set, or
        None when it could not run."""
        failing = set()
        for dt in (["f32", "bf16"] if gpu else ["f32"]):
            cmd = [*ipr.cmd, "selftest", "--device", device, "--dtype", dt, "--json"]
            v, r = ipr_json(cmd, f"selftest/{tag}{dt}")
            entry = S.setdefault("selftest", {})[tag + dt] = {"cmd": " ".join(cmd), "rc": r["rc"], "wall_s": r["wall_s"],
                                                              "IPR_CUDA_KERNELS": os.environ.get("IPR_CUDA_KERNELS", "1")}
            if v is None:
                return None
            failing |= {(dt, c["case"], c["output"]) for c in v["checks"] if not c["ok"]}
            failing |= {(dt, c, "error") for c, _ in v["errors"]}
            entry.update(v)
            bad = [f"{c['case']} {c['output']} {c['rel_max_diff']:.2e}" for c in v["checks"] if not c["ok"]]
            bad += [f"{c} error: {e}" for c, e in v["errors"]]
            log(f"selftest {tag}{dt}: {len(v['checks'])} checks, tolerance {v['tolerance']:.0e}, "
                f"worst {max((c['rel_max_diff'] for c in v['checks']), default=float('nan')):.2e}; "
                f"{'OK' if v['ok'] else 'FAIL: ' + '; '.join(bad)}")
            if not v["ok"]:
                fail(f"selftest/{tag}{dt}", "; ".join(bad))
        return failing

    if ipr and ipr.has_command("selftest") and section_time_ok("selftest", 20):
        with_kernels = selftest("")
        if gpu and with_kernels != set():  # failures, or a crash (None)
            # Again without the project's kernels: if they add failures of their own, every later
            # ipr command runs without them; failures that remain without them are candle's.
            os.environ["IPR_CUDA_KERNELS"] = "0"
            without = selftest("kernels-off/")
            if with_kernels is not None and without is not None and with_kernels <= without:
                del os.environ["IPR_CUDA_KERNELS"]
                log("selftest: the same checks fail without the project's kernels: keeping them")
            else:
                results["ipr_env"] = {"IPR_CUDA_KERNELS": "0"}
                new = sorted(with_kernels - (without or set()))
                log(f"selftest: the project's kernels fail {new}: every later ipr command runs without them")
    elif ipr:
        skip("selftest", "this ipr binary has no `selftest` command")

    # ---- (a) parity on the tiny fixtures
    parity = S.setdefault("parity", {})
    fixtures = sorted(d for d in os.listdir(args.fixtures) if d.startswith("tiny-")) if os.path.isdir(args.fixtures) else []
    if not fixtures:
        fail("parity", f"no tiny-* fixtures under {args.fixtures}")
    import torch  # CPU only in this process: latents files and comparisons
    jobs = []
    for name in fixtures:
        folder = os.path.join(args.fixtures, name)
        with open(os.path.join(folder, "unet", "config.json")) as f:
            ucfg = json.load(f)
        size = min(ucfg.get("sample_size", 8), 16)
        g = torch.Generator().manual_seed(7)
        lat_in = os.path.join(workdir, f"{name}-in.safetensors")
        latents_file_write(lat_in, torch.randn(1, ucfg["in_channels"], size, size, generator=g))
        for dt in dtypes + (["f32"] if gpu and dtype_flag else []):
            jobs.append({"key": f"{name}/{dt}", "model": folder, "dtype": dt, "steps": 4, "latents_in": lat_in,
                         "d_out": os.path.join(workdir, f"{name}-{dt}-diffusers.safetensors"),
                         "i_out": os.path.join(workdir, f"{name}-{dt}-ipr.safetensors")})
    for j in jobs:
        j["latents_out"] = j["d_out"]
    dres = {}
    if have_diffusers and jobs and section_time_ok("parity/diffusers", 30):
        log(f"parity: diffusers on {len(jobs)} fixture/dtype pairs ...")
        w = run_worker("parity", {"device": device, "jobs": jobs}, gpu, budget.child(), workdir)
        if not w["ok"]:
            fail("parity/diffusers", w.get("error", ""))
        dres = {k: v for k, v in w.items() if isinstance(v, dict) and "/" in k}
    for j in jobs:
        key = j["key"]
        entry = parity.setdefault(key, {})
        if key in dres:
            entry["diffusers"] = dres[key]
            if not dres[key]["ok"]:
                fail(f"parity/{key}/diffusers", dres[key].get("error", ""))
        if has_sample and section_time_ok(f"parity/{key}/ipr", 10):
            r = ipr_sample(ipr, j["model"], j["latents_in"], j["i_out"], 4, device, j["dtype"], gpu, budget.child(), dtype_flag)
            entry["ipr"] = {"ok": r["rc"] == 0, "wall_s": r["wall_s"], "memory": r["memory"], "cmd": r["cmd"]}
            if r["rc"] != 0:
                entry["ipr"]["error"] = tail(r["stderr"])
                fail(f"parity/{key}/ipr", tail(r["stderr"]))
        if entry.get("diffusers", {}).get("ok") and entry.get("ipr", {}).get("ok"):
            tol = TOLERANCE["f32-cpu" if not gpu else j["dtype"]]
            entry["compare"] = compare(j["i_out"], j["d_out"], tol)
            ok = entry["compare"]["ok"]
            log(f"parity {key}: rel max diff {entry['compare'].get('rel_max_diff', float('nan')):.2e} "
                f"(tolerance {tol:.0e}) {'OK' if ok else 'FAIL'}")
            if not ok:
                fail(f"parity/{key}", json.dumps(entry["compare"]))

    # ---- (b1) denoising step, ipr vs diffusers, + parity at that size
    def denoise(sname):
        folder, sz = built[sname], sizes[sname]
        if not section_time_ok(f"denoise/{sname}", {"sd21": 60, "sdxl": 90}.get(sname, 20)):
            return
        dt = dtypes[0]
        entry = S.setdefault("denoise", {}).setdefault(sname, {"dtype": dt, "images": 1, "cfg_batch": 2,
                                                               "steps_short_long": sz["time_steps"]})
        lo, hi = sz["time_steps"]
        with open(os.path.join(folder, "unet", "config.json")) as f:
            ucfg = json.load(f)
        g = torch.Generator().manual_seed(11)
        lat_in = os.path.join(workdir, f"{sname}-in.safetensors")
        latents_file_write(lat_in, torch.randn(1, ucfg["in_channels"], ucfg["sample_size"], ucfg["sample_size"], generator=g))
        entry["latents_shape"] = [1, ucfg["in_channels"], ucfg["sample_size"], ucfg["sample_size"]]
        d_out = os.path.join(workdir, f"{sname}-diffusers.safetensors")
        i_out = os.path.join(workdir, f"{sname}-ipr.safetensors")
        entry["diffusers"] = run_worker("sample", {"model": folder, "device": device, "dtype": dt, "steps": lo,
                                                   "time_steps": [lo, hi], "latents_in": lat_in, "latents_out": d_out},
                                        gpu, budget.child(), workdir)
        if not entry["diffusers"]["ok"]:
            fail(f"denoise/{sname}/diffusers", entry["diffusers"].get("error", ""))
        if has_sample:
            runs = {}
            for steps in (lo, hi, lo, hi):
                out_path = i_out if steps == lo else os.path.join(workdir, f"{sname}-ipr-long.safetensors")
                r = ipr_sample(ipr, folder, lat_in, out_path, steps, device, dt, gpu, budget.child(), dtype_flag)
                if r["rc"] != 0:
                    fail(f"denoise/{sname}/ipr", tail(r["stderr"]))
                    runs = None
                    break
                runs.setdefault(steps, []).append(r)
            if runs:
                walls = {s: [r["wall_s"] for r in rs] for s, rs in runs.items()}
                mem = max((r["memory"] for rs in runs.values() for r in rs),
                          key=lambda m: (m.get("gpu_process_peak_mib") or m.get("gpu_device_peak_over_baseline_mib")
                                         or m.get("cpu_peak_rss_mib") or 0))
                entry["ipr"] = {"ok": True, "ms_per_step": 1e3 * (min(walls[hi]) - min(walls[lo])) / (hi - lo),
                                "wall_s": walls, "memory": mem, "cmd": runs[hi][0]["cmd"]}
        if entry.get("ipr", {}).get("ok") and entry["diffusers"].get("ok"):
            tol = TOLERANCE["f32-cpu" if not gpu else dt]
            entry["compare"] = compare(i_out, d_out, tol)
            ratio = entry["ipr"]["ms_per_step"] / entry["diffusers"]["ms_per_step"] if entry["diffusers"]["ms_per_step"] > 0 else None
            entry["ipr_over_diffusers"] = ratio
            log(f"denoise {sname}: ipr {entry['ipr']['ms_per_step']:.2f} ms/step, diffusers "
                f"{entry['diffusers']['ms_per_step']:.2f} ms/step; parity rel {entry['compare'].get('rel_max_diff', float('nan')):.2e}")
            if not entry["compare"]["ok"]:
                fail(f"denoise/{sname}/parity", json.dumps(entry["compare"]))

    # ---- (b2) LoRA training step, ipr vs diffusers
    def train(sname):
        folder, sz = built[sname], sizes[sname]
        if not section_time_ok(f"train/{sname}", {"sd21": 90, "sdxl": 120}.get(sname, 30)):
            return
        unet_dir = os.path.join(folder, "unet")
        dt = dtypes[0]
        entry = S.setdefault("train", {}).setdefault(sname, {"dtype_base": dt, "dtype_lora": "f32", "batch": sz["batch"],
                                                             "rank": 4, "text_tokens": 8, "iters": iters})
        entry["diffusers"] = run_worker("train", {"unet_dir": unet_dir, "device": device, "dtype": dt, "batch": sz["batch"],
                                                  "iters": iters}, gpu, budget.child(), workdir)
        if not entry["diffusers"]["ok"]:
            fail(f"train/{sname}/diffusers", entry["diffusers"].get("error", ""))
        if has_train:
            profile_flags = [] if ipr.missing_flags(("bench", "train-step"), ["--profile-ops"]) else ["--profile-ops", "2"]
            cmd = [*ipr.cmd, "bench", "train-step", "--unet", unet_dir, "--batch", str(sz["batch"]),
                   "--iters", str(iters), "--json", *train_flags, *profile_flags]
            r = run_child(cmd, gpu, budget.child())
            e = {"cmd": " ".join(cmd), "wall_s": r["wall_s"], "memory": r["memory"], "ok": r["rc"] == 0}
            if r["rc"] == 0:
                try:
                    line = [l for l in r["stdout"].strip().splitlines() if l.strip().startswith("{")][-1]
                    e.update(json.loads(line))
                except (IndexError, json.JSONDecodeError):
                    e.update(ok=False, error="no JSON line in stdout: " + tail(r["stdout"], 400))
            else:
                e["error"] = tail(r["stderr"])
            entry["ipr"] = e
            if not e["ok"]:
                fail(f"train/{sname}/ipr", e.get("error", ""))
        if entry.get("ipr", {}).get("ok") and entry["diffusers"].get("ok") and "ms_per_step" in entry["ipr"]:
            entry["ipr_over_diffusers"] = entry["ipr"]["ms_per_step"] / entry["diffusers"]["ms_per_step"]
            log(f"train {sname}: ipr {entry['ipr']['ms_per_step']:.2f} ms/step, diffusers "
                f"{entry['diffusers']['ms_per_step']:.2f} ms/step (ratio {entry['ipr_over_diffusers']:.2f})")
        elif entry["diffusers"].get("ok"):
            log(f"train {sname}: diffusers {entry['diffusers']['ms_per_step']:.2f} ms/step")
        if entry.get("ipr", {}).get("ops"):
            S.setdefault("ops", {}).setdefault(sname, {})["train"] = {
                "ms_profiled_step": entry["ipr"].get("ms_profiled_step"), "ops": entry["ipr"]["ops"]}
            log_ops(f"train {sname}", entry["ipr"])

    # ---- (b3) where a denoising step's time goes, op by op (ipr only), largest size first
    has_profile = bool(ipr) and not ipr.missing_flags(("bench", "sample"), ["--profile-ops", "--dtype", "--model"])
    if ipr and not has_profile:
        skip("ops", "this ipr binary's `bench sample` has no --profile-ops/--dtype")
    def profile(sname):
        if not has_profile or not section_time_ok(f"ops/{sname}/denoise", {"sd21": 40, "sdxl": 60}.get(sname, 15)):
            return
        cmd = [*ipr.cmd, "bench", "sample", "--model", built[sname], "--batch", "1", "--steps", "2", "--iters", "1",
               "--guidance", "5", "--dtype", dtypes[0], "--device", device, "--profile-ops", "3", "--json"]
        # On the GPU the SD-2.1 size also without the project's CUDA kernels: their gain, op by op.
        off = [False, True] if gpu and sname == "sd21" and "IPR_CUDA_KERNELS" not in os.environ else [False]
        for kernels_off in off:
            if kernels_off and not section_time_ok(f"ops/{sname}/denoise-kernels-off", 40):
                return
            key = "denoise-kernels-off" if kernels_off else "denoise"
            env = {**os.environ, "IPR_CUDA_KERNELS": "0"} if kernels_off else None
            v, r = ipr_json(cmd, f"ops/{sname}/{key}", env=env)
            if v is None:
                continue
            S.setdefault("ops", {}).setdefault(sname, {})[key] = {
                "cmd": ("IPR_CUDA_KERNELS=0 " if kernels_off else "") + " ".join(cmd),
                "ms_profiled_step": v.get("ms_profiled_step"), "ops": v.get("ops"),
                "steps_per_s": v.get("steps_per_s"), "memory": r["memory"]}
            log_ops(f"{key} {sname}", v)

    # ---- the plan, most wanted first: SD-2.1 size (the goal), then SDXL size (built
    # now), then the toy size; a section that would not fit the time left is skipped and listed.
    for sname in [n for n in ("sd21", "sdxl", "toy") if n in sizes]:
        if sizes[sname].get("lazy") and have_diffusers and section_time_ok(f"build/{sname}", 150):
            log(f"random pipeline {sname} ...")
            record_builds(run_worker("prepare", {"device": device, "gpu": gpu, "builds": {sname: build_spec(sname)}},
                                     gpu, budget.child(), workdir))
        if sname not in built:
            continue
        denoise(sname)
        train(sname)
        profile(sname)

    # ---- (c) the gradient exchange: `ipr train` on the tiny pixel pipeline through the build's
    # collective (NCCL at world size 1 when the binary has the `nccl` feature) and through the
    # host (IPR_NCCL=0); the gather copies values, so the adapters must be equal bit for bit.
    features = results.get("ipr_manifest", {}).get("cargo_features", [])
    if ipr and ipr.has_command("train") and section_time_ok("collective", 30):
        entry = S.setdefault("collective", {"nccl_in_binary": "nccl" in features, "device": device})
        data = os.path.join(workdir, "train-data")
        os.makedirs(data, exist_ok=True)
        from PIL import Image
        with open(os.path.join(data, "metadata.jsonl"), "w") as f:
            for i, p in enumerate(["a dog to the left of a car", "a car above a dog", "a dog below a car",
                                   "a car to the right of a dog"]):
                Image.new("RGB", (16, 16), (40 * i, 200 - 30 * i, 90)).save(os.path.join(data, f"{i}.png"))
                f.write(json.dumps({"file_name": f"{i}.png", "prompt": p, "weight": 1.0 if i % 2 == 0 else 0.5}) + "\n")
        outs = {}
        for name, env in [("collective", {}), ("host", {"IPR_NCCL": "0"})]:
            out = os.path.join(workdir, f"lora-{name}")
            cmd = [*ipr.cmd, "train", "--model", os.path.join(args.fixtures, "tiny-pixel"), "--data", data, "--out", out,
                   "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--seed", "5", "--device", device, "--quiet"]
            r = run_child(cmd, gpu, budget.child(), env={**os.environ, **env})
            entry[name] = {"cmd": " ".join(cmd), "env": env, "rc": r["rc"], "wall_s": r["wall_s"]}
            if r["rc"] != 0:
                fail(f"collective/{name}", tail(r["stderr"]))
            else:
                with open(os.path.join(out, "pytorch_lora_weights.safetensors"), "rb") as f:
                    outs[name] = f.read()
        if len(outs) == 2:
            entry["adapters_equal"] = outs["collective"] == outs["host"]
            log(f"collective: adapters through {'NCCL' if entry['nccl_in_binary'] and gpu else 'the host (no NCCL here)'} and "
                f"through the host {'equal' if entry['adapters_equal'] else 'DIFFER'}")
            if not entry["adapters_equal"]:
                fail("collective", "the adapter trained through the NCCL exchange differs from the host exchange's")

    # ---- summary
    results["elapsed_s"] = round(time.perf_counter() - budget.t0, 1)
    results["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["ok"] = not results["failures"] and (not args.strict or not results["skipped"])
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    if tmp_owned:
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"wrote {args.out}: {len(results['failures'])} failure(s), {len(results['skipped'])} skip(s), "
        f"{results['elapsed_s']} s")
    for s in results["skipped"]:
        log(f"  skipped {s['where']}: {s['why']}")
    for s in results["failures"]:
        log(f"  FAILED {s['where']}: {s['why'][:300]}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
