"""Every user mistake ends with a short message naming the key, exit status 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from genframe.hookspecs import hookimpl


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("genframe: error:"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_unknown_group_choice_suggests_the_closest(cli):
    assert_user_error(cli("train", "model=vea"), "model=vea", "Did you mean 'vae'", "command line")


def test_unknown_key_suggests_the_closest(cli):
    assert_user_error(cli("train", "model.latnt_dim=4"), "model.latnt_dim", "'latent_dim'")


def test_unknown_top_level_key(cli):
    assert_user_error(cli("generate", "num_sample=3"), "num_sample", "'num_samples'")


def test_wrong_type_names_key_and_source(cli):
    assert_user_error(cli("train", "trainer.max_epochs=abc"),
                      "trainer.max_epochs", "expected an integer", "'abc'", "command line")


def test_wrong_type_in_model_key(cli):
    assert_user_error(cli("train", "model.latent_dim=1.5"), "model.latent_dim", "expected an integer")


def test_missing_data_folder(cli, tmp_path):
    assert_user_error(cli("train", "data=image_folder", f"data.root={tmp_path / 'nope'}"), "data.root")


def test_data_folder_without_images(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert_user_error(cli("train", "data=image_folder", f"data.root={tmp_path / 'empty'}"), "data.root")


def test_image_folder_needs_root(cli):
    assert_user_error(cli("train", "data=image_folder"), "data.root")


def test_run_dir_missing(cli, tmp_path):
    assert_user_error(cli("generate", f"run={tmp_path / 'missing'}"), "run=", "no such directory")


def test_run_dir_not_genframe(cli, tmp_path):
    (tmp_path / "other").mkdir()
    assert_user_error(cli("generate", f"run={tmp_path / 'other'}"), "not a genframe run directory")


def test_ckpt_missing(cli, tmp_path):
    assert_user_error(cli("evaluate", f"ckpt={tmp_path / 'x.ckpt'}"), "ckpt=", "no such file")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_ckpt_not_genframe(cli, tmp_path, suffix):
    bad = tmp_path / f"random{suffix}"
    bad.write_bytes(b"\x00garbage" * 100)
    assert_user_error(cli("generate", f"ckpt={bad}"), "ckpt=")


def test_gpu_preset_without_gpu(cli):
    assert_user_error(cli("train", "trainer=gpu", env={"CUDA_VISIBLE_DEVICES": ""}),
                      "trainer=gpu", "trainer=cpu")


def test_unknown_command(cli):
    assert_user_error(cli("trian"), "Did you mean 'train'")


def test_unparsable_override(cli):
    assert_user_error(cli("train", "model.block_out_channels=[8,"), "cannot parse")


def test_debug_flag_shows_the_traceback(cli):
    result = cli("train", "trainer.max_epochs=abc", "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_model_data_mismatch_is_refused_before_training(tmp_path, compose_task):
    """A model needing tokens on image data: refused at build time, naming both sides."""
    from genframe import plugins
    from genframe.errors import UserError
    from genframe.tasks.train import train

    plugins.add_plugin("needs_tokens", _TokensPlugin)
    try:
        cfg = compose_task("train", "model=vae", "model.name=text_only")
        with pytest.raises(UserError, match=r"needs batch keys .*tokens.*data 'digits' provides"):
            train(cfg)
    finally:
        plugins.remove_plugin("needs_tokens")
    assert not any(tmp_path.rglob("*.ckpt"))


class _TokensPlugin:
    """An in-process plugin whose model needs `tokens` (which digits do not provide)."""

    @staticmethod
    @hookimpl
    def genframe_register_models(register):
        register("text_only", "tests.support:TokensModel")


def test_unknown_sampler_suggests_the_closest(cli, tmp_path):
    assert_user_error(cli("generate", f"run={tmp_path}", "sampler=dimm"),
                      "sampler=dimm", "Did you mean 'ddim'")


def test_sampler_steps_out_of_range(tmp_path, compose_task):
    """A sampler argument the sampler refuses (steps above the training timesteps)."""
    from genframe.errors import UserError
    from genframe.tasks.build import build_sampler
    from genframe.testing import build_tiny

    model = build_tiny("diffusion").eval()  # tiny preset: 50 training timesteps
    with pytest.raises(UserError, match="sampler.steps must be between 1 and 50"):
        model.generate(2, seed=0, sampler=build_sampler({"name": "ddim", "steps": 80}))
    with pytest.raises(UserError, match="sampler.eta must be in"):
        build_sampler({"name": "ddim", "eta": 2.0})
    with pytest.raises(UserError, match="guidance"):
        model.generate(2, seed=0, guidance=-1.0)


def test_a_single_value_where_keys_are_expected(cli):
    run = Path(__file__).parent / "data" / "runs_before_format_1" / "vae"
    assert_user_error(cli("generate", f"run={run}", "condition=3"),
                      "condition=3: expected keys under condition, e.g. condition.label=3")
    assert_user_error(cli("generate", f"run={run}", "sampling=0.5"),
                      "sampling: expected keys under sampling", "got 0.5", "sampling=0.5")
