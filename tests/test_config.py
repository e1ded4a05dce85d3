import pytest
from omegaconf import OmegaConf

from pixelformer import UserError
from pixelformer.config import compose, compose_saved, to_plain
from conftest import run_tool


def test_defaults_and_overrides():
    cfg = compose([])
    assert (cfg.task.name, cfg.model.name, cfg.data.name) == ("cls", "pit_mini", "digits")
    cfg = compose(["model=pit_tiny", "data=cifar100", "optim.lr=2e-3", "trainer.max_epochs=5", "model.depth=4"])
    assert cfg.model.name == "pit_tiny" and cfg.model.depth == 4
    assert cfg.data.name == "cifar100" and cfg.data.augment == "mocov3"
    assert cfg.optim.lr == pytest.approx(2e-3) and cfg.trainer.max_epochs == 5
    assert isinstance(to_plain(cfg), dict)


def test_group_files_layer_under_the_command_line():
    cfg = compose(["optim=pit_cifar", "optim.weight_decay=0.1"])
    assert cfg.optim.lr == pytest.approx(4e-3) and list(cfg.optim.betas) == [0.9, 0.95]
    assert cfg.optim.weight_decay == pytest.approx(0.1)


@pytest.mark.parametrize("args,needles", [
    (["optim.lrr=1"], ["Key 'lrr' not in 'OptimCfg'", "Did you mean: 'lr'", "optim.lrr"]),
    (["mdel.depth=2"], ["Key 'mdel'", "Did you mean: 'model'"]),
    (["task.label_smothing=0.1"], ["label_smoothing"]),
    (["optim.lr=abc"], ["could not be converted", "optim.lr"]),
    (["model.pos_embed=rope"], ["rope", "sincos", "learned", "none"]),
    (["model=pit_tinny"], ["unknown model 'pit_tinny'", "Did you mean: pit_tiny"]),
    (["data=cifar1000"], ["unknown data", "cifar100"]),
    (["task=clss"], ["unknown task", "cls"]),
    (["data.batch_size=0"], ["data.batch_size must be positive"]),
    (["trainer.max_steps=-3"], ["trainer.max_steps must be positive"]),
    (["lr"], ["cannot parse argument 'lr'"]),
])
def test_config_mistakes_name_the_problem(args, needles):
    with pytest.raises(UserError) as info:
        compose(args)
    for needle in needles:
        assert needle in str(info.value)


def test_saved_config_round_trip_and_overrides():
    cfg = compose(["model=pit_tiny"])
    again = compose_saved(to_plain(cfg), ["data.img_size=16"])
    assert again.model.name == "pit_tiny" and again.data.img_size == 16
    with pytest.raises(UserError, match="key by key"):
        compose_saved(to_plain(cfg), ["data=cifar10"])


@pytest.mark.slow
def test_cli_help_lists_groups_and_errors_have_no_traceback(capsys):
    from pixelformer.cli import train

    assert train.main(["--help"]) == 0  # in-process: the subprocess below checks what the process itself prints
    out = capsys.readouterr().out
    for needle in ("task", "model", "pit_tiny", "vit_huge", "cifar100", "digits", "logger"):
        assert needle in out
    assert train.main(["--cfg", "model=vit_small", "model.patch_size=4", "run.dir=/unused"]) == 0
    shown = capsys.readouterr().out
    assert "vit_small" in shown and OmegaConf.create(shown).model.patch_size == 4
    bad = run_tool("train", "optim.lrr=1")
    assert bad.returncode == 2
    assert "Did you mean: 'lr'" in bad.stderr and "Traceback" not in bad.stderr
