"""Transfer and interop: the sin-cos layout of MAE/DiT, position tables in checkpoints, timm's global pooling with
fc_norm, the LayerNorm epsilon, and init_from for the DiT task."""
import math
from functools import partial

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from pixelformer import CheckpointError, UserError, create_backbone
from pixelformer.checkpoint import check_state_dict, load_backbone_weights, read_checkpoint
from pixelformer.data import DataInfo
from pixelformer.engine import fit
from pixelformer.layers import build_sincos_2d_pos_embed
from pixelformer.models import DiT, MaskedAutoencoder, create_dit
from pixelformer.task import get_task
from conftest import run_tool, tiny_cfg

DIGITS = DataInfo("digits", 10, 1, 8, (0.5,), (0.25,))
SMALL = dict(img_size=8, in_chans=1, depth=1, embed_dim=32, num_heads=2)
LEARNED = dict(SMALL, pos_embed="learned")


# ------------------------------------------------------------------------------------------- 1. sin-cos layout
def test_sincos_table_has_the_mae_dit_layout():
    # MAE/DiT get_2d_sincos_pos_embed: channels [0, D/2) encode the column x, [D/2, D) the row y; each half is
    # [sin(p * w_k), cos(p * w_k)] with w_k = 10000 ** (-k / (D / 4)). D = 16 -> w_k = 10000 ** (-k / 4), k < 4.
    table = build_sincos_2d_pos_embed(16, grid_size=3, num_prefix_tokens=1)
    assert table.shape == (1, 10, 16) and torch.equal(table[0, 0], torch.zeros(16))
    token = table[0, 1 + 2 * 3 + 1]  # row 2, column 1
    assert token[1].item() == pytest.approx(math.sin(1 * 10000 ** -0.25), abs=1e-6)  # column, sin, k=1
    assert token[5].item() == pytest.approx(math.cos(1 * 10000 ** -0.25), abs=1e-6)  # column, cos, k=1
    assert token[9].item() == pytest.approx(math.sin(2 * 10000 ** -0.25), abs=1e-6)  # row, sin, k=1
    assert token[14].item() == pytest.approx(math.cos(2 * 10000 ** -0.5), abs=1e-6)  # row, cos, k=2
    token = table[0, 1 + 0 * 3 + 2]  # row 0, column 2
    assert token[0].item() == pytest.approx(math.sin(2.0), abs=1e-6)
    assert token[4].item() == pytest.approx(math.cos(2.0), abs=1e-6)
    assert token[8].item() == 0.0 and token[12].item() == 1.0  # row 0: sin 0, cos 0


def test_every_model_uses_the_mae_dit_layout():
    # Token (row 0, column 1) of an 8x8 grid: channel 0 is sin(column) = sin(1), channel D/2 is sin(row) = 0.
    vit = create_backbone("pit_mini", **SMALL, pos_embed="sincos")
    mae = MaskedAutoencoder(vit, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    dit = create_dit("pit_mini", **SMALL, num_classes=3)
    for table, prefix, dim in ((vit.pos_embed, 1, 32), (mae.decoder_pos_embed, 1, 16), (dit.pos_embed, 0, 32)):
        assert table[0, prefix + 1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
        assert table[0, prefix + 1, dim // 2].item() == 0.0
        assert table[0, prefix + 8, 0].item() == 0.0  # row 1, column 0
        assert table[0, prefix + 8, dim // 2].item() == pytest.approx(math.sin(1.0), abs=1e-6)


# -------------------------------------------------------------------------------- 2. position tables on load
def timm_state(class_token=True, **kw):
    """A timm ViT of our SMALL shape and its state dict."""
    torch.manual_seed(0)
    args = dict(img_size=8, patch_size=1, in_chans=1, num_classes=0, embed_dim=32, depth=1, num_heads=2,
                class_token=class_token)
    vit = TimmViT(**dict(args, **kw)).eval()
    return vit, vit.state_dict()


def transposed(table, grid):
    """The same table with rows and columns swapped (the layout this project had before)."""
    cls, grid_part = table[:, :1], table[:, 1:].reshape(1, grid, grid, -1).transpose(1, 2).reshape(1, grid * grid, -1)
    return torch.cat([cls, grid_part], dim=1)


def test_a_saved_fixed_table_is_checked_against_the_model_not_dropped(tmp_path):
    vit, state = timm_state()
    state["pos_embed"] = build_sincos_2d_pos_embed(32, 8, num_prefix_tokens=1)  # the reference MAE's fixed table
    vit.load_state_dict(state)
    torch.save({"model": state}, tmp_path / "mae.pth")
    sincos = create_backbone("pit_mini", **SMALL, pos_embed="sincos").eval()
    report = load_backbone_weights(sincos, tmp_path / "mae.pth")
    assert report["matched_fixed"] == ["pos_embed"] and "pos_embed" not in report["dropped"]
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(sincos.forward_features(x), vit.forward_features(x), atol=1e-5)
    # the table of the checkpoint's grid is recognised when the model runs at another grid
    bigger = create_backbone("pit_mini", **dict(SMALL, img_size=12), pos_embed="sincos")
    assert load_backbone_weights(bigger, tmp_path / "mae.pth")["matched_fixed"] == ["pos_embed"]
    # a learned model loads the same table as its parameter
    learned = create_backbone("pit_mini", **SMALL, pos_embed="learned")
    assert "pos_embed" in load_backbone_weights(learned, tmp_path / "mae.pth")["loaded"]
    # a model without positions must not silently lose them
    none = create_backbone("pit_mini", **SMALL, pos_embed="none")
    with pytest.raises(CheckpointError, match="pos_embed: .*model.pos_embed=sincos"):
        load_backbone_weights(none, tmp_path / "mae.pth")


@pytest.mark.parametrize("kind", ["learned", "transposed"])
def test_a_table_that_differs_from_the_fixed_one_is_refused_by_name(tmp_path, kind):
    learned = create_backbone("pit_mini", **SMALL, pos_embed="learned")  # a project checkpoint with a learned table
    state = {f"backbone.{k}": v for k, v in learned.state_dict().items()}
    if kind == "transposed":
        state["backbone.pos_embed"] = transposed(build_sincos_2d_pos_embed(32, 8, 1), 8)
    torch.save({"model": state, "config": {"task": {"name": "cls"}}}, tmp_path / "learned.ckpt")
    sincos = create_backbone("pit_mini", **SMALL, pos_embed="sincos")
    with pytest.raises(CheckpointError, match=r"pos_embed: .*model.pos_embed=learned to load it"):
        load_backbone_weights(sincos, tmp_path / "learned.ckpt")


def test_evaluate_and_resume_paths_check_a_saved_fixed_table():
    # check_state_dict + load_state_dict, as evaluate_checkpoint, load_classifier and resume use them
    module = nn.ModuleDict({"backbone": create_backbone("pit_mini", **SMALL, pos_embed="sincos")})
    equal = {**module.state_dict(), "backbone.pos_embed": build_sincos_2d_pos_embed(32, 8, 1)}
    check_state_dict(module, equal, "ckpt")
    module.load_state_dict(equal)  # strict: the equal table is accepted, not "unexpected"
    learned = {**module.state_dict(), "backbone.pos_embed": 0.02 * torch.randn(1, 65, 32)}
    with pytest.raises(CheckpointError, match=r"backbone.pos_embed: .*differs.*model.pos_embed=learned"):
        check_state_dict(module, learned, "ckpt")
    for strict in (True, False):  # never dropped, not even with strict=False
        with pytest.raises(RuntimeError, match="pos_embed.*model.pos_embed=learned"):
            module.load_state_dict(learned, strict=strict)
    dit = create_dit("pit_mini", **SMALL, num_classes=3)
    with pytest.raises(RuntimeError, match="pos_embed.*model.pos_embed=learned"):
        dit.load_state_dict({**dit.state_dict(), "pos_embed": torch.randn(1, 64, 32)})


# ------------------------------------------------------------------------------------- 3. fc_norm (global pool)
@pytest.mark.parametrize("class_token", [True, False])
def test_timm_global_avg_pool_weights_load_strictly_and_match(class_token):
    torch.manual_seed(0)
    kw = dict(img_size=8, patch_size=1, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    theirs = TimmViT(**kw, global_pool="avg", class_token=class_token).eval()
    ours = create_backbone("pit_tiny", **kw, pool="mean", class_token=class_token).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: same keys, fc_norm.* included, no norm.*
    x = torch.randn(3, 3, 8, 8)
    tokens = ours.forward_features(x)
    assert torch.allclose(tokens, theirs.forward_features(x), atol=1e-5)
    assert torch.allclose(ours.forward_head(tokens, pre_logits=True),
                          theirs.forward_head(theirs.forward_features(x), pre_logits=True), atol=1e-5)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_pool_cls_and_fc_norm_false_keep_the_final_norm():
    cls = create_backbone("pit_mini", **SMALL)
    assert isinstance(cls.fc_norm, nn.Identity) and isinstance(cls.norm, nn.LayerNorm)
    assert not any(k.startswith("fc_norm") for k in cls.state_dict())
    old = create_backbone("pit_mini", **SMALL, pool="mean", fc_norm=False).eval()
    assert isinstance(old.fc_norm, nn.Identity) and "norm.weight" in old.state_dict()
    x = torch.randn(2, 1, 8, 8)
    normed = old.forward_features(x)  # the mean of normalised tokens, as pool=mean did before fc_norm existed
    assert old.num_prefix_tokens == 0 and torch.allclose(old(x), normed.mean(dim=1))
    new = create_backbone("pit_mini", **SMALL, pool="mean").eval()
    with pytest.raises(CheckpointError, match="model.fc_norm=false"):
        check_state_dict(new, old.state_dict(), "old pool=mean run")


def test_mae_finetuned_checkpoint_with_fc_norm_loads_through_init_from(tmp_path):
    vit, state = timm_state(class_token=True, global_pool="avg", num_classes=5)
    torch.save({"model": state, "epoch": 99}, tmp_path / "mae_finetuned.pth")
    same = create_backbone("pit_mini", **LEARNED, pool="mean", class_token=True, num_classes=5).eval()
    report = load_backbone_weights(same, tmp_path / "mae_finetuned.pth")
    assert {"fc_norm.weight", "fc_norm.bias", "head.weight"} <= set(report["loaded"])
    assert report["reinitialised"] == [] and report["dropped"] == []
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(same(x), vit(x), atol=1e-5)
    other = create_backbone("pit_mini", **LEARNED, pool="mean", class_token=True, num_classes=3)
    report = load_backbone_weights(other, tmp_path / "mae_finetuned.pth")
    assert "fc_norm.weight" in report["loaded"] and report["reinitialised"] == ["head.bias", "head.weight"]
    # a model that normalises before pooling has no place for fc_norm: refused, not dropped
    pre_norm = create_backbone("pit_mini", **LEARNED, pool="mean", class_token=True, fc_norm=False)
    with pytest.raises(CheckpointError, match="fc_norm: .*model.pool=mean"):
        load_backbone_weights(pre_norm, tmp_path / "mae_finetuned.pth")


def test_mae_pretrained_encoder_into_a_global_pool_model_follows_mae_finetuning(tmp_path):
    # MAE's fine-tuning with global pooling: the pretrained final norm is dropped and fc_norm starts fresh.
    _, state = timm_state(class_token=True)
    torch.save({"model": state}, tmp_path / "mae_pretrain.pth")
    model = create_backbone("pit_mini", **LEARNED, pool="mean", class_token=True, num_classes=4)
    report = load_backbone_weights(model, tmp_path / "mae_pretrain.pth")
    assert {"norm.weight", "norm.bias"} <= set(report["dropped"])
    assert report["reinitialised"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    # and our own MAE pretraining keeps the final norm with pool=mean, as MAE's encoder does
    cfg = tiny_cfg(tmp_path / "run", "task=mae", "model.pool=mean")
    encoder = get_task("mae").build_module(cfg, DIGITS).backbone
    assert isinstance(encoder.norm, nn.LayerNorm) and isinstance(encoder.fc_norm, nn.Identity)


# --------------------------------------------------------------------------------------------- 4. norm epsilon
def test_layernorm_epsilon_is_a_model_option_that_reproduces_timm():
    torch.manual_seed(0)
    kw = dict(img_size=8, patch_size=1, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    theirs = TimmViT(**kw, norm_layer=partial(nn.LayerNorm, eps=1e-5)).eval()
    x = torch.randn(3, 3, 8, 8)
    ref = theirs.forward_features(x)
    matched = create_backbone("pit_tiny", **kw, norm_eps=1e-5).eval()
    matched.load_state_dict(theirs.state_dict())
    assert (matched.forward_features(x) - ref).abs().max() < 2e-6
    default = create_backbone("pit_tiny", **kw).eval()
    default.load_state_dict(theirs.state_dict())
    assert (default.forward_features(x) - ref).abs().max() > 1e-4


def test_norm_eps_reaches_every_norm_through_the_config(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "model.norm_eps=1e-5", "task=mae", "model.pool=mean", "model.fc_norm=true")
    mae = get_task("mae").build_module(cfg, DIGITS).model  # encoder norms, fc_norm and the decoder's
    norms = [m for m in mae.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 + 1 + 2 * len(mae.decoder_blocks) + 1
    assert {m.eps for m in norms} == {1e-5}
    dit = get_task("dit").build_module(tiny_cfg(tmp_path / "run", "task=dit", "model.norm_eps=1e-5"), DIGITS)
    assert {m.eps for m in dit.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}
    with pytest.raises(UserError, match="norm_eps must be positive"):
        get_task("cls").build_module(tiny_cfg(tmp_path / "run", "model.norm_eps=0"), DIGITS)


# --------------------------------------------------------------------------------------------- 5. dit init_from
DIT_RUN = ("task=dit", "trainer.max_steps=2", "data.limit_train=64", "data.limit_test=32", "data.batch_size=32",
           "task.sample_steps=2", "task.samples_per_class=1", "task.ema_decay=0.5")


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dit") / "run"
    fit(tiny_cfg(run_dir, *DIT_RUN))
    return run_dir / "checkpoints" / "last.ckpt"


def test_dit_init_from_a_dit_checkpoint_starts_from_its_ema(dit_ckpt, tmp_path, capsys):
    ema = read_checkpoint(dit_ckpt)["ema"]  # the module's own key names (backbone.blocks...)
    task = get_task("dit")
    cfg = tiny_cfg(tmp_path / "a", *DIT_RUN)
    module = task.build_module(cfg, DIGITS)
    report = task.init_from(module, str(dit_ckpt))
    assert report["source"] == ["EMA weights"] and report["reinitialised"] == []
    assert set(report["loaded"]) == set(DiT.to_reference_names(ema))  # reported under DiT's names
    assert all(torch.equal(v, ema[k]) for k, v in module.denoiser.state_dict().items())
    # another number of classes: the label table starts fresh, the rest loads
    fewer = task.build_module(cfg, DataInfo("digits", 5, 1, 8, (0.5,), (0.25,)))
    report = task.init_from(fewer, str(dit_ckpt))
    assert report["reinitialised"] == ["y_embedder.embedding_table.weight"]
    assert torch.equal(fewer.denoiser.backbone.blocks[0].attn.qkv.weight, ema["backbone.blocks.0.attn.qkv.weight"])
    # a learned table starts from the checkpoint's fixed one
    learned = task.build_module(tiny_cfg(tmp_path / "b", *DIT_RUN, "model.pos_embed=learned"), DIGITS)
    assert task.init_from(learned, str(dit_ckpt))["reinitialised"] == ["pos_embed"]
    # and through the engine, which says where the weights came from
    fit(tiny_cfg(tmp_path / "c", *DIT_RUN, "trainer.max_steps=1", f"init_from={dit_ckpt}"))
    assert "from the EMA weights" in capsys.readouterr().out


@pytest.mark.slow
def test_dit_init_from_an_encoder_checkpoint_is_refused_in_one_line(tmp_path):
    backbone = create_backbone("pit_mini", **SMALL, num_classes=10)
    torch.save({"model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "config": {"task": {"name": "cls"}}}, tmp_path / "cls.ckpt")
    out = run_tool("train", "task=dit", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
                   "trainer.accelerator=cpu", "logger=disabled", "trainer.max_steps=1", f"run.dir={tmp_path / 'run'}",
                   f"init_from={tmp_path / 'cls.ckpt'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "is a cls checkpoint" in error[0] and "adaLN" in error[0], out.stderr
    _, state = timm_state()
    torch.save(state, tmp_path / "timm.pth")
    module = get_task("dit").build_module(tiny_cfg(tmp_path / "run", "task=dit"), DIGITS)
    with pytest.raises(CheckpointError, match="not a DiT checkpoint"):
        get_task("dit").init_from(module, str(tmp_path / "timm.pth"))


def test_init_from_into_a_task_module_without_an_encoder_is_refused():
    with pytest.raises(UserError, match="does not support init_from"):
        get_task("cls").init_from(nn.Linear(2, 2), "any.ckpt")


@pytest.mark.slow
def test_a_checkpoint_from_before_the_layout_fix_warns_and_still_resumes(tmp_path):
    # Format 1 checkpoints were written with the transposed sin-cos table, which is never saved: only the format can
    # tell them apart, so reading one says so instead of silently running with other positions.
    import warnings

    from pixelformer.checkpoint import read_checkpoint
    from pixelformer.engine import CHECKPOINT_FORMAT, fit
    from conftest import tiny_cfg

    run_dir = tmp_path / "run"
    fit(tiny_cfg(run_dir, "trainer.max_steps=2"))
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT != "pixelformer-checkpoint/1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_checkpoint(last)  # a current checkpoint reads without a warning
    ckpt["format"] = "pixelformer-checkpoint/1"
    torch.save(ckpt, last)
    with pytest.warns(UserWarning, match="before the fixed sin-cos position table took MAE's and DiT's layout"):
        read_checkpoint(last)
    with pytest.warns(UserWarning, match="sin-cos"):
        fit(tiny_cfg(run_dir, "trainer.max_steps=3", "resume=auto"))
    # The run goes on, and its checkpoints keep saying that its weights were trained with the other table.
    assert torch.load(last, weights_only=True)["format"] == "pixelformer-checkpoint/1"
