#!/usr/bin/env bash
# What one IPR round of the paper's SD 2.1 preset (examples/paper/sd21-lora.toml) costs on this
# machine's CPU at SD 2.1's sizes: seconds per image sampled (768 px), per image detected, per LoRA
# training step. Random weights of the real sizes (scripts/bench/make_random_sd21.py: 865 M UNet,
# SD 2.1 VAE, 340 M OpenCLIP-H text encoder, OWL-ViT base-patch32, OWLv2 base-patch16-ensemble):
# speed and memory only, the images are noise.
#   bash scripts/bench/sd21_round_cpu.sh [PYTHON]     # PYTHON: a venv with torch, diffusers, transformers
# The preset is cut to 1 training prompt and 1 prompt per evaluation split (3 splits), few denoising
# and training steps, and run with `ipr run` end to end (base evaluation, one round, evaluation of
# the trained model). Timings come from the run folder's artifacts: each stage writes its folder or
# file aside and renames it into place when done, so a stage lasts from the previous artifact's
# newest file to its own.
# Env: STEPS (denoising steps, 2), IMAGES (images per training prompt, 2), EVAL_IMAGES (per evaluation
# prompt, 1), TRAIN_STEPS (2), TRAIN_BATCH (1), PRESET (the preset to cut), WORK (work folder; default
# a fresh /tmp/ipr-sd21-round.* folder, deleted at the end unless KEEP=1; ~6 GB of weights).
# Needs ~20 GB of free memory (the training step at 96x96 latents); run nothing else beside it.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${1:-${PYTHON:-python3}}
STEPS=${STEPS:-2}
IMAGES=${IMAGES:-2}
EVAL_IMAGES=${EVAL_IMAGES:-1}
TRAIN_STEPS=${TRAIN_STEPS:-2}
TRAIN_BATCH=${TRAIN_BATCH:-1}
PRESET=${PRESET:-examples/paper/sd21-lora.toml}
KEEP=${KEEP:-0}
OWN_WORK=0
if [ -n "${WORK:-}" ]; then
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d /tmp/ipr-sd21-round.XXXXXX)
  OWN_WORK=1
fi
WORK=$(cd "$WORK" && pwd)
cleanup() { # the weights and the run always go (unless KEEP=1); a WORK you chose keeps the logs
  if [ "$KEEP" = 1 ]; then
    echo "kept $WORK (KEEP=1)" >&2
  elif [ "$OWN_WORK" = 1 ]; then
    rm -rf "$WORK"
  else
    rm -rf "$WORK/sd21" "$WORK/owlvit" "$WORK/owlv2" "$WORK/runs"
  fi
}
trap cleanup EXIT

cargo build --release -q -p ipr
IPR=$ROOT/${CARGO_TARGET_DIR:-target}/release/ipr

echo "making random SD 2.1-size weights in $WORK ..." >&2
"$PY" scripts/bench/make_random_sd21.py "$WORK/sd21" "$WORK/owlvit" --owlv2 "$WORK/owlv2" 2> "$WORK/make.log" ||
  { cat "$WORK/make.log" >&2; exit 1; }

# run.toml: the preset, with what the CPU and a short run need changed (every change is listed in
# the file); without the preset, the paper code's settings written out here.
"$PY" - "$PRESET" "$WORK" "$STEPS" "$IMAGES" "$EVAL_IMAGES" "$TRAIN_STEPS" "$TRAIN_BATCH" > "$WORK/run.toml" <<'PYEOF'
import json, os, sys, tomllib
preset, work = sys.argv[1], sys.argv[2]
steps, images, eval_images, train_steps, train_batch = map(int, sys.argv[3:8])
if os.path.exists(preset):
    with open(preset, "rb") as f:
        c = tomllib.load(f)
    origin = preset
else:
    origin = "the paper code's settings (no " + preset + ")"
    c = {
        "method": "ipr", "seed": 0,
        "prompts": {"set": "sr2d", "train": "ipr-paper"},
        "sampling": {"height": 768, "width": 768, "guidance_scale": 7.5, "scheduler": "ddim"},
        "detector": {"kind": "owlvit", "threshold": 0.1},
        "relabel": {"policy": "paper"},
        "train": {"learning_rate": 1e-6, "lora_targets": ["to_q", "to_k", "to_v", "to_out.0"]},
        "eval": {},
    }
folders = {"owlvit": os.path.join(work, "owlvit"), "owlv2": os.path.join(work, "owlv2")}
changes = []
def put(table, key, value, why):
    t = c
    for part in table.split(".") if table else []:
        t = t.setdefault(part, {})
    old = json.dumps(t[key]) if key in t else "unset"
    t[key] = value
    changes.append(f"{table + '.' if table else ''}{key} = {json.dumps(value)}  (preset: {old}; {why})")
put("", "name", "sd21-round-cpu", "this benchmark")
put("", "runs_dir", os.path.join(work, "runs"), "this benchmark")
put("", "rounds", 1, "one round")
put("model", "source", os.path.join(work, "sd21"), "random weights of SD 2.1's sizes")
put("model", "device", "cpu", "this benchmark")
put("model", "dtype", "f32", "the CPU runs f32 only")
put("model", "vae_dtype", "f32", "the CPU runs f32 only")
put("prompts", "max_train", 1, "short run")
put("prompts", "max_eval", 1, "short run")
put("sampling", "steps", steps, "short run")
put("sampling", "images_per_prompt", images, "short run")
put("sampling", "batch_size", 1, "CPU memory")
for table in ["detector", "eval.detector"]:
    d = c.get("eval", {}).get("detector") if table == "eval.detector" else c.get("detector")
    if d is None:
        continue
    if d.get("kind") not in folders:
        sys.exit(f"{table}.kind {d.get('kind')!r}: only owlvit / owlv2 have random weights here")
    put(table, "model", folders[d["kind"]], "random weights of the real model's sizes")
if c.get("eval", {}).pop("clip_model", None) is not None:
    changes.append("eval.clip_model removed (no CLIP weights made)")
put("eval", "images_per_prompt", eval_images, "short run")
put("train", "steps", train_steps, "short run")
put("train", "batch_size", train_batch, "CPU memory: one image at 96x96 latents is most of it")

def value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(v)
def table(name, t):
    out = [f"[{name}]"] if name else []
    out += [f"{k} = {value(v)}" for k, v in t.items() if not isinstance(v, dict)]
    for k, v in t.items():
        if isinstance(v, dict):
            out += [""] + table(f"{name}.{k}" if name else k, v)
    return out
print(f"# Written by scripts/bench/sd21_round_cpu.sh from {origin}, changed:")
for line in changes:
    print(f"#   {line}")
print("\n".join(table("", c)))
PYEOF

log=$WORK/run.log
echo "running ipr run --config $WORK/run.toml (log: $log) ..." >&2
start=$(date +%s.%N)
set +e
RUST_BACKTRACE=1 /usr/bin/time -v -o "$WORK/time.txt" "$IPR" run --config "$WORK/run.toml" > "$WORK/run.out" 2> "$log"
rc=$?
set -e
end=$(date +%s.%N)
if [ $rc != 0 ]; then
  echo "ipr run failed (exit $rc); the end of its log:" >&2
  tail -n 40 "$log" >&2
fi

"$PY" - "$WORK" "$start" "$end" "$rc" <<'PYEOF'
import os, re, subprocess, sys, tomllib
work, start, end, rc = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
with open(os.path.join(work, "run.toml"), "rb") as f:
    c = tomllib.load(f)
run = os.path.join(work, "runs", c["name"])
s, t = c["sampling"], c["train"]

def done(path):
    """When an artifact was finished: the newest modification time of it or anything inside it."""
    p = os.path.join(run, path)
    if not os.path.exists(p):
        return None
    times = [os.path.getmtime(p)]
    for dirpath, _, files in os.walk(p):
        times += [os.path.getmtime(os.path.join(dirpath, f)) for f in files]
    return max(times)

def pngs(path):
    p = os.path.join(run, path)
    return len([f for f in os.listdir(p) if f.endswith(".png")]) if os.path.isdir(p) else 0

splits = ["seen", "validation", "heldout"]
stages = [("setup", "run.toml"), ("setup", "prompts")]
for i in [0]:
    for sp in splits:
        e = f"round-{i}/eval/{sp}"
        stages += [("sample-eval", f"{e}/samples"), ("detect-eval", f"{e}/detections.jsonl"), ("score", f"{e}/metrics.json")]
stages += [("sample-train", "round-0/samples"), ("detect-train", "round-0/detections.jsonl"),
           ("relabel", "round-0/labelled"), ("relabel", "round-0/train"), ("train", "round-1/lora")]
for sp in splits:
    e = f"round-1/eval/{sp}"
    stages += [("sample-eval1", f"{e}/samples"), ("detect-eval", f"{e}/detections.jsonl"), ("score", f"{e}/metrics.json")]
stages += [("score", "metrics.json"), ("score", "report.html")]

acc = {}  # kind -> [seconds, images, stages]
prev = start
for kind, path in stages:
    when = done(path)
    if when is None:
        continue
    a = acc.setdefault(kind, [0.0, 0, 0])
    a[0] += when - prev
    a[2] += 1
    if kind.startswith("sample"):
        a[1] += pngs(path)
    elif kind.startswith("detect"):
        a[1] += pngs(path.replace("detections.jsonl", "samples"))
    prev = when
acc.setdefault("score", [0.0, 0, 0])[0] += end - prev  # the report and the process's exit

def rss_gib():
    try:
        text = open(os.path.join(work, "time.txt")).read()
        return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 2**20
    except Exception:
        return float("nan")

cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if l.startswith("Model name")), "?")
mem = int(open("/proc/meminfo").read().split()[1]) / 2**20
det, edet = c["detector"], c.get("eval", {}).get("detector", c["detector"])
def det_name(d):
    return {"owlvit": "OWL-ViT base-patch32 (768 px)", "owlv2": "OWLv2 base-patch16-ensemble (960 px)"}[d["kind"]]

print("## ipr: one IPR round of the SD 2.1 preset on the CPU (scripts/bench/sd21_round_cpu.sh)")
print(f"machine: {len(os.sched_getaffinity(0))} cores ({cpu}), {mem:.0f} GiB RAM; threads: {os.environ.get('RAYON_NUM_THREADS', 'all')}; "
      f"load average at the end {open('/proc/loadavg').read().split()[0]}")
print(f"model: random weights, SD 2.1 sizes (865.9 M UNet, 83.7 M VAE, 340.4 M text encoder), f32, "
      f"{s['height']}x{s['width']}, {s['scheduler']}, {s['steps']} steps, guidance {s['guidance_scale']} (CFG: batch 2 per UNet call)")
print(f"judge: {det_name(det)}; evaluator: {det_name(edet)}; "
      f"LoRA rank {t.get('lora_rank', 4)} on {', '.join(t['lora_targets'])}, batch {t['batch_size']}")
print()
print("| stage | items | seconds | seconds per item |")
print("| --- | --- | --- | --- |")
def row(label, kind, unit, per_step=None):
    if kind not in acc:
        print(f"| {label} | - | - | - |")
        return
    secs, n, k = acc[kind]
    items = {"image": n, "step": t["steps"], "stage": k}[unit]
    each = secs / items if items else float("nan")
    extra = f"; / {per_step} steps: {each / per_step:.1f}" if per_step else ""
    where = f" in {k} stage{'s' if k != 1 else ''}" if unit == "image" else ""
    print(f"| {label} | {items} {unit}{'s' if items != 1 else ''}{where} | {secs:.1f} | {each:.1f}{extra} |")
row("start: load both detectors, check config, write prompts", "setup", "stage")
row("sample, base model, evaluation prompts", "sample-eval", "image", s["steps"])
row("sample, base model, training prompt", "sample-train", "image", s["steps"])
row("sample, trained model (LoRA merged), evaluation prompts", "sample-eval1", "image", s["steps"])
row(f"detect, judge: {det_name(det)}", "detect-train", "image")
row(f"detect, evaluator: {det_name(edet)}", "detect-eval", "image")
row("relabel + training set", "relabel", "stage")
row(f"LoRA training, {t['steps']} steps (incl. loading, VAE-encoding the images)", "train", "step")
row("scoring, metrics, report, exit", "score", "stage")
total = end - start
print(f"| total wall (ipr run) | | {total:.1f} | |")
print()
print(f"peak RSS: {rss_gib():.1f} GiB; exit status {rc}" + ("" if rc == 0 else " (FAILED: see the log above)"))
print(f"Seconds per image sampled cover, per stage: loading the pipeline (and merging the LoRA), the text encoder, "
      f"{s['steps']} steps of the CFG-doubled UNet (batch 2), the VAE decode and the PNG write; "
      "\"/ N steps\" divides all of it by the steps. Detection excludes loading the detectors (done at the start).")
PYEOF
exit $rc
