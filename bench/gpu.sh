#!/usr/bin/env bash
# The one GPU script: what can only be checked on a CUDA machine, in one run of under
# 8 minutes, for the days a GPU is lent (CI never runs it). Usage, from the project root
# with genframe installed (`pip install -e .` or `pip install -e . --no-deps` where the
# dependencies are there already):
#
#   bash bench/gpu.sh [OUT_DIR]          # OUT_DIR: default ./gpu-results
#
# Writes OUT_DIR/gpu.tsv (one line per check: name, exit status, seconds, val/loss) and
# one log per check; a failed check is recorded and the script goes on.
#
# Sections: scale-out (the trainer presets on a GPU: gpu with bf16, fsdp on one GPU,
# torch.compile, one short run per model family) and performance (bench/gpu_perf.py:
# GPT-2 small tokens/s and MFU with bf16 and torch.compile, cached generation against
# transformers, diffusion training and DDIM-50 images/s; OUT_DIR/gpu_perf.json).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-gpu-results}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export GENFRAME_OUTPUT_ROOT="$OUT/outputs" HF_HUB_OFFLINE=1 WANDB_MODE=offline
START=$(date +%s)
printf 'check\texit\tseconds\tval_loss\n' > "$OUT/gpu.tsv"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# check NAME SECONDS ARGS...: one `genframe train` with a time limit, recorded in gpu.tsv.
check() {
  local name="$1" limit="$2"; shift 2
  local run="$OUT/runs/$name" t0 t1 status loss
  rm -rf "$run"
  t0=$(date +%s)
  timeout "$limit" "$PY" -m genframe train "$@" "hydra.run.dir=$run" > "$OUT/$name.log" 2>&1
  status=$?
  t1=$(date +%s)
  loss=$("$PY" -c "import json,sys; print(round(json.load(open(sys.argv[1]))['val/loss'], 4))" \
           "$run/metrics.json" 2>/dev/null || echo -)
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((t1 - t0))" "$loss" | tee -a "$OUT/gpu.tsv"
}

SHORT=(trainer.max_steps=60 trainer.max_epochs=-1 trainer.limit_val_batches=4
       trainer.num_sanity_val_steps=0 trainer.enable_progress_bar=false num_samples=16)

# -- scale-out: presets on the GPU --------------------------------------------------------
check gpu_bf16_vae 90 trainer=gpu trainer.precision=bf16-mixed "${SHORT[@]}"
check fsdp_one_gpu_transformer 120 trainer=fsdp trainer.devices=1 data=text model=transformer_mini "${SHORT[@]}"
check ddp_one_gpu_diffusion 120 trainer=ddp trainer.devices=1 model=diffusion "${SHORT[@]}"
check compile_transformer 180 trainer=gpu trainer.compile=true data=text model=transformer_mini "${SHORT[@]}"
check activation_checkpointing_transformer 90 trainer=gpu trainer.activation_checkpointing=true data=text model=transformer_mini "${SHORT[@]}"

# -- one short run per family on the GPU (auto precision) ---------------------------------
check family_vae 60 trainer=gpu model=vae "${SHORT[@]}"
check family_gan 60 trainer=gpu model=gan "${SHORT[@]}"
check family_diffusion 60 trainer=gpu model=diffusion "${SHORT[@]}"
check family_autoencoder 60 trainer=gpu experiment=shapes_autoencoder "${SHORT[@]}"
check family_text2image 90 trainer=gpu experiment=shapes_text2image "${SHORT[@]}"
check family_upscaler 60 trainer=gpu model=upscaler data.image_size=16 "${SHORT[@]}"
check family_transformer 60 trainer=gpu data=text model=transformer_mini "${SHORT[@]}"

# -- performance: throughput, MFU and a peer on the GPU (bench/gpu_perf.py) -------------------
t0=$(date +%s)
timeout 240 "$PY" bench/gpu_perf.py --out "$OUT" > "$OUT/gpu_perf.log" 2>&1
status=$?
printf '%s\t%s\t%s\t%s\n' "gpu_perf" "$status" "$(( $(date +%s) - t0 ))" "-" | tee -a "$OUT/gpu.tsv"
cat "$OUT/gpu_perf.log" | grep -E '^(lm_train|lm_generate|diffusion) '

echo "all checks: $(( $(date +%s) - START )) s (budget 480 s); results in $OUT/gpu.tsv"
