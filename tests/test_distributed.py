"""Several processes: `trainer=ddp` (Lightning starts the genframe command again per
process), `trainer=ddp_spawn`, two "nodes" started by torchrun on localhost, the data
each rank reads, and what the hardware presets refuse on this CPU-only machine.

Processes talk over gloo on 127.0.0.1. The default suite keeps one end-to-end check per
launcher (ddp, torchrun); every family under ddp and the comparisons against one
process are marked slow.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, FAST_TRAINING

TWO = ["trainer=ddp", "trainer.devices=2"]

RECORDER = '''
import hashlib, json, os
import pytorch_lightning as pl
import torch

class RecordRanks(pl.Callback):
    """Per rank and step: the items of the batch (digests) and a digest of torch's
    random generator as the step starts (what the model's noise is drawn from)."""
    def __init__(self, folder):
        self.folder = folder
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        key = "image" if "image" in batch else "tokens"
        items = [hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()[:12] for x in batch[key]]
        rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "items": items, "rng": rng}) + "\\n")
'''


def _recorder(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    (tmp_path / "ddp_recorder.py").write_text(textwrap.dedent(RECORDER))
    record = tmp_path / "ranks"
    record.mkdir()
    args = ["+callbacks.ranks._target_=ddp_recorder.RecordRanks", f"+callbacks.ranks.folder={record}"]
    return args, {"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}


def _records(tmp_path: Path, rank: int) -> list[dict]:
    lines = (tmp_path / "ranks" / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _only_run(tmp_path: Path, task: str = "train") -> Path:
    runs = [p for p in (tmp_path / "outputs" / task).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_ddp_two_processes_share_the_data_draw_their_own_noise_and_rank_zero_writes(cli, tmp_path):
    record, env = _recorder(tmp_path)
    done = cli("train", *TWO, *FAST, "trainer.limit_train_batches=3", *record, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run = _only_run(tmp_path)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 3
    # The second process was the genframe command again, in the same run directory.
    assert (run / "train_rank1.log").exists() and not (run / "train_ddp_process_1.log").exists()
    zero, one = _records(tmp_path, 0), _records(tmp_path, 1)
    assert [r["step"] for r in zero] == [r["step"] for r in one] == [0, 1, 2]
    for a, b in zip(zero, one):
        assert a["rng"] != b["rng"]  # the ranks draw different noise
        assert not set(a["items"]) & set(b["items"])  # and read different items
    # Written once: the samples (not one set per rank) and the metrics of both ranks' data.
    assert len(list((run / "samples").glob("*.png"))) == 4 + 1  # four samples and the grid
    assert "val/loss" in json.loads((run / "metrics.json").read_text())


def test_epoch_shuffle_gives_each_rank_its_share_of_one_order():
    """The ranks' batches of a step are the items one process with a world-size times
    larger batch takes at that step (what makes DDP match one process)."""
    from genframe.data.base import EpochShuffle

    for size, epoch in ((20, 0), (21, 3)):
        single = EpochShuffle(size, seed=7)
        single.set_epoch(epoch)
        order = list(single)
        shares = []
        for rank in range(2):
            sampler = EpochShuffle(size, seed=7, num_replicas=2, rank=rank)
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
        assert len(shares[0]) == len(shares[1]) == (size + 1) // 2
        batch = 3
        for step in range(size // (2 * batch)):
            together = shares[0][step * batch:(step + 1) * batch] + shares[1][step * batch:(step + 1) * batch]
            assert sorted(together) == sorted(order[step * 2 * batch:(step + 1) * 2 * batch])
        assert set(shares[0]) | set(shares[1]) == set(range(size))


@pytest.mark.parametrize("args,expected", [
    (["trainer=gpu"], "CUDA GPU"),
    (["trainer=fsdp"], "CUDA"),
    (["trainer=deepspeed"], "CUDA"),
    (["trainer=tpu"], "TPU"),
    (["trainer=ddp", "trainer.devices=64"], "CPU cores"),
    (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=[0,1]"], "device indices need GPUs"),
    (["trainer.devices=-1"], "means every GPU"),
])
def test_presets_for_absent_hardware_are_refused_before_anything_runs(cli, tmp_path, args, expected):
    done = cli("train", *args, *FAST)
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.rglob("model.safetensors"))  # refused before any training


def test_ddp_inside_a_multirun_is_refused_with_the_alternatives(cli, tmp_path):
    done = cli("train", "-m", *TWO, *FAST, "model.latent_dim=2,3")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "multirun" in done.stderr and "ddp_spawn" in done.stderr and "torchrun" in done.stderr
    assert not list((tmp_path / "outputs").glob("train-multirun/*/*/model.safetensors"))


def test_ddp_from_python_is_refused_with_ddp_spawn_named(compose_task):
    from genframe.errors import UserError
    from genframe.tasks.train import train

    with pytest.raises(UserError, match="ddp_spawn"):
        train(compose_task("train", *TWO, *FAST))


def test_several_nodes_without_a_launcher_are_refused_instead_of_waiting_forever(cli):
    done = cli("train", "trainer=multinode", *FAST, timeout=120)
    assert done.returncode == 2
    assert "torchrun" in done.stderr and "trainer.num_nodes=2" in done.stderr


@pytest.mark.parametrize("trainer", [["trainer=cpu"], ["trainer=multinode", "trainer.num_nodes=1"]])
def test_a_torchrun_launch_the_trainer_does_not_match_is_refused(cli, tmp_path, trainer):
    """torchrun started 2 processes: a trainer of 1 would train two separate models."""
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    done = cli("train", *trainer, *FAST, f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "torchrun started 2 processes" in done.stderr and "trainer=multinode" in done.stderr


def test_ddp_spawn_inside_joblib_workers_is_refused(cli, tmp_path):
    done = cli("train", "-m", "hydra/launcher=joblib", "trainer=ddp_spawn", "trainer.devices=2",
               *FAST, "model.latent_dim=2,3")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "joblib's workers" in done.stderr and "submitit_local" in done.stderr


def test_a_torchrun_rank_without_the_shared_run_directory_is_refused(cli, tmp_path):
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    done = cli("train", "trainer=multinode", *FAST, env=env)
    assert done.returncode == 2
    assert "hydra.run.dir" in done.stderr and "rank 1 of 2" in done.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("run.json"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_simulated_on_localhost_with_torchrun(tmp_path):
    """Two torchrun launches (one process each) rendezvous on 127.0.0.1 and train one
    run through the genframe CLI, as two machines would."""
    port, run_dir = _free_port(), tmp_path / "outputs" / "train" / "two-nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENFRAME_OUTPUT_ROOT": str(tmp_path / "outputs")}
    env.pop("HYDRA_FULL_ERROR", None)
    procs = []
    for node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                   f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
                   "-m", "genframe", "train", "trainer=multinode", *FAST,
                   "trainer.limit_train_batches=3", f"hydra.run.dir={run_dir}"]
        procs.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 3
    assert (run_dir / "train_rank1.log").exists()  # rank 1 joined the same directory
    assert "MEMBER: 2/2" in outputs[1] or "MEMBER: 2/2" in (run_dir / "train_rank1.log").read_text()


# -- settings every preset takes ---------------------------------------------------------


def test_activation_checkpointing_trains_the_same_weights(compose_task, tmp_path):
    """Recomputing the transformer's layers in backward changes memory, not the result."""
    from safetensors.torch import load_file

    from genframe.tasks.train import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    gpt = ["data=text", "model=transformer", "data.source=files", f"data.path={corpus}",
           "data.block_size=16", "data.batch_size=4", "model.n_layer=2", "model.n_head=2",
           "model.n_embd=16", "model.dropout=0.1", *FAST_TRAINING, "trainer.limit_train_batches=4",
           "num_samples=0"]
    weights = []
    for setting in ("false", "true"):
        run = train(compose_task("train", *gpt, f"trainer.activation_checkpointing={setting}"))
        weights.append(load_file(Path(run["run_dir"]) / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args,expected", [
    (["trainer.activation_checkpointing=true"], "does not support it"),
    (["trainer.compile=fastest"], "trainer.compile='fastest'"),
    (["trainer.activation_checkpointing=maybe"], "true or false"),
])
def test_bad_trainer_settings_are_refused(cli, args, expected):
    done = cli("train", *FAST, *args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr


@pytest.mark.slow
def test_compile_trains_the_vae_compiled_and_leaves_it_eager(compose_task, monkeypatch):
    """trainer.compile=true compiles the VAE's trainable networks for training (the real
    torch.compile runs) and puts them back to eager mode for sampling."""
    from torch import nn

    from genframe.tasks.train import train

    compiled = []
    real = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self) or real(self, *a, **k))
    result = train(compose_task("train", *FAST, "trainer.compile=true"))
    names = {name for name, child in result["model"].named_children() if child in compiled}
    assert {"encoder", "decoder"} <= names
    assert all(child._compiled_call_impl is None for child in compiled)
    assert torch.isfinite(torch.tensor(result["metrics"]["val/loss"]))


# -- every family, and DDP against one process (slow) -------------------------------------

FAMILIES = {
    "vae": ["model=vae", "model.latent_dim=2", "model.block_out_channels=[8,16]"],
    "autoencoder": ["model=autoencoder", "data=shapes", "data.image_size=24", "data.jitter=0",
                    "model.block_out_channels=[8,16]", "model.latent_channels=2"],
    "gan": ["model=gan", "model.g_channels=[8,16]", "model.d_channels=[8,16]"],
    "diffusion": ["model=diffusion", "model.block_out_channels=[8,16]", "model.blocks_per_level=1",
                  "model.num_heads=2", "model.timesteps=20", "model.default_sampler_steps=2"],
    "upscaler": ["model=upscaler", "data.image_size=16", "model.block_out_channels=[8,16]",
                 "model.blocks_per_level=1", "model.num_heads=2", "model.timesteps=20",
                 "model.default_sampler_steps=2"],
    "text2image": ["model=text2image", "data=shapes", "data.image_size=24", "data.jitter=0",
                   "data.per_combination=1", "data.batch_size=16", "model.block_out_channels=[8,16]",
                   "model.blocks_per_level=1", "model.attention_resolutions=[12]", "model.num_heads=2",
                   "model.timesteps=50", "model.default_sampler_steps=3", "model.text_width=16",
                   "model.text_depth=1", "model.text_heads=2"],
    "transformer": ["data=text", "model=transformer", "model.n_layer=1", "model.n_head=2",
                    "model.n_embd=16", "data.block_size=32", "data.batch_size=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_under_ddp(cli, tmp_path, family):
    done = cli("train", *TWO, *FAST_TRAINING, "trainer.limit_train_batches=4", *FAMILIES[family],
               env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = _only_run(tmp_path)
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    assert (run / "model.safetensors").exists() and (run / "samples" / "manifest.jsonl").exists()


@pytest.mark.slow
def test_transformer_ddp_matches_one_process_with_the_same_global_batch(cli, tmp_path):
    """No dropout: the loss has no randomness, so 2 processes x 4 windows per step must
    end at the weights of 1 process x 8 windows in the same order (float sums aside)."""
    from safetensors.torch import load_file

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("pack my box with five dozen liquor jugs. " * 60)
    gpt = ["data=text", "model=transformer", "data.source=files", f"data.path={corpus}",
           "data.block_size=16", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
           "model.dropout=0.0", "data.random_offsets=false", "trainer.max_epochs=1", "trainer.limit_train_batches=10",
           "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
           "trainer.enable_progress_bar=false", "num_samples=0", "callbacks=none"]
    weights = {}
    for name, args in (("ddp", [*TWO, "data.batch_size=4"]), ("one", ["data.batch_size=8"])):
        done = cli("train", *gpt, *args, f"hydra.run.dir={tmp_path / name}",
                   env={"OMP_NUM_THREADS": "1"}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    worst = max(float((weights["ddp"][k] - weights["one"][k]).abs().max()) for k in weights["one"])
    assert worst < 1e-5, worst


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vae", "diffusion", "gan"])
def test_noisy_families_follow_one_process_within_noise(cli, tmp_path, family):
    """The loss draws noise, so DDP cannot repeat one process exactly: its validation loss
    after the same steps on the same global batches must lie as close to one process's as
    a second one-process run with another seed does (three times that gap, at least 5%)."""
    steps = ["trainer.max_epochs=1", "trainer.limit_train_batches=12", "trainer.limit_val_batches=4",
             "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "num_samples=0",
             "callbacks=none", *FAMILIES[family]]
    losses = {}
    for name, args in (("ddp", [*TWO, "data.batch_size=16"]), ("one", ["data.batch_size=32"]),
                       ("seed", ["data.batch_size=32", "seed=1"])):
        done = cli("train", *steps, *args, f"hydra.run.dir={tmp_path / name}",
                   env={"OMP_NUM_THREADS": "1"}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        losses[name] = json.loads((tmp_path / name / "metrics.json").read_text())["val/loss"]
    gap = max(3 * abs(losses["seed"] - losses["one"]), 0.05 * abs(losses["one"]))
    assert abs(losses["ddp"] - losses["one"]) <= gap, losses


@pytest.mark.slow
def test_ddp_spawn_runs_inside_a_multirun(cli, tmp_path):
    done = cli("train", "-m", "trainer=ddp_spawn", "trainer.devices=2", *FAST,
               "model.latent_dim=2,3", env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted((tmp_path / "outputs" / "train-multirun").glob("*/[0-9]*/run.json"))
    assert len(jobs) == 2
    assert all(json.loads(p.read_text())["status"] == "completed" for p in jobs)


def test_activation_checkpointing_recomputes_the_blocks_in_training_only(monkeypatch):
    """The callback routes each block's forward through torch.utils.checkpoint while
    gradients are on, never in sampling, and puts the blocks back when training ends."""
    import torch.utils.checkpoint as checkpointing

    from genframe.callbacks.model_settings import ActivationCheckpointing
    from genframe.testing import build_tiny

    model = build_tiny("transformer")
    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    callback = ActivationCheckpointing(model)
    callback.on_fit_start(None, model)
    tokens = torch.randint(0, model.hparams.vocab_size, (2, 8))
    model(tokens).sum().backward()
    assert len(calls) == model.hparams.n_layer
    with torch.no_grad():
        model(tokens)
    assert len(calls) == model.hparams.n_layer  # no recomputation without gradients
    callback.on_fit_end(None, model)
    model(tokens).sum().backward()
    assert len(calls) == model.hparams.n_layer


CACHE_USER = '''
import sys, time
from genframe.text.cache import token_cache
from genframe.text.tokenize import build_tokenizer

docs = ["the same documents in every process " * 200] * 50
tokenizer = build_tokenizer("char", docs)
start = float(sys.argv[2])
while time.time() < start:  # both processes ask at the same moment
    time.sleep(0.001)
_, hit = token_cache(docs, tokenizer, sys.argv[1])
print("hit" if hit else "built")
'''


def test_ranks_asking_for_one_token_cache_entry_build_it_once(tmp_path):
    import time

    script = tmp_path / "cache_user.py"
    script.write_text(textwrap.dedent(CACHE_USER))
    start = str(time.time() + 4)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), start],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert sorted(out.strip() for out, _ in results) == ["built", "hit"]


@pytest.mark.slow
def test_a_ddp_run_resumes_in_place_on_two_processes(cli, tmp_path):
    first = cli("train", *TWO, *FAST, "trainer.limit_train_batches=3", env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr[-3000:]
    run = _only_run(tmp_path)
    again = cli("resume", f"run={run}", "trainer.max_epochs=2", env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 6 and len(info["resumes"]) == 1
    assert (run / "train_rank1.log").exists()  # the second process, started again, only trained
    # On one process: allowed, with a warning (the global batch changes), from the epoch's start.
    single = cli("resume", f"run={run}", "trainer.max_epochs=3", "trainer.devices=1",
                 env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    assert "trained on 2 process(es) and continues on 1" in single.stdout + single.stderr


def test_evaluate_under_several_processes_is_refused(cli, tmp_path):
    assert cli("train", *FAST).returncode == 0
    done = cli("evaluate", f"run={_only_run(tmp_path)}", "trainer=ddp")
    assert done.returncode == 2
    assert "runs in one process" in done.stderr and "trainer=cpu" in done.stderr


def test_a_user_error_on_every_rank_is_one_line_each_not_a_traceback(cli, tmp_path):
    """The processes Lightning starts inherit the environment the CLI set for Hydra; they
    must still report a user's mistake as one line (here: shards too few for 2 ranks)."""
    from PIL import Image

    for c in "ab":
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(30):
            Image.new("RGB", (16, 16), (i * 8, 0, 0) if c == "a" else (0, i * 8, 0)).save(
                tmp_path / "imgs" / c / f"{i}.png")
    made = cli("shards", "data=image_folder", f"data.root={tmp_path / 'imgs'}", "data.image_size=16",
               f"out={tmp_path / 'shards'}", "shard_size=100")
    assert made.returncode == 0, made.stderr[-2000:]
    done = cli("train", *TWO, "data=image_shards", f"data.path={tmp_path / 'shards'}",
               "data.image_size=16", "data.batch_size=8", *FAST_TRAINING, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert "split has 1 shard for 2 ranks" in done.stderr
