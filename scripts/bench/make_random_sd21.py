#!/usr/bin/env python3
"""Write a Stable Diffusion 2.1-sized diffusers pipeline and an OWL-ViT base-patch32-sized detector,
both with random weights, for timing `ipr` at the paper's model sizes without downloading anything.

    python scripts/bench/make_random_sd21.py OUT_DIR [OWL_DIR] [--owlv2 OWLV2_DIR]
    # OWL_DIR default: OUT_DIR-owlvit; OWLV2_DIR: only built when given

Needs torch, diffusers and transformers (checked with torch 2.15, diffusers 0.42.1, transformers
5.24). Everything is f32 safetensors on the CPU, seeded (torch.manual_seed(0)); about 5.5 GB on
disk and ~4 GB of peak memory (one component is built, saved and freed at a time).

OUT_DIR (what `StableDiffusionPipeline.save_pretrained` writes for stabilityai/stable-diffusion-2-1):
    unet/          UNet2DConditionModel, scripts/gpu_check/sd21_unet_config.json (865 M parameters,
                   sample_size 96: 768 px images)
    vae/           AutoencoderKL as SD 2.1's (128/256/512/512, 2 layers per block, 4 latent channels)
    text_encoder/  CLIPTextModel with SD 2.1's OpenCLIP ViT-H text config (1024 wide, 23 layers)
    tokenizer/     a COPY of the tiny test tokenizer (crates/ipr-diffusion/tests/fixtures/tiny-sd21/
                   tokenizer/): the real CLIP tokenizer cannot be downloaded here. Its ids are all
                   < 49408, so it drives the full-size text encoder; what is timed is the models, not
                   tokenization (microseconds either way).
    scheduler/     SD 2.1's DDIMScheduler config (v_prediction, scaled_linear, leading spacing)
    model_index.json
OWL_DIR: OwlViTForObjectDetection with transformers' default OwlViTConfig (= google/owlvit-base-patch32's
    sizes: vision 768 px, patch 32, 12 layers x 768; text 12 layers x 512, 16 positions), random
    init, plus the tiny OWL-ViT test tokenizer (crates/ipr-detect/tests/fixtures/owlvit/tiny-owlvit/)
    and its processor config with size / crop_size set to 768 (the detector requires the processor
    to produce vision_config.image_size squares).
OWLV2_DIR (with --owlv2; the judge of examples/paper/sd21-lora.toml): Owlv2ForObjectDetection at
    google/owlv2-base-patch16-ensemble's sizes (Owlv2Config's defaults with vision image_size 960:
    patch 16, 3600 patches), random init, the tiny OWLv2 test tokenizer and processor
    (crates/ipr-detect/tests/fixtures/owlvit/tiny-owlv2/) with size 960.

Random weights produce noise images and arbitrary detections: use these folders for speed and
memory, never for quality.
"""

import argparse
import gc
import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
UNET_CONFIG = os.path.join(ROOT, "scripts", "gpu_check", "sd21_unet_config.json")
SD_TOKENIZER = os.path.join(ROOT, "crates", "ipr-diffusion", "tests", "fixtures", "tiny-sd21", "tokenizer")
OWL_FIXTURE = os.path.join(ROOT, "crates", "ipr-detect", "tests", "fixtures", "owlvit", "tiny-owlvit")
OWLV2_FIXTURE = os.path.join(ROOT, "crates", "ipr-detect", "tests", "fixtures", "owlvit", "tiny-owlv2")
OWLV2_IMAGE_SIZE = 960  # google/owlv2-base-patch16-ensemble

# stabilityai/stable-diffusion-2-1 vae/config.json
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)

# stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H/14's text tower, its
# last layer dropped: SD 2.x conditions on the penultimate layer)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=512,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="v_prediction",
    timestep_spacing="leading",
)


def log(msg):
    print(f"[make_random_sd21] {msg}", file=sys.stderr, flush=True)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def save_and_free(model, folder, name):
    log(f"{name}: {n_params(model) / 1e6:.1f} M parameters -> {folder}")
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()


def make_pipeline(out):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    os.makedirs(out, exist_ok=True)
    with open(UNET_CONFIG) as f:
        unet_config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    with torch.no_grad():
        log("building the UNet (random init of 865 M parameters takes a while on a CPU) ...")
        save_and_free(UNet2DConditionModel.from_config(unet_config), os.path.join(out, "unet"), "unet")
        save_and_free(AutoencoderKL.from_config(VAE_CONFIG), os.path.join(out, "vae"), "vae")
        text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        save_and_free(text, os.path.join(out, "text_encoder"), "text_encoder")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(os.path.join(out, "scheduler"))
    tok = os.path.join(out, "tokenizer")
    if os.path.exists(tok):
        shutil.rmtree(tok)
    shutil.copytree(SD_TOKENIZER, tok)
    # What StableDiffusionPipeline.save_pretrained writes (no safety checker / feature extractor).
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


def make_owl(out, version):
    """A random OWL-ViT (base-patch32) or OWLv2 (base-patch16-ensemble) detector folder."""
    if version == 1:
        from transformers import OwlViTConfig as Config, OwlViTForObjectDetection as Model

        config, fixture = Config(), OWL_FIXTURE  # transformers' defaults: owlvit-base-patch32's sizes
    else:
        from transformers import Owlv2Config as Config, Owlv2ForObjectDetection as Model

        config, fixture = Config(vision_config={"image_size": OWLV2_IMAGE_SIZE}), OWLV2_FIXTURE
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(fixture, "vocab.json")) as f:
        tok_vocab = json.load(f)
    assert max(tok_vocab.values()) < config.text_config.vocab_size, "tokenizer ids exceed the text vocabulary"
    assert config.text_config.max_position_embeddings == 16
    size = config.vision_config.image_size
    with torch.no_grad():
        save_and_free(Model(config), out, f"owl v{version} ({size} px, patch {config.vision_config.patch_size})")
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json"]:
        shutil.copy(os.path.join(fixture, name), os.path.join(out, name))
    with open(os.path.join(fixture, "processor_config.json")) as f:
        proc = json.load(f)
    proc["image_processor"]["size"] = {"height": size, "width": size}
    if "crop_size" in proc["image_processor"]:
        proc["image_processor"]["crop_size"] = {"height": size, "width": size}
    with open(os.path.join(out, "processor_config.json"), "w") as f:
        json.dump(proc, f, indent=2)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the diffusers pipeline folder to write")
    ap.add_argument("owlvit", nargs="?", help="the OWL-ViT folder (default: OUT-owlvit)")
    ap.add_argument("--owlv2", help="also write an OWLv2 (base-patch16-ensemble size) folder here")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    owl = os.path.abspath(a.owlvit) if a.owlvit else out.rstrip("/") + "-owlvit"
    torch.manual_seed(0)
    make_pipeline(out)
    torch.manual_seed(1)
    make_owl(owl, 1)
    if a.owlv2:
        torch.manual_seed(2)
        make_owl(os.path.abspath(a.owlv2), 2)
    log(f"done: {out}, {owl}" + (f", {os.path.abspath(a.owlv2)}" if a.owlv2 else ""))


if __name__ == "__main__":
    main()
