"""The performance half of the GPU script (`bench/gpu.sh` runs it): what genframe's
networks reach on a CUDA card, in one process, within a time budget.

- GPT-2 small (124M parameters, context 1024) training: tokens/s and model FLOPs
  utilisation (MFU) with bf16 autocast, fused attention (scaled_dot_product_attention),
  fused AdamW and `torch.compile`; MFU counts 6 N + 12 L T d FLOPs per token (PaLM,
  Chowdhery et al. 2022, appendix B) against the card's dense bf16 peak.
- Diffusion U-Net (the diffusion preset's widths on 64 images of 1x16x16): training
  images/s and DDIM-50 sampling images/s (the CPU peers' comparison with diffusers is
  bench/peer_diffusion.py, which runs on the GPU too with ``--device cuda``: not yet).
- Cached generation tokens/s of GPT-2 small, against transformers' GPT2LMHeadModel at
  the same configuration when transformers is installed.

    python bench/gpu_perf.py --out gpu-results          # on a GPU (about 4 minutes)
    python bench/gpu_perf.py --device cpu --tiny        # the same code on the CPU, small

Writes ``<out>/gpu_perf.json`` and prints a table. CI never runs it on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

#: Dense bf16 tensor-core peak, FLOP/s, by a name fragment of torch.cuda.get_device_name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Seconds per call of `fn` over `repeat` calls (after one untimed call)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def gpt_config(tiny: bool) -> dict:
    if tiny:
        return {"vocab_size": 512, "block_size": 128, "n_layer": 2, "n_head": 2, "n_embd": 64}
    return {"vocab_size": 50304, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}


def lm_training(device: torch.device, tiny: bool, compile_: bool, steps: int) -> dict:
    from genframe.optim import adamw
    from genframe_plugins.transformer.network import GPT

    cfg = gpt_config(tiny)
    torch.manual_seed(0)
    net = GPT(**cfg).to(device)
    params = sum(p.numel() for p in net.parameters())
    batch = 4 if tiny else 16
    tokens = torch.randint(0, cfg["vocab_size"], (batch, cfg["block_size"] + 1), device=device)
    opt = adamw(net.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    model = torch.compile(net) if compile_ else net
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync(device)
    warmup = time.perf_counter() - started
    seconds = timed(step, device, steps)
    tokens_per_s = batch * cfg["block_size"] / seconds
    flops_per_token = 6 * params + 12 * cfg["n_layer"] * cfg["block_size"] * cfg["n_embd"]
    peak = peak_flops(device)
    return {"parameters": params, "batch": batch, "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / peak if peak else None,
            "compile": compile_, "warmup_s": warmup}


def lm_generation(device: torch.device, tiny: bool, new_tokens: int) -> dict:
    from genframe_plugins.transformer.network import GPT

    cfg = gpt_config(tiny)
    torch.manual_seed(0)
    net = GPT(**cfg).to(device).eval()
    prompt = torch.randint(0, cfg["vocab_size"], (8, 16), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def genframe_decode() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            cache = net.new_cache(prompt.shape[1] + new_tokens)
            logits = net(prompt, cache=cache)
            for _ in range(new_tokens):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                logits = net(nxt, cache=cache)

    out = {"genframe_tokens_per_s": 8 * new_tokens / timed(genframe_decode, device, 2)}
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        out["transformers_tokens_per_s"] = None
        return out
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["block_size"],
                                    n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                                    resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).to(device).eval()

    def hf_decode() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        use_cache=True, pad_token_id=0)

    out["transformers_tokens_per_s"] = 8 * new_tokens / timed(hf_decode, device, 2)
    out["ratio"] = out["genframe_tokens_per_s"] / out["transformers_tokens_per_s"]
    return out


def diffusion(device: torch.device, tiny: bool, ddim_steps: int) -> dict:
    from genframe.optim import adamw
    from genframe.testing import build_tiny
    from genframe.weights import instantiate_model

    torch.manual_seed(0)
    if tiny:
        model = build_tiny("diffusion")
    else:
        model = instantiate_model("diffusion", {"in_channels": 1, "image_size": 16, "num_classes": 0,
                                                "block_out_channels": [64, 128]})
    model = model.to(device)
    size, channels = model.hparams.image_size, model.hparams.in_channels
    images = torch.randn(64, channels, size, size, device=device)
    opt = adamw(model.unet.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def train_step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = model.diffusion_loss(model.unet, images, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {"parameters": sum(p.numel() for p in model.unet.parameters()),
           "genframe_train_images_per_s": 64 / timed(train_step, device, 10)}
    model.eval()

    from genframe.samplers.ddim import DDIMSampler

    def sample() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            model.generate(64, seed=0, sampler=DDIMSampler(steps=ddim_steps))

    out[f"genframe_ddim{ddim_steps}_images_per_s"] = 64 / timed(sample, device, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small networks (a smoke check on the CPU)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ddim", type=int, default=50)
    parser.add_argument("--out", default=None, help="write gpu_perf.json into this folder")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu --tiny for the smoke check")
    torch.backends.cuda.matmul.allow_tf32 = True
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__}
    for name, fn in (("lm_train", lambda: lm_training(device, opts.tiny, not opts.no_compile, opts.steps)),
                     ("lm_generate", lambda: lm_generation(device, opts.tiny, opts.new_tokens)),
                     ("diffusion", lambda: diffusion(device, opts.tiny, opts.ddim))):
        started = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # one failed measurement must not hide the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(results[name]), flush=True)
    if opts.out:
        Path(opts.out).mkdir(parents=True, exist_ok=True)
        (Path(opts.out) / "gpu_perf.json").write_text(json.dumps(results, indent=2))
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
