"""One table of tasks (`genframe.tasks.TASKS`) drives the CLI, the configs and dispatch."""

from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

from genframe.config import conf_dir
from genframe.tasks import TASKS


def test_every_task_has_its_primary_config_and_every_primary_config_is_a_task():
    primaries = {p.stem for p in conf_dir().glob("*.yaml")}
    assert primaries == set(TASKS)
    for name in TASKS:
        assert OmegaConf.load(conf_dir() / f"{name}.yaml").task_name == name


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_function_takes_a_config_and_is_documented(name):
    fn = TASKS[name].function()
    assert fn.__name__ == name and fn.__doc__
    assert list(inspect.signature(fn).parameters)[0] == "cfg"


def test_training_tasks_have_a_preparation_and_others_refuse_one():
    assert {n for n, t in TASKS.items() if t.prepare_target} == {"train", "finetune"}
    assert callable(TASKS["finetune"].prepare())
    with pytest.raises(ValueError, match="does not train"):
        TASKS["generate"].prepare()


def test_the_cli_help_lists_every_task_from_the_table(cli):
    res = cli("--help")
    assert res.returncode == 0
    for task in TASKS.values():
        assert f"  {task.name:<10} {task.help}" in res.stdout


def test_an_unknown_command_names_the_tasks(cli):
    res = cli("trian")
    assert res.returncode == 2 and "Did you mean 'train'" in res.stderr
    assert all(name in res.stderr for name in TASKS)


def test_dispatch_runs_the_task_the_config_names(monkeypatch):
    import genframe.tasks as tasks
    from genframe.tasks import Task, run

    seen = []
    monkeypatch.setitem(tasks.TASKS, "export",
                        Task("export", "fake", "tests.test_task_table:_fake_task"))
    monkeypatch.setattr("tests.test_task_table._SEEN", seen, raising=False)
    assert run(OmegaConf.create({"task_name": "export"})) == 1.5
    assert seen == ["export"]


_SEEN: list[str] = []


def _fake_task(cfg):
    _SEEN.append(cfg.task_name)
    return {"objective": 1.5}
