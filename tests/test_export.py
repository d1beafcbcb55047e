"""`genframe export format=onnx|torchscript|safetensors`: every family's networks, checked
against PyTorch; LoRA adapters alone or merged; refusals that leave no files; and the
Python API `genframe.load`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import genframe
from genframe import hub
from genframe.errors import UserError
from genframe.exporters import ExportGraph, export_graph
from genframe.plugins import get_registry
from genframe.testing import build_tiny
from tests.conftest import FAST

FAMILIES = ["vae", "gan", "diffusion", "autoencoder", "upscaler", "text2image", "transformer",
            "latent_diffusion", "modern_transformer"]
EXPECTED_GRAPHS = {
    "vae": {"decoder"}, "gan": {"generator"}, "diffusion": {"unet"},
    "autoencoder": {"encoder", "decoder"}, "upscaler": {"unet"},
    "text2image": {"unet", "text_encoder"}, "transformer": {"decoder_model", "decoder_with_past_model"},
    "latent_diffusion": {"unet", "vae_decoder"},
    "modern_transformer": {"decoder_model", "decoder_with_past_model"},
}


def tiny_family(family: str):
    """A tiny model of `family` with every weight drawn at random: freshly built U-Nets
    end in a zero convolution, whose output any graph would match."""
    torch.manual_seed(0)
    if family == "latent_diffusion":
        ae = build_tiny("autoencoder").model_spec.to_dict()
        tiny = {**get_registry().model("diffusion").tiny, "attention_resolutions": None,
                "autoencoder_spec": ae, "latent_scale": 0.7}
        model = build_tiny("diffusion", tiny)
    elif family == "diffusion":
        model = build_tiny("diffusion", {**get_registry().model("diffusion").tiny, "num_classes": 3})
    elif family == "modern_transformer":  # rotary positions, RMSNorm, QK-norm, squared ReLU
        model = build_tiny("transformer", {**get_registry().model("transformer").tiny, "positions": "rotary",
                                           "norm": "rmsnorm", "qk_norm": True, "activation": "relu2"})
    else:
        model = build_tiny(family)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_and_matches_pytorch(family, fmt, tmp_path):
    model = tiny_family(family)
    graphs = model.export_graphs()
    assert set(graphs) == EXPECTED_GRAPHS[family]
    for name, graph in graphs.items():
        path = tmp_path / f"{name}.{fmt}"
        record = export_graph(graph, path, fmt)
        assert path.is_file() and record["max_abs_diff"] < 1e-3
        assert record["checked_input_sets"] >= 2
        # The file is the network: another input through it gives PyTorch's answer, and
        # a changed PyTorch model no longer agrees with it.
        outputs = graph.run(graph.inputs)
        first = outputs[0] if isinstance(outputs, tuple) else outputs
        assert first.abs().max() > 1e-3, f"{family}/{name}: a constant output checks nothing"
        with torch.no_grad():
            for p in graph.module.parameters():
                p.add_(0.5)
        with pytest.raises(UserError, match="differs from PyTorch"):
            export_graph_check_only(graph, path, fmt)


def export_graph_check_only(graph: ExportGraph, path, fmt):
    """Run the check of `export_graph` on an existing file (no new export)."""
    from genframe import exporters

    original = exporters._export_onnx if fmt == "onnx" else exporters._export_torchscript
    try:
        setattr(exporters, "_export_onnx" if fmt == "onnx" else "_export_torchscript",
                lambda graph, path: None)
        return export_graph(graph, path, fmt)
    finally:
        setattr(exporters, "_export_onnx" if fmt == "onnx" else "_export_torchscript", original)


class _BakedBatch(torch.nn.Module):
    """A network whose trace keeps the example's batch size as a constant."""

    def forward(self, x):
        return x.reshape(int(x.shape[0]), -1) * 2


class _DataDependent(torch.nn.Module):
    """Control flow on a tensor's value: torch.export cannot express it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_a_size_baked_into_the_graph_is_caught(tmp_path):
    graph = ExportGraph(_BakedBatch(), {"x": torch.randn(2, 3, 4)}, ("y",), {"x": {0: "batch"}},
                        check_inputs=[{"x": torch.randn(3, 3, 4)}])
    with pytest.raises(UserError, match="shape"):
        export_graph(graph, tmp_path / "baked.pt", "torchscript")


def test_a_network_the_exporter_cannot_express_is_refused(tmp_path):
    graph = ExportGraph(_DataDependent(), {"x": torch.randn(2, 3)}, ("y",), {"x": {0: "batch"}})
    with pytest.raises(UserError, match="cannot express"):
        export_graph(graph, tmp_path / "dd.onnx", "onnx")


def test_onnx_language_model_generates_what_pytorch_generates(tiny_lm_run, cli, tmp_path):
    """Greedy decoding with the exported cached graph in onnxruntime (an empty past for
    the prompt, then one token per step) gives the model's own greedy text."""
    import onnxruntime as ort

    done = cli("export", f"run={tiny_lm_run}", "format=onnx", f"out={tmp_path / 'onnx'}")
    assert done.returncode == 0, done.stderr
    assert "decoder_with_past_model.onnx  max |onnx - torch|" in done.stdout
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert info["graphs"]["decoder_model"]["max_abs_diff"] < 1e-4
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
    model = genframe.load(tiny_lm_run)
    prompt = "The "
    session = ort.InferenceSession(str(tmp_path / "onnx" / "decoder_with_past_model.onnx"))
    layers, _, heads, _, dim = info["graphs"]["decoder_with_past_model"]["inputs"][1]["shape"]
    keys = values = np.zeros((layers, 1, heads, 0, dim), np.float32)
    ids = np.array([model.tokenizer.encode(prompt)], dtype=np.int64)
    made = []
    for _ in range(12):
        logits, keys, values = session.run(None, {"input_ids": ids, "past_keys": keys,
                                                  "past_values": values})
        made.append(int(logits[0, -1].argmax()))
        ids = np.array([[made[-1]]], dtype=np.int64)
    expected = model.generate(1, condition={"prompt": prompt}, seed=0, temperature=0,
                              max_new_tokens=12).texts[0]
    assert model.tokenizer.decode(made) == expected


def test_lora_adapters_export_alone_merged_or_in_the_graph(tiny_lm_run, cli, tmp_path):
    tuned = cli("finetune", f"run={tiny_lm_run}", "method=lora", "trainer.max_steps=3",
                "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                f"hydra.run.dir={tmp_path / 'lora'}")
    assert tuned.returncode == 0, tuned.stderr
    alone = cli("export", f"run={tmp_path / 'lora'}", "adapter_only=true", f"out={tmp_path / 'a'}")
    assert alone.returncode == 0, alone.stderr
    written = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name not in (".hydra", "export.log"))
    assert written == ["adapter.safetensors", "config.yaml", "run.json"]
    # The adapters alone on the base give the tuned model back.
    tuned_model = genframe.load(tmp_path / "lora")
    rebuilt = genframe.load(tiny_lm_run, adapter=tmp_path / "a" / "adapter.safetensors")
    ids = torch.randint(0, 50, (1, 8))
    assert torch.allclose(tuned_model(ids), rebuilt(ids), atol=1e-5)
    for merge in ("false", "true"):
        out = tmp_path / f"ts-{merge}"
        done = cli("export", f"run={tmp_path / 'lora'}", "format=torchscript", f"merge={merge}", f"out={out}")
        assert done.returncode == 0, done.stderr
        scripted = torch.jit.load(str(out / "decoder_model.pt"))
        assert torch.allclose(scripted(ids), tuned_model(ids), atol=1e-4)
        assert json.loads((out / "export.json").read_text())["merged_adapters"] is (merge == "true")


def test_refusals_leave_no_files(tiny_lm_run, cli, tmp_path, monkeypatch):
    # adapter_only / merge on a model without adapters; adapter_only with a graph format
    for bad, said in [(["adapter_only=true"], "carries no LoRA adapters"),
                      (["merge=true"], "carries no LoRA adapters"),
                      (["adapter_only=true", "format=onnx"], "cannot go with format=onnx"),
                      (["format=tflite"], "format"),
                      (["format=onnx", "merge=maybe"], "merge")]:
        done = cli("export", f"run={tiny_lm_run}", *bad, f"out={tmp_path / 'x' / 'y'}")
        assert done.returncode == 2 and said in done.stderr, (bad, done.stderr)
        assert not (tmp_path / "x").exists(), bad
    blocker = tmp_path / "file"  # a path below a file cannot be written (even as root)
    blocker.write_text("not a folder")
    done = cli("export", f"run={tiny_lm_run}", "format=onnx", f"out={blocker / 'e'}")
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr
    assert blocker.read_text() == "not a folder"


def test_a_failing_graph_leaves_no_files(tiny_lm_run, tmp_path, monkeypatch, compose_task):
    """The second network fails to export: the first one's file, already written and
    checked, is removed with the staging folder, and the folder given is not created."""
    from genframe.tasks.export import export
    from genframe_plugins.transformer.model import Transformer

    real = Transformer.export_graphs

    def one_bad(self):
        graphs = real(self)
        graphs["zz_bad"] = ExportGraph(_DataDependent(), {"x": torch.randn(2, 3)}, ("y",))
        return graphs

    monkeypatch.setattr(Transformer, "export_graphs", one_bad)
    out = tmp_path / "new" / "folder"
    with pytest.raises(UserError, match="cannot export its 'zz_bad' network"):
        export(compose_task("export", f"run={tiny_lm_run}", "format=onnx", f"out={out}"))
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(Transformer, "export_graphs", lambda self: {})
    with pytest.raises(UserError, match="exports no networks"):
        export(compose_task("export", f"run={tiny_lm_run}", "format=torchscript", f"out={out}"))
    assert not (tmp_path / "new").exists()


def test_the_python_api_loads_runs_files_and_hub_entries(tmp_path, monkeypatch):
    from genframe.config import compose
    from genframe.tasks.train import train

    run = train(compose("train", [*FAST, f"paths.output_dir={tmp_path / 'run'}"]))["run_dir"]
    monkeypatch.setenv(hub.HUB_ENV, str(tmp_path / "hub"))
    hub.push(run, "digits")
    by_run = genframe.load(run)
    by_file = genframe.load(run / "model.safetensors")
    by_hub = genframe.load("hub:digits:1")
    made = [m.generate(3, seed=5) for m in (by_run, by_file, by_hub)]
    assert made[0].images.shape == (3, 1, 8, 8) and not by_hub.training
    assert all(torch.equal(made[0].images, m.images) for m in made[1:])
    folder = genframe.write_samples(made[0], folder=tmp_path / "samples")
    assert sorted(p.name for p in folder.iterdir())[:2] == ["000000.png", "000001.png"]
    assert len((folder / "manifest.jsonl").read_text().splitlines()) == 3
    with pytest.raises(UserError, match="no such run directory"):
        genframe.load(tmp_path / "missing")
    with pytest.raises(UserError, match="no such run directory"):
        genframe.load("")
    with pytest.raises(UserError, match="a .png file is not genframe weights"):
        genframe.load(run / "samples" / "grid.png")
    with pytest.raises(UserError, match="device='nonsense'"):
        genframe.load(run, device="nonsense")
    exported = tmp_path / "onnx-export"
    exported.mkdir()
    (exported / "export.json").write_text("{}")
    with pytest.raises(UserError, match="ONNX/TorchScript export"):
        genframe.load(exported)
    with pytest.raises(UserError, match="no model named 'other'"):
        genframe.load("hub:other")
    weights = hub.resolve("digits:1").path / "model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    with pytest.raises(UserError, match="checksum|changed|damaged"):
        genframe.load("hub:digits")


def test_the_python_api_from_a_plain_script(tiny_lm_run, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "app.py"
    script.write_text(
        "import sys, genframe\n"
        "lm = genframe.load(sys.argv[1])\n"
        "print(lm.generate(2, condition={'prompt': 'A'}, seed=1, max_new_tokens=5).texts)\n")
    done = subprocess.run([sys.executable, str(script), str(tiny_lm_run)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    texts = eval(done.stdout.strip().splitlines()[-1])
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
