"""LoRA through peft (genframe.lora), `method=lora`, and `genframe export`."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import FAST, FAST_TRAINING

# Layers of the tiny VAE: convolutions in the encoder, linear and conv heads.
VAE_TARGETS = ["encoder.*.conv1", "to_posterior", "from_latent", "decoder.head"]
VAE_TARGETS_CLI = "finetune.lora.target_modules=[encoder.*.conv1,to_posterior,from_latent,decoder.head]"
NOT_MODEL = [o for o in FAST if not o.startswith("model.")]


def _vae():
    from genframe.testing import build_tiny

    torch.manual_seed(0)
    return build_tiny("vae").eval()


def _perturb(model) -> None:
    """LoRA's B starts at zero (no change); give the adapters a real update to test."""
    from genframe.lora import _adapter_parameters

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in _adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _outputs(model) -> torch.Tensor:
    """The encoder's posterior parameters and decoded samples: both halves of the VAE."""
    batch = model.example_batch(3)
    with torch.no_grad():
        h = model.to_posterior(model.encoder(batch["image"]).flatten(1))
    images = model.generate(3, seed=0).images
    return torch.cat([h.flatten(), images.flatten()])


# -- genframe.lora on a model --------------------------------------------------------------

def test_patterns_resolve_to_supported_layers():
    from genframe.errors import UserError
    from genframe.lora import resolve_targets

    m = _vae()
    names = resolve_targets(m, VAE_TARGETS)
    assert names == ["encoder.levels.0.0.conv1", "encoder.levels.1.0.conv1", "to_posterior",
                     "from_latent", "decoder.head"]
    # "*" would match containers and norms too; only Linear/Embedding/Conv layers are kept.
    everything = resolve_targets(m, ["*"])
    assert all(isinstance(m.get_submodule(n), (torch.nn.Linear, torch.nn.Conv2d)) for n in everything)
    with pytest.raises(UserError, match=r"pattern '\*attn\*' matches no module.*to_posterior"):
        resolve_targets(m, ["*attn*"])
    with pytest.raises(UserError, match=r"matches only modules LoRA cannot adapt: encoder.norm_out \(GroupNorm\)"):
        resolve_targets(m, ["encoder.norm_out"])


def test_only_adapter_weights_train_and_fraction_is_reported():
    from genframe.lora import apply_lora

    m = _vae().train()
    summary = apply_lora(m, r=2, alpha=4, target_modules=VAE_TARGETS)
    lora = {n for n, p in m.named_parameters() if "lora_" in n}
    assert {n for n, p in m.named_parameters() if p.requires_grad} == lora
    assert summary["trainable_parameters"] == sum(p.numel() for n, p in m.named_parameters() if n in lora)
    assert summary["total_parameters"] == sum(p.numel() for p in m.parameters())
    assert 0 < summary["trainable_fraction"] < 0.2
    assert summary["trainable_fraction"] == summary["trainable_parameters"] / summary["total_parameters"]
    assert m.model_spec.lora == {"r": 2, "alpha": 4.0, "dropout": 0.0,
                                       "target_modules": summary["target_modules"]}

    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = m.configure_optimizers()
    for _ in range(2):  # B starts at zero, so A gets its first gradient on step 2
        loss = m.training_step(m.example_batch(4), 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)


def test_adapter_file_round_trip(tmp_path):
    from safetensors import safe_open

    from genframe.errors import UserError
    from genframe.lora import (
        ADAPTER_KEY,
        apply_lora,
        has_lora,
        load_adapter,
        merge_lora,
        save_adapter,
    )
    from genframe.weights import read_weights, save_weights

    m = _vae()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora(m, r=2, alpha=4, target_modules=VAE_TARGETS)
    _perturb(m)
    path = save_adapter(m, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all("lora_" in k for k in keys)
    assert json.loads(meta[ADAPTER_KEY])["target_modules"][0] == "encoder.levels.0.0.conv1"

    fresh = _vae()
    fresh.load_state_dict(base)
    summary = load_adapter(fresh, path)
    assert has_lora(fresh) and summary["target_modules"] == m.model_spec.lora["target_modules"]
    assert torch.equal(_outputs(fresh), _outputs(m))

    # Not an adapter, an adapter for other layers, and an adapter used as model weights.
    save_weights(_vae(), tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="not a genframe LoRA adapter"):
        load_adapter(_vae(), tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="a LoRA adapter file"):
        read_weights(path)
    other = _vae()
    merge_lora(m)
    apply_lora(m, r=2, alpha=4, target_modules=["decoder.head"])
    save_adapter(m, tmp_path / "head.safetensors")
    other.decoder.head = torch.nn.Identity()
    with pytest.raises(UserError, match="do not fit this model.*decoder.head"):
        load_adapter(other, tmp_path / "head.safetensors")


def test_merge_gives_the_same_outputs_and_plain_keys():
    from genframe.lora import apply_lora, has_lora, merge_lora

    m = _vae()
    plain_keys = set(m.state_dict())
    apply_lora(m, r=4, alpha=8, target_modules=["*conv*", "*head", "to_posterior"])
    _perturb(m)
    assert set(m.state_dict()) != plain_keys
    adapted = _outputs(m)
    assert not torch.allclose(adapted, _outputs(_vae()))  # the adapters do change the model
    merge_lora(m)
    assert not has_lora(m) and m.model_spec.lora is None and not hasattr(m, "peft_config")
    assert all(p.requires_grad for p in m.parameters())  # trainable again, as before LoRA
    assert set(m.state_dict()) == plain_keys
    assert torch.allclose(_outputs(m), adapted, atol=1e-5)


def test_build_from_spec_rebuilds_a_lora_model(tmp_path):
    from genframe.lora import apply_lora, has_lora
    from genframe.weights import load_model, save_weights

    m = _vae()
    apply_lora(m, r=2, alpha=4, target_modules=VAE_TARGETS)
    _perturb(m)
    save_weights(m, tmp_path / "model.safetensors")
    rebuilt, _, _ = load_model(ckpt=str(tmp_path / "model.safetensors"))
    assert has_lora(rebuilt) and rebuilt.model_spec.lora == m.model_spec.lora
    assert torch.equal(_outputs(rebuilt.eval()), _outputs(m))


def test_any_module_takes_adapters(tmp_path):
    from genframe.lora import apply_lora, load_adapter, merge_lora, save_adapter

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    plain = {k: v.clone() for k, v in m.state_dict().items()}
    summary = apply_lora(m, r=2, alpha=2, target_modules=["0", "1"])
    assert summary["target_modules"] == ["0", "1"]  # exact: "1" does not match "2" or "0.1"
    _perturb(m)
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        adapted = m(x)
    save_adapter(m, tmp_path / "a.safetensors")
    other = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    other.load_state_dict(plain)
    load_adapter(other, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(other(x), adapted)
        assert torch.allclose(merge_lora(other)(x), adapted, atol=1e-5)


def test_tied_weights_are_refused():
    from genframe.errors import UserError
    from genframe.lora import apply_lora

    m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    m[1].weight = m[0].weight
    with pytest.raises(UserError, match="tied weights"):
        apply_lora(m, r=2, alpha=2, target_modules=["1"])


# -- method=lora and export on a trained VAE ------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from genframe.config import compose
    from genframe.tasks.train import train

    out = tmp_path_factory.mktemp("train") / "run"
    return train(compose("train", [*FAST, f"paths.output_dir={out}"]))


@pytest.fixture(scope="module")
def lora_run(trained, tmp_path_factory):
    from genframe.config import compose
    from genframe.tasks.finetune import finetune

    out = tmp_path_factory.mktemp("finetune") / "run"
    cfg = compose("finetune", [f"run={trained['run_dir']}", "method=lora", "finetune.lora.r=2",
                               VAE_TARGETS_CLI, *NOT_MODEL, f"paths.output_dir={out}"])
    return finetune(cfg)


def test_finetune_lora_writes_adapters_and_records_parameters(trained, lora_run, capsys):
    from genframe.lora import read_adapter
    from genframe.weights import read_weights

    run = lora_run["run_dir"]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["model"]["lora"]["r"] == 2 and "to_posterior" in info["model"]["lora"]["target_modules"]
    params = info["parameters"]
    assert 0 < params["trainable_fraction"] < 0.2
    assert params["trainable_parameters"] == info["lora"]["trainable_parameters"]
    spec, state = read_weights(run / "model.safetensors")
    assert spec.lora == info["model"]["lora"]
    assert any(k.endswith("base_layer.weight") for k in state)
    config, base, adapter = read_adapter(run / "adapter.safetensors")
    assert config == spec.lora and "lora" not in base and base["name"] == "vae"
    assert set(adapter) == {k.replace(".default", "") for k in state if "lora_" in k}
    # Only adapters trained: every base weight equals the starting run's.
    _, before = read_weights(trained["run_dir"] / "model.safetensors")
    for key, value in state.items():
        if "lora_" not in key:
            assert torch.equal(value, before[key.replace(".base_layer", "")]), key
    assert info["finetune"]["lr"] == 1e-3 and info["model"]["kwargs"]["lr"] == 1e-3


def test_generate_and_export_from_a_lora_run(lora_run, compose_task):
    from genframe.lora import has_lora
    from genframe.tasks.export import export
    from genframe.tasks.generate import generate
    from genframe.weights import load_model, read_weights

    run = lora_run["run_dir"]
    direct = generate(compose_task("generate", f"run={run}", "num_samples=3", "seed=1"))
    assert direct["samples"][0].images.shape[0] == 3

    kept = export(compose_task("export", f"run={run}"))
    assert {p.name for p in kept["files"]} == {"adapter.safetensors", "model.safetensors"}
    assert has_lora(load_model(ckpt=str(kept["run_dir"] / "model.safetensors"))[0])

    merged = export(compose_task("export", f"run={run}", "merge=true"))
    out = merged["run_dir"]
    spec, state = read_weights(out / "model.safetensors")
    assert spec.lora is None and not any("lora_" in k or "base_layer" in k for k in state)
    info = json.loads((out / "run.json").read_text())
    assert info["task"] == "export" and info["source"]["run"] == str(run) and info["merged_adapters"]
    from_export = generate(compose_task("generate", f"ckpt={out / 'model.safetensors'}", "num_samples=3",
                                        "seed=1"))
    assert torch.allclose(from_export["samples"][0].images, direct["samples"][0].images, atol=1e-5)


def test_finetune_lora_merge_writes_a_plain_model(trained, compose_task):
    from genframe.tasks.finetune import finetune
    from genframe.weights import read_weights

    result = finetune(compose_task("finetune", f"run={trained['run_dir']}", "method=lora",
                                   VAE_TARGETS_CLI, "finetune.lora.merge=true", *NOT_MODEL))
    run = result["run_dir"]
    spec, state = read_weights(run / "model.safetensors")
    _, plain = read_weights(trained["run_dir"] / "model.safetensors")
    assert spec.lora is None and set(state) == set(plain)
    assert (run / "adapter.safetensors").exists()
    info = json.loads((run / "run.json").read_text())
    assert info["merged_adapters"] and "lora" not in info["model"]


def test_full_finetune_of_a_lora_run_merges_first(lora_run, compose_task):
    from genframe.tasks.finetune import finetune
    from genframe.weights import read_weights

    result = finetune(compose_task("finetune", f"run={lora_run['run_dir']}", *NOT_MODEL))
    spec, state = read_weights(result["run_dir"] / "model.safetensors")
    assert spec.lora is None and not any("lora_" in k for k in state)
    info = json.loads((result["run_dir"] / "run.json").read_text())
    assert info["merged_adapters_of_start"] and info["parameters"]["trainable_fraction"] == 1.0


def test_export_refuses_merge_without_adapters(trained, compose_task, tmp_path):
    from genframe.errors import UserError
    from genframe.tasks.export import export

    with pytest.raises(UserError, match="carries no LoRA adapters"):
        export(compose_task("export", f"run={trained['run_dir']}", "merge=true"))
    out = tmp_path / "exported"
    result = export(compose_task("export", f"run={trained['run_dir']}", f"out={out}"))
    assert result["run_dir"] == out and (out / "model.safetensors").exists()
    with pytest.raises(UserError, match="already holds"):
        export(compose_task("export", f"run={trained['run_dir']}", f"out={out}"))


def test_cli_reports_a_pattern_that_matches_nothing(trained, cli):
    res = cli("finetune", f"run={trained['run_dir']}", "method=lora",
              "finetune.lora.target_modules=[*.attn.*]", *NOT_MODEL)
    assert res.returncode == 2, res.stderr
    assert "finetune.lora.target_modules: pattern '*.attn.*' matches no module" in res.stderr
    assert "to_posterior" in res.stderr and "Traceback" not in res.stderr
    # The VAE names no default layers: the message lists those it could adapt.
    res = cli("finetune", f"run={trained['run_dir']}", "method=lora", *NOT_MODEL)
    assert res.returncode == 2 and "names no default layers" in res.stderr, res.stderr
    assert "to_posterior" in res.stderr


def test_finetune_group_choices(cli):
    res = cli("finetune", "method=lroa")
    assert res.returncode == 2 and "lora" in res.stderr


# -- the transformer language model ------------------------------------------------------

def _transformer():
    from genframe.testing import build_tiny

    torch.manual_seed(0)
    return build_tiny("transformer").eval()


def _default_targets() -> list[str]:
    """method=lora leaves target_modules null: the model's own default applies."""
    from genframe.config import compose
    from genframe_plugins.transformer.model import Transformer

    assert compose("finetune", ["method=lora"]).finetune.lora.target_modules is None
    return list(Transformer.lora_target_modules)


def test_default_targets_are_the_transformers_attention_and_mlp_layers():
    from genframe.errors import UserError
    from genframe.lora import apply_lora, merge_lora

    m = _transformer()
    tokens = m.example_batch(2)["tokens"][:, :-1]  # (B, block_size)
    summary = apply_lora(m, r=4, alpha=8, target_modules=_default_targets())
    assert summary["target_modules"] == [f"net.transformer.h.0.{n}" for n in
                                         ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    _perturb(m)
    with torch.no_grad():
        adapted = m(tokens)
        merge_lora(m)
        assert torch.allclose(m(tokens), adapted, atol=1e-5)
    assert set(m.state_dict()) == set(_transformer().state_dict())
    # The output layer shares the token embedding (tie_weights): refused, not silently untied.
    with pytest.raises(UserError, match="tied weights"):
        apply_lora(_transformer(), r=2, alpha=2, target_modules=["net.lm_head"])


TINY_LM = ["data=text", "model=transformer", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
           "data.block_size=16"]


def test_lora_finetune_generate_export_on_a_tiny_transformer(cli, compose_task, tmp_path):
    """train -> `genframe finetune method=lora` -> generate -> `genframe export merge=true`
    -> generate from the exported file (the two LoRA commands through the CLI)."""
    from genframe.tasks.generate import generate
    from genframe.tasks.train import train
    from genframe.weights import read_weights

    def ok(*args):
        res = cli(*args)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    base = train(compose_task("train", *TINY_LM, *FAST_TRAINING))["run_dir"]
    lora, out = tmp_path / "lora", tmp_path / "exported"
    shown = ok("finetune", f"run={base}", "method=lora", *FAST_TRAINING, f"hydra.run.dir={lora}")
    assert "LoRA (r=8, alpha=16) on 4 modules" in shown and "net.transformer.h.*.mlp.c_fc" in shown
    assert "trainable parameters: 2,048 of" in shown
    assert (lora / "adapter.safetensors").exists() and (lora / "tokenizer.json").exists()
    sample = ["num_samples=2", "++sampling.max_new_tokens=5", "seed=3"]  # ++: as the CLI adds
    direct = generate(compose_task("generate", f"run={lora}", *sample))["samples"][0]
    assert len(direct.texts) == 2

    ok("export", f"run={lora}", "merge=true", f"out={out}")
    spec, state = read_weights(out / "model.safetensors")
    assert spec.lora is None and spec.tokenizer and (out / "tokenizer.json").exists()
    assert not any("lora_" in k or "base_layer" in k for k in state)
    exported = generate(compose_task("generate", f"ckpt={out / 'model.safetensors'}", *sample))
    assert exported["samples"][0].texts == direct.texts
