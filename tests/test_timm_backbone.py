"""The backbones are timm's VisionTransformer: same init and groups as before, timm's options exposed and checked
against timm's own model, timm's data config and factory (features_only, checkpoint_path), and the registry
description that sizes the DiT denoiser."""
import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from pixelformer import create_backbone, list_backbones
from pixelformer.data import DataInfo
from pixelformer.models import MaskedAutoencoder, create_dit, describe_backbone, register_backbone
from pixelformer.models import _registry
from pixelformer.optim import param_groups
from pixelformer.task import get_task
from conftest import tiny_cfg

SMALL = dict(img_size=8, in_chans=3, depth=2, embed_dim=32, num_heads=2, num_classes=5)
DIGITS = DataInfo("digits", 10, 1, 8, (0.5,), (0.25,))


# --------------------------------------------------------------------------------- 1. same init, same draws
def first(t, n=2):
    return t.flatten()[:n].tolist()


def test_seeded_init_is_the_one_committed_results_were_trained_with():
    # Values written down from the project's own VisionTransformer / MAE / DiT before they moved onto timm: the same
    # seed gives the same weights, and the RNG ends where it did (same number of draws).
    torch.manual_seed(0)
    model = create_backbone("pit_mini", img_size=8, in_chans=1, num_classes=10)
    after = torch.rand(3).tolist()
    state = model.state_dict()
    assert first(state["patch_embed.proj.weight"]) == [-0.05178188905119896, -0.2638317048549652]
    assert first(state["cls_token"]) == [1.1507835324664484e-06, -4.38190795648552e-07]
    assert first(state["blocks.0.attn.qkv.weight"]) == [-0.005830379202961922, 0.0017855737823992968]
    assert first(state["blocks.3.mlp.fc2.weight"]) == [-0.03411424160003662, 0.014375886879861355]
    assert first(state["head.weight"]) == [-0.036691587418317795, 0.0039198314771056175]
    assert after == [0.3899458050727844, 0.22123324871063232, 0.38643062114715576]
    torch.manual_seed(0)
    encoder = create_backbone("pit_mini", img_size=8, in_chans=1, depth=1, embed_dim=32, num_heads=2, fc_norm=False)
    mae = MaskedAutoencoder(encoder, decoder_dim=16, decoder_depth=2, decoder_heads=2).state_dict()
    assert first(mae["decoder_blocks.1.mlp.fc2.weight"]) == [-0.010801977477967739, 0.03712322935461998]
    assert first(mae["mask_token"]) == [0.012720235623419285, -0.031956322491168976]
    torch.manual_seed(0)
    dit = create_dit("pit_mini", img_size=8, in_chans=1, num_classes=10, depth=2).reference_state_dict()
    assert first(dit["blocks.1.attn.qkv.weight"]) == [-0.0881885290145874, -0.052790429443120956]
    assert first(dit["y_embedder.embedding_table.weight"]) == [0.011849370785057545, -0.01256939023733139]


def test_init_scheme():
    model = create_backbone("vit_tiny", **SMALL)
    w = model.patch_embed.proj.weight.flatten(1)
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform of the projection seen as a linear layer
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])  # trunc-normal std .02 (timm cuts at +-2), zero bias
    assert 0.018 < weights.std() < 0.022 and not any(m.bias.any() for m in linears)
    assert model.cls_token.abs().max() < 1e-5 and model.pos_embed.std() < 0.03
    assert all(m.weight.eq(1).all() and not m.bias.any() for m in model.modules() if isinstance(m, nn.LayerNorm))


def test_the_layers_are_timms():
    model = create_backbone("pit_mini", **SMALL)
    assert isinstance(model, TimmViT) and all(type(b) is TimmBlock for b in model.blocks)
    mae = MaskedAutoencoder(model, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    assert type(mae.decoder_blocks[0]) is TimmBlock


# ------------------------------------------------------------------ 2. parameter groups: timm's, as before
def reference_groups(module, weight_decay, layer_decay):
    """(weight decay, lr scale) per parameter name, computed as optim.param_groups did by hand before timm."""
    skip, backbone_prefix, backbone = set(), None, None
    for prefix, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay"):
            skip |= {f"{prefix}.{n}" if prefix else n for n in sub.no_weight_decay()}
        if hasattr(sub, "blocks") and hasattr(sub, "patch_embed") and backbone is None:
            backbone_prefix, backbone = (prefix + "." if prefix else ""), sub
    out = {}
    for name, param in module.named_parameters():
        scale = 1.0
        if layer_decay is not None and name.startswith(backbone_prefix):
            rel = name[len(backbone_prefix):]
            if rel.startswith(("patch_embed", "cls_token", "pos_embed", "reg_token")):
                lid = 0
            elif rel.startswith("blocks."):
                lid = int(rel.split(".")[1]) + 1
            else:
                lid = len(backbone.blocks) + 1
            scale = layer_decay ** (len(backbone.blocks) + 1 - lid)
        out[name] = (0.0 if param.ndim <= 1 or name in skip else weight_decay, scale)
    return out


@pytest.mark.parametrize("kw", [dict(), dict(pool="mean"), dict(pool="mean", fc_norm=False),
                                dict(pos_embed="learned", reg_tokens=2, init_values=0.1, qk_norm=True),
                                dict(global_pool="map")])
@pytest.mark.parametrize("layer_decay", [None, 0.65])
def test_parameter_groups_are_the_hand_written_ones(kw, layer_decay):
    model = create_backbone("pit_mini", **SMALL, **kw)
    for module in (nn.ModuleDict({"backbone": model}),
                   nn.ModuleDict({"model": MaskedAutoencoder(model, decoder_dim=16, decoder_depth=1,
                                                             decoder_heads=2)})):
        names = {id(p): n for n, p in module.named_parameters()}
        got = {names[id(p)]: (g["weight_decay"], g["lr_scale"])
               for g in param_groups(module, 0.05, layer_decay) for p in g["params"]}
        want = reference_groups(module, 0.05, layer_decay)
        assert set(got) == set(want)
        for name in want:
            assert got[name][0] == want[name][0] and got[name][1] == pytest.approx(want[name][1], rel=1e-12), name


# -------------------------------------------------------------------- 3. timm's options, checked against timm
def timm_twin(ours, **kw):
    """timm's own VisionTransformer with our weights: the options must mean the same thing in both."""
    theirs = TimmViT(**kw).eval()
    theirs.load_state_dict(ours.state_dict())  # strict: the same keys
    return theirs


@pytest.mark.parametrize("opts,timm_opts", [
    (dict(global_pool="avg"), dict(global_pool="avg", class_token=False)),
    (dict(global_pool="max", class_token=True), dict(global_pool="max")),
    (dict(global_pool="avgmax"), dict(global_pool="avgmax", class_token=False)),
    (dict(global_pool="map"), dict(global_pool="map", class_token=False)),
    (dict(reg_tokens=3), dict(reg_tokens=3)),
    (dict(init_values=0.5), dict(init_values=0.5)),
    (dict(qk_norm=True), dict(qk_norm=True)),
])
def test_timm_options_mean_what_they_mean_in_timm(opts, timm_opts):
    torch.manual_seed(0)
    ours = create_backbone("pit_tiny", **SMALL, **opts).eval()
    theirs = timm_twin(ours, img_size=8, patch_size=1, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                       **timm_opts)
    with torch.no_grad():  # layer scale / latent query away from their init so that a mix-up would show
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
        theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 3, 8, 8)
    assert torch.allclose(ours.forward_features(x), theirs.forward_features(x), atol=1e-5)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_pool_and_global_pool():
    assert create_backbone("pit_mini", **SMALL).global_pool == "token"
    mean = create_backbone("pit_mini", **SMALL, pool="mean")
    assert mean.global_pool == "avg" and mean.num_prefix_tokens == 0 and isinstance(mean.norm, nn.Identity)
    assert create_backbone("pit_mini", **SMALL, pool="mean", global_pool="avg").global_pool == "avg"
    with pytest.raises(ValueError, match="disagree"):
        create_backbone("pit_mini", **SMALL, pool="cls", global_pool="avg")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        create_backbone("pit_mini", **SMALL, global_pool="prr")
    with pytest.raises(ValueError, match="needs class_token"):
        create_backbone("pit_mini", **SMALL, global_pool="token", class_token=False)


def test_register_tokens_are_prefix_tokens_that_mae_keeps():
    model = create_backbone("pit_mini", **SMALL, reg_tokens=2, pos_embed="sincos")
    assert model.num_prefix_tokens == 3 and model.reg_token.shape == (1, 2, 32)
    assert model.forward_features(torch.randn(2, 3, 8, 8)).shape == (2, 3 + 64, 32)
    mae = MaskedAutoencoder(model, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    pred, mask = mae(torch.randn(2, 3, 8, 8), 0.75)
    assert pred.shape == (2, 64, 3) and mask.shape == (2, 64)
    assert model.no_weight_decay() >= {"reg_token", "cls_token", "pos_embed"}


def test_patch_dropout_drops_patch_tokens_in_training_only():
    torch.manual_seed(0)
    model = create_backbone("pit_mini", **SMALL, patch_drop_rate=0.5)
    x = torch.randn(2, 3, 8, 8)
    assert model.train().forward_features(x).shape == (2, 1 + 32, 32)
    plain = create_backbone("pit_mini", **SMALL)
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))


def test_model_config_keys_reach_the_backbone(tmp_path):
    cfg = tiny_cfg(tmp_path, "model.global_pool=avgmax", "model.reg_tokens=1", "model.init_values=0.1",
                   "model.qk_norm=true", "model.patch_drop_rate=0.25")
    backbone = get_task("cls").build_module(cfg, DIGITS).backbone
    assert backbone.global_pool == "avgmax" and backbone.num_reg_tokens == 1 and backbone.patch_drop.prob == 0.25
    assert torch.allclose(backbone.blocks[0].ls1.gamma, torch.full((32,), 0.1))
    assert isinstance(backbone.blocks[0].attn.q_norm, nn.LayerNorm)


# ---------------------------------------------------------------- 4. intermediates and timm's factory / data
@pytest.mark.parametrize("name", ["pit_mini", "vit_mini"])
def test_forward_intermediates_match_the_blocks(name):
    model = create_backbone(name, **SMALL, reg_tokens=1).eval()
    x = torch.randn(2, 3, 8, 8)
    grid = 8 // model.patch_embed.patch_size
    final, maps = model.forward_intermediates(x)  # NCHW, every block
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    assert [m.shape for m in maps] == [(2, 32, grid, grid)] * 2
    tokens = model.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)
    assert tokens[0].shape == (2, grid * grid, 32)
    assert torch.allclose(model.norm(tokens[0]), final[:, model.num_prefix_tokens:], atol=1e-5)


def test_features_only_through_timm():
    net = timm.create_model("pixelformer_pit_mini", features_only=True, out_indices=(1, 3), img_size=8, in_chans=1)
    feats = net(torch.randn(2, 1, 8, 8))
    assert [f.shape for f in feats] == [(2, 64, 8, 8)] * 2
    assert net.feature_info.channels() == [64, 64] and net.feature_info.reduction() == [1, 1]
    assert len(net.model.blocks) == 4  # pruned after the last index asked for


@pytest.mark.slow
def test_pretrained_cfg_follows_the_model_and_the_data(tmp_path):
    model = timm.create_model("pixelformer_vit_tiny", img_size=16, in_chans=1, num_classes=7)
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (1, 16, 16) and len(data["mean"]) == len(data["std"]) == 1
    assert data["crop_pct"] == 1.0 and data["interpolation"] == "bicubic"
    cfg = model.pretrained_cfg
    assert (cfg["num_classes"], cfg["first_conv"], cfg["classifier"]) == (7, "patch_embed.proj", "head")
    assert cfg["architecture"] == "vit_tiny"
    for name in list_backbones():
        assert create_backbone(name, img_size=4, depth=2).pretrained_cfg["input_size"] == (3, 4, 4), name
    overlay = timm.create_model("pixelformer_pit_mini", img_size=8, in_chans=1, pretrained_cfg_overlay=dict(
        mean=(0.3,), std=(0.2,)))
    assert resolve_data_config({}, model=overlay)["mean"] == (0.3,)
    # a run's backbone records the data's normalisation
    backbone = get_task("cls").build_module(tiny_cfg(tmp_path), DIGITS).backbone
    assert resolve_data_config({}, model=backbone)["mean"] == (0.5,)
    assert resolve_data_config({}, model=backbone)["std"] == (0.25,)
    model.set_input_size(8)
    assert resolve_data_config({}, model=model)["input_size"] == (1, 8, 8)


@pytest.mark.parametrize("task,prefix", [("cls", "backbone."), ("mae", "model.encoder.")])
def test_timm_create_model_loads_a_pixelformer_checkpoint(tmp_path, task, prefix):
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, f"task={task}", "model.pos_embed=learned")
    module = get_task(task).build_module(cfg, DIGITS).eval()
    state = module.state_dict()
    assert any(k.startswith(prefix) for k in state)
    path = tmp_path / "last.ckpt"
    torch.save({"model": state, "config": {"task": {"name": task}}, "format": "pixelformer-checkpoint/2"}, path)
    backbone = module.backbone if task == "cls" else module.model.encoder
    model = timm.create_model("pixelformer_pit_mini", checkpoint_path=str(path), img_size=8, in_chans=1,
                              num_classes=backbone.num_classes, depth=1, embed_dim=32, num_heads=2,
                              pos_embed="learned", fc_norm=False if task == "mae" else None).eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), backbone(x))
    # a state dict with the backbone's own keys is not touched by the task-prefix rule
    wrong = {"patch_embed.proj.bias": torch.zeros(1), **{k: v for k, v in state.items() if k.startswith(prefix)}}
    with pytest.raises(RuntimeError):
        model.load_state_dict(wrong)


# ------------------------------------------------------------------------ 5. the registry sizes every task
@pytest.mark.slow
def test_describe_backbone_reads_the_built_model():
    for name in list_backbones():
        arch = describe_backbone(name, img_size=16, in_chans=3)
        real = create_backbone(name, img_size=16, in_chans=3, depth=2)
        assert arch["embed_dim"] == real.embed_dim and arch["num_heads"] == real.blocks[0].attn.num_heads
        assert arch["patch_size"] == real.patch_embed.patch_size and arch["mlp_ratio"] == 4.0
        assert arch["tokens"] == real.patch_embed.num_patches + real.num_prefix_tokens
        assert arch["pos_embed"] == real.pos_embed_kind and arch["in_chans"] == 3 and arch["img_size"] == 16
    tiny = describe_backbone("pit_tiny", img_size=32, num_classes=100)
    assert (tiny["depth"], tiny["embed_dim"], tiny["num_heads"], tiny["tokens"]) == (12, 192, 3, 1025)
    assert tiny["num_params"] == 5_555_812 and tiny["pos_embed"] == "learned"
    assert describe_backbone("pit_mini")["pos_embed"] == "sincos"
    built = create_backbone("vit_mini", img_size=8, global_pool="avg")
    assert describe_backbone(built)["tokens"] == 16 and describe_backbone(built)["global_pool"] == "avg"


def test_a_user_registered_backbone_serves_every_task(tmp_path):
    from pixelformer.models.vision_transformer import VisionTransformer

    def my_wide_pit(**kwargs):
        return VisionTransformer(**dict(dict(patch_size=1, depth=3, embed_dim=48, num_heads=3, mlp_ratio=2.0,
                                             pos_embed="sincos"), **kwargs))

    register_backbone(my_wide_pit)
    try:
        assert timm.is_model("pixelformer_my_wide_pit")  # registered with timm on registration
        dit = create_dit("my_wide_pit", img_size=8, in_chans=1, num_classes=3)
        block = dit.backbone.blocks[0]
        assert (len(dit.backbone.blocks), block.mlp.fc1.out_features, block.attn.num_heads) == (3, 96, 3)
        assert dit.x_embedder.patch_size == 1
        for task in ("cls", "mae", "dit"):
            module = get_task(task).build_module(tiny_cfg(tmp_path, f"task={task}", "model=my_wide_pit",
                                                          "model.depth=null", "model.embed_dim=null",
                                                          "model.num_heads=null"), DIGITS)
            assert sum(p.numel() for p in module.parameters()) > 0
    finally:
        _registry._ENTRYPOINTS.pop("my_wide_pit")


def test_dit_takes_sizes_from_the_registry_and_keeps_its_key_names():
    dit = create_dit("vit_small", img_size=8, in_chans=3, num_classes=4, depth=1)
    block = dit.backbone.blocks[0]
    assert (dit.x_embedder.patch_size, block.attn.num_heads, dit.final_layer.linear.in_features) == (2, 6, 384)
    with pytest.raises(ValueError, match="pixel transformer"):
        create_dit("pit_small", img_size=8, patch_size=2)
    keys = set(create_dit("pit_mini", img_size=4, in_chans=1, num_classes=2, depth=1).reference_state_dict())
    assert keys == {
        "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
        "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
        "blocks.0.adaLN_modulation.1.weight", "blocks.0.adaLN_modulation.1.bias", "final_layer.linear.weight",
        "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    }


def test_fine_tuning_a_pretrained_encoder_with_new_pooling_or_register_tokens(tmp_path):
    from pixelformer import CheckpointError
    from pixelformer.checkpoint import load_backbone_weights

    encoder = create_backbone("pit_mini", **dict(SMALL, num_classes=0), fc_norm=False)
    torch.save({"model": {f"model.encoder.{k}": v for k, v in encoder.state_dict().items()}}, tmp_path / "mae.ckpt")
    attn_pooled = create_backbone("pit_mini", **SMALL, global_pool="map", class_token=True)
    report = load_backbone_weights(attn_pooled, tmp_path / "mae.ckpt")  # the attention pool starts fresh
    assert any(k.startswith("attn_pool.") for k in report["reinitialised"])
    with_registers = create_backbone("pit_mini", **SMALL, reg_tokens=2)
    with pytest.raises(CheckpointError, match="reg_token: in the model but not in the checkpoint"):
        load_backbone_weights(with_registers, tmp_path / "mae.ckpt")
    torch.save({"model": with_registers.state_dict()}, tmp_path / "reg.pth")
    with pytest.raises(CheckpointError, match="reg_token: in the checkpoint's encoder but not in the model"):
        load_backbone_weights(create_backbone("pit_mini", **SMALL), tmp_path / "reg.pth")
