"""Error messages point at the real fix: the key where it lives, the quoting Hydra needs,
the group the task has, and where the mistake came from (exit status 2, no traceback)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from genframe.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.fixture
def fail(tmp_path, monkeypatch, capsys):
    """Run `genframe <args>`; assert exit status 2 and no traceback; return the message."""
    monkeypatch.chdir(tmp_path)

    def _run(*args: str) -> str:
        code = main([*args, f"hydra.run.dir={tmp_path}/run"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        assert err.startswith("genframe: error: "), err
        return err.removeprefix("genframe: error: ").strip()

    return _run


# -- an unknown key that lives under a group ---------------------------------------------


@pytest.mark.parametrize("task, given, fix", [
    ("train", "batch_size=8", "data.batch_size=8"),
    ("train", "lr=1e-3", "model.lr=1e-3"),
    ("train", "latent_dim=4", "model.latent_dim=4"),
    ("train", "max_epochs=3", "trainer.max_epochs=3"),
    ("train", "batch_sise=8", "data.batch_size=8"),          # misspelt as well
    ("train", "model.batch_size=8", "data.batch_size=8"),    # under the wrong group
    ("evaluate", "num_samples=10", "metrics.num_samples=10"),
    ("finetune", "freeze=[a]", "finetune.freeze=[a]"),
])
def test_unknown_key_names_where_it_lives(fail, task, given, fix):
    message = fail(task, given)
    assert f"Did you mean {fix}?" in message, message
    assert f"command line: {given}" in message


def test_a_misspelt_key_at_its_level_is_named(fail):
    assert "Did you mean 'model'?" in fail("train", "modle=vae")
    assert "Did you mean 'latent_dim'?" in fail("train", "model.latnt_dim=4")


def test_unknown_key_suggests_a_models_sampling_option(fail):
    message = fail("generate", "max_new_tokens=40")
    assert "Did you mean sampling.max_new_tokens=40 (a sampling option of model 'transformer')?" in message
    assert "temperature" in fail("train", "temperature=0.5").split("Did you mean")[1]


def test_unknown_key_suggests_a_choice_that_has_it(fail):
    # generate has no sampler by default; ddim/ddpm hold `steps`.
    assert "sampler=ddim sampler.steps=50" in fail("generate", "steps=50")


def test_unknown_key_offers_no_far_fetched_spelling(fail):
    message = fail("train", "foo=1")
    assert "Did you mean" not in message, message


# -- the `+key` hint only where an added key is used -------------------------------------


@pytest.mark.parametrize("given", ["foo=1", "model.foo=1", "data.foo=1", "trainer.foo=1", "paths.foo=1"])
def test_no_plus_hint_where_adding_would_not_work(fail, given):
    message = fail("train", given)
    assert "+" not in message.split("Keys at")[-1], message


def test_plus_hint_for_a_new_callback(fail):
    message = fail("train", "callbacks.lr_monitor=1")
    assert "+callbacks.lr_monitor._target_=<class>" in message


# -- group choices: where the mistake came from ------------------------------------------


@pytest.mark.parametrize("args, origin", [
    (["-m", "model=vae,vea"], "command line: model=vae,vea"),
    (["model='vea'"], "command line: model='vea'"),
    (["model=vae/foo"], "command line: model=vae/foo"),
    (["+model=vea"], "command line: +model=vea"),
])
def test_group_typo_on_the_command_line_is_said_to_come_from_it(fail, args, origin):
    message = fail("train", *args)
    assert origin in message and "train.yaml" not in message, message
    assert "config group 'model'" in message and "Did you mean 'vae'?" in message


@pytest.mark.parametrize("task, given", [("train", "data=digts"), ("evaluate", "data=digts"),
                                         ("finetune", "data=digts"), ("train", "experiment=digits_vea"),
                                         ("generate", "sampler=ddimm"), ("chat", "template=qaa")])
def test_group_typo_in_every_task(fail, task, given):
    message = fail(task, given)
    assert f"command line: {given}" in message and "Did you mean" in message, message


@pytest.mark.parametrize("task", ["generate", "chat", "export"])
def test_a_group_the_task_does_not_have(fail, task):
    message = fail(task, "model=vae")
    assert f"{task} has no config group 'model'" in message
    assert "run=DIR or ckpt=FILE" in message
    assert "+model" not in message  # adding it would be ignored


def test_plus_on_a_chosen_group(fail):
    message = fail("train", "+model=vae")
    assert message.startswith("+model=vae:") and "model=vae (no '+')" in message


def test_force_add_of_a_group(fail):
    assert "choose with model=vae" in fail("train", "++model=vae")


# -- the override grammar ----------------------------------------------------------------


def test_parse_error_names_the_override_and_shows_the_quoting(fail):
    message = fail("generate", "run=x", "prompt=<user> hi")
    assert message.startswith("'prompt=<user> hi':"), message
    assert """'prompt="<user> hi"'""" in message


def test_the_quoted_form_parses_and_keeps_the_text():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from genframe.hydra_errors import shell_quoted

    for value in ("<user> hi", 'say "hi"', "it's", "a,b:c"):
        word = shlex.split(shell_quoted("prompt", value))[0]
        assert OverridesParser.create().parse_overrides([word])[0].value() == value


def test_override_without_a_value(fail):
    message = fail("train", "model")
    assert "model=<choice>" in message and "vae" in message
    assert "model.latent_dim=<value>" in fail("train", "model.latent_dim")


def test_commas_without_multirun(fail):
    message = fail("train", "model.lr=1e-3,2e-3")
    assert "-m" in message and "model.lr=[1e-3,2e-3]" in message


def test_readme_command_lines_parse():
    """Every override in the README's shell examples reaches Hydra in a form it parses
    (placeholders like <time> in paths stand for a value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", README, flags=re.S):
        lines += [ln.strip() for ln in block.replace("\\\n", " ").splitlines()]
    lines = [ln.split(" #")[0] for ln in lines if ln.startswith("genframe ")]
    assert any("prompt=" in ln for ln in lines)
    for line in lines:
        for word in shlex.split(re.sub(r"/<\w+>", "/X", line))[2:]:
            if word.startswith("-") or "=" not in word:
                continue
            word = re.sub(r"=~/", "=/home/", word)  # the shell expands ~ after = in bash
            parser.parse_overrides([word])  # raises on a line a user could not run


# -- plurals -----------------------------------------------------------------------------


def test_plural_and_empty_lists_read_right():
    from genframe.errors import plural, valid_list

    assert plural(1, "key") == "1 key" and plural(2, "key") == "2 keys"
    assert plural(0, "class", "classes") == "0 classes"
    assert valid_list([]) == "none"


def test_a_bad_sweep_function(fail):
    message = fail("train", "-m", "model.latent_dim=range(1,x)")
    assert message.startswith("'model.latent_dim=range(1,x)':") and "range(1,5)" in message


def test_plus_on_a_group_listed_as_null(fail):
    message = fail("train", "+experiment=digits_vae")
    assert "experiment=digits_vae (no '+')" in message and "override" not in message


# -- Hydra's flags -----------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["--cfg=jobb"], "--cfg takes one of job, hydra, all, got 'jobb'"),
    (["-cfg", "job"], "did you mean --cfg job"),
    (["--multrun", "model.lr=1,2"], "Did you mean '--multirun'"),
])
def test_misused_flags(fail, args, expected):
    message = fail("train", *args)
    assert expected in message and "usage:" not in message, message


# -- a key of another task ---------------------------------------------------------------


@pytest.mark.parametrize("given, fragments", [
    ("sampling.temperature=0.5", ["Did you mean temperature=0.5?"]),
    ("prompt=hi", ["'prompt' is a key of generate, not of chat", "standard input"]),
    ("prompt_file=m.txt", ["not of chat", "< messages.txt"]),
    ("num_samples=3", ["'num_samples' is a key of", "not of chat"]),
])
def test_chat_names_its_own_keys(fail, given, fragments):
    message = fail("chat", "run=/nowhere", given)
    for fragment in fragments:
        assert fragment in message, message
    assert "+" + given.split("=")[0] not in message  # adding the key would do nothing


def test_plurals_read_right(capsys):
    assert main(["plugins", "--jsn"]) == 2
    assert "unknown argument --jsn;" in capsys.readouterr().err
    assert main(["plugins", "--a", "--b"]) == 2
    assert "unknown arguments --a --b;" in capsys.readouterr().err


def test_a_plugin_config_with_a_byte_order_mark_keeps_its_package_header(tmp_path):
    from genframe.config import _package_header

    path = tmp_path / "exp.yaml"
    path.write_bytes("\ufeff# @package _global_\nseed: 1\n".encode())
    assert _package_header(path) == "_global_"


def test_an_override_with_an_unresolvable_interpolation_is_named(fail):
    message = fail("generate", "run=/nowhere", "prompt=${oc.env:GENFRAME_NO_SUCH_VARIABLE}")
    assert message.startswith("prompt=${oc.env:GENFRAME_NO_SUCH_VARIABLE}: cannot resolve"), message


def test_words_the_shell_split_off_a_value_get_the_quoting(fail):
    message = fail("generate", "run=/nowhere", "prompt=The", "for", "statement")
    assert "Quote the whole override: 'prompt=\"The for statement\"'" in message, message


def test_any_trainer_argument_is_accepted_and_a_typo_refused_first(fail, compose_task):
    from genframe.tasks.preflight import check_task_config

    check_task_config(compose_task("train", "++trainer.strategy=ddp_spawn"), "train")
    check_task_config(compose_task("train", "trainer.max_epochs=0"), "train")  # validate only
    message = fail("train", "trainer.max_epoch=3")
    assert message.startswith("trainer.max_epoch: unknown key (set in the command line: "
                              "trainer.max_epoch=3). Did you mean 'max_epochs'"), message


def test_metric_options_show_null_as_typed(fail):
    assert "metrics.timm_model=null" in fail("evaluate", "run=/nowhere", "metrics.extractor=timm")


def test_a_language_model_on_image_data_names_the_fitting_data():
    from genframe.data.digits import DigitsDataModule
    from genframe.errors import UserError

    with pytest.raises(UserError, match=r"provides image, label, not text.*data=text or data=chat"):
        DigitsDataModule().use_tokenizer(object())


def test_finetune_points_model_keys_to_its_hparams(fail):
    message = fail("finetune", "run=/nowhere", "model.latent_dim=8")
    assert "change a hyperparameter with finetune.hparams.latent_dim=8" in message, message


def test_a_key_under_a_null_mapping_says_how_to_set_it(fail):
    message = fail("chat", "run=/nowhere", "chat_template.user=x")
    assert "chat_template is null" in message and "+chat_template.user=x" in message, message
    assert "'chat_template={user: x}'" in message, message


@pytest.mark.parametrize("task", ["generate", "evaluate", "export", "chat"])
def test_a_task_without_a_model_names_every_source(fail, task):
    message = fail(task)
    assert all(key in message for key in ("run=", "ckpt=", "hub=")), message
