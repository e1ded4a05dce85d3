"""The token-budget recipe (pixelformer/recipe.py): its schedule, the backbone levers, refusals, exact resume."""
import pytest
import torch

from pixelformer import UserError
from pixelformer.checkpoint import read_checkpoint
from pixelformer.config import compose
from pixelformer.engine import fit
from pixelformer.models import create_backbone
from pixelformer.recipe import TokenBudget
from pixelformer.data import DataInfo
from pixelformer.task import get_task
from conftest import QUIET, Interrupt, assert_same_weights, stop_at, tiny_cfg

RECIPE = dict(name="test", token_drop=0.5, token_drop_schedule="constant", low_res_scale=0.5, low_res_frac=0.4,
              full_frac=0.1)


def test_the_plan_of_each_step():
    budget = TokenBudget(RECIPE, total_steps=100, img_size=28, patch_size=1)
    assert (budget.low_img_size, budget.low_res_until, budget.full_from) == (14, 40, 90)
    assert [(p.token_drop, p.img_size) for p in map(budget.plan, (0, 39, 40, 89, 90, 99))] == \
        [(0.5, 14), (0.5, 14), (0.5, None), (0.5, None), (0.0, None), (0.0, None)]
    linear = TokenBudget({**RECIPE, "token_drop_schedule": "linear"}, 100, 28, 1)
    assert [linear.plan(s).token_drop for s in (0, 45, 89, 90)] == [0.5, 0.25, pytest.approx(0.5 / 90), 0.0]
    # the low side is a whole number of patches, at least one
    assert TokenBudget(RECIPE, 100, 28, 4).low_img_size == 16
    assert TokenBudget({**RECIPE, "low_res_scale": 0.01}, 100, 28, 4).low_img_size == 4
    # the low-resolution phase never runs into the full-token phase
    assert TokenBudget({**RECIPE, "low_res_frac": 0.95, "full_frac": 0.05}, 10, 28, 1).low_res_until == 10


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_train_size_keeps_the_parameters_and_returns_to_the_same_model(pos_embed):
    torch.manual_seed(0)
    model = create_backbone("pit_mini", img_size=8, in_chans=1, num_classes=3, pos_embed=pos_embed).eval()
    images = torch.randn(2, 1, 8, 8)
    before, params = model(images), {n: p for n, p in model.named_parameters()}
    model.set_train_size(4)
    assert {n: p for n, p in model.named_parameters()} == params  # the same objects: optimizer state stays valid
    small = model(torch.randn(2, 1, 4, 4))
    if pos_embed == "learned":  # the 8x8 table, resampled in the forward, gets the gradient
        small.sum().backward()
        assert model.pos_embed.grad is not None and model.pos_embed.grad[:, 1:].abs().sum() > 0
    model.set_train_size(None)
    assert torch.equal(model(images), before)
    with pytest.raises(Exception, match="does not match"):
        model(torch.randn(2, 1, 4, 4))


@pytest.mark.parametrize("name", ["pit_local_mini", "pit_hourglass_mini"])
def test_the_cheap_families_train_at_a_lower_size(name):
    model = create_backbone(name, img_size=16, in_chans=1, num_classes=3, depth=2 if "local" in name else None)
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = model.eval()(images)
    model.set_train_size(8)
    model.train()(torch.randn(2, 1, 8, 8)).sum().backward()
    model.set_train_size(None)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), before)


def test_token_drop_keeps_the_prefix_and_a_share_of_the_pixels():
    model = create_backbone("pit_mini", img_size=8, in_chans=1, num_classes=3).train()
    assert model.forward_features(torch.randn(2, 1, 8, 8)).shape[1] == 65
    model.set_token_drop(0.75)
    assert model.forward_features(torch.randn(2, 1, 8, 8)).shape[1] == 1 + 16
    assert model.eval().forward_features(torch.randn(2, 1, 8, 8)).shape[1] == 65  # never in evaluation
    model.set_token_drop(0.0)
    assert model.train().forward_features(torch.randn(2, 1, 8, 8)).shape[1] == 65


@pytest.mark.parametrize("args, message", [
    (["recipe.token_drop=1.5"], "recipe.token_drop must be in [0, 1)"),
    (["recipe.low_res_scale=1"], "recipe.low_res_scale must be in (0, 1)"),
    (["recipe.low_res_scale=0.5", "recipe.low_res_frac=0.8", "recipe.full_frac=0.3"], "more than every step"),
    (["recipe=fast"], "unknown recipe 'fast'"),
])
def test_a_bad_recipe_is_refused_by_key(args, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        compose([*QUIET, f"run.dir={tmp_path}", *args])


@pytest.mark.parametrize("args, message", [
    (["task=dit", "recipe.token_drop=0.5"], "task=dit does not train with the token drop lever"),
    (["model=pit_local_mini", "recipe.token_drop=0.5"], "needs the backbone part 'token_drop'"),
    (["model=pit_hourglass_mini", "recipe.low_res_scale=0.3"], "cannot take"),
])
def test_a_lever_the_task_or_backbone_lacks_is_refused_in_one_line(args, message, tmp_path):
    cfg = compose([*QUIET, f"run.dir={tmp_path / 'run'}", "data.limit_train=64", "trainer.max_steps=1",
                   "model.depth=1" if "hourglass" not in args[0] else "model.depths=[1,1]", *args])
    with pytest.raises(UserError, match=message) as caught:
        fit(cfg)
    assert "\n" not in str(caught.value)


ARGS = ("data.limit_train=256", "data.batch_size=32", "model.drop_rate=0.1", "trainer.max_steps=30",
        "trainer.ckpt_every_steps=5", "trainer.eval_every_steps=12", "recipe=budget",
        "recipe.token_drop=0.5", "recipe.token_drop_schedule=linear", "recipe.low_res_scale=0.5",
        "recipe.low_res_frac=0.5", "recipe.full_frac=0.2")


@pytest.mark.slow
def test_a_run_resumed_in_the_middle_of_a_phase_ends_on_the_same_weights(tmp_path, monkeypatch):
    # 30 steps: 4x4 images until step 15, half the tokens dropped (linearly fewer) until step 24, then all of them
    straight = fit(tiny_cfg(tmp_path / "straight", *ARGS))

    stop_at(monkeypatch, 13)
    with pytest.raises(Interrupt):
        fit(tiny_cfg(tmp_path / "resumed", *ARGS))
    assert read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["progress"]["step"] == 12
    monkeypatch.undo()
    resumed = fit(tiny_cfg(tmp_path / "resumed", *ARGS, "resume=auto"))
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    assert straight == resumed
    # and the recipe changed the training: the plain run ends elsewhere
    plain = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    fit(tiny_cfg(tmp_path / "plain", *ARGS[:6]))
    other = read_checkpoint(tmp_path / "plain" / "checkpoints" / "last.ckpt")
    assert not torch.equal(plain["model"]["backbone.blocks.0.attn.qkv.weight"],
                           other["model"]["backbone.blocks.0.attn.qkv.weight"])
    # A sweep summary's training FLOPs follow the plan: half the tokens dropped (fewer, linearly) and 4x4 images in
    # most steps cost well under 30 full steps; the full step's figure stays the model's cost per image.
    from pixelformer.sweep import training_cost
    full, params, tokens, per_image = training_cost(tmp_path / "straight", 30)
    assert tokens == 64 and params > 0 and 0.2 * full < per_image < 0.75 * full
    assert training_cost(tmp_path / "plain", 30)[3] == training_cost(tmp_path / "plain", 30)[0]  # no recipe



def test_mae_takes_the_token_drop_in_its_decoder():
    """MAE's decoder reconstructs a share of the masked tokens (CrossMAE's partial reconstruction): all of them
    gives MAE's predictions; fewer costs fewer FLOPs, the loss is on those only, every parameter still learns, and
    evaluation decodes every token."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    cfg = compose([*QUIET, "task=mae", "model.depth=1", "data.img_size=8"])
    objective = get_task("mae").build_module(cfg, DataInfo("digits", 10, 1, 8, (0.5,), (0.5,))).train()
    images = torch.randn(4, 1, 8, 8)
    latent, mask, ids_restore = objective.model.forward_encoder(images, 0.75)
    full = objective.model.forward_decoder(latent, ids_restore)
    every_masked = objective.model._forward_decoder_partial(latent, ids_restore, num_decoded=48)
    assert torch.allclose(every_masked * mask.unsqueeze(-1), full * mask.unsqueeze(-1), atol=1e-5)
    assert torch.equal(every_masked * (1 - mask).unsqueeze(-1), torch.zeros_like(full))  # visible: not predicted
    # all 48 masked ones, in the masking's order: MAE's decoder in the original order gives the same predictions

    def step(drop: float) -> tuple[dict, float]:
        objective.zero_grad()
        objective.set_token_drop(drop)
        torch.manual_seed(1)  # the same masks
        with FlopCounterMode(display=False) as counter:
            out = objective((images, None))
            out["loss"].backward()
        return out, counter.get_total_flops()
    (plain, plain_flops), (dropped, dropped_flops) = step(0.0), step(0.75)
    assert plain["mask"].sum(1).tolist() == [48] * 4 and dropped["mask"].sum(1).tolist() == [12] * 4
    assert bool((dropped["mask"] <= plain["mask"]).all()) and bool((dropped["pred"][dropped["mask"] == 0] == 0).all())
    assert dropped_flops < 0.7 * plain_flops
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.parameters() if p.requires_grad)
    objective.eval()
    torch.manual_seed(1)
    assert objective((images, None))["mask"].sum(1).tolist() == [48] * 4  # never in evaluation


@pytest.mark.slow
def test_mae_pretrains_at_a_lower_resolution_and_with_a_token_drop_first(tmp_path, monkeypatch):
    from pixelformer.models.mae import MaskedAutoencoder

    seen, forward = [], MaskedAutoencoder.forward

    def recording(self, images, mask_ratio=0.75, decode_frac=1.0):
        pred, mask = forward(self, images, mask_ratio, decode_frac)
        seen.append((self.training, images.shape[-1], int(mask[0].sum())))
        return pred, mask
    monkeypatch.setattr(MaskedAutoencoder, "forward", recording)
    args = ("task=mae", "data.limit_train=128", "data.batch_size=32", "trainer.max_steps=6",
            "trainer.ckpt_every_steps=1",
            "recipe.low_res_scale=0.5", "recipe.low_res_frac=0.5", "recipe.token_drop=0.5", "recipe.full_frac=0.34",
            "task.knn_k=5", "task.mask_ratio=0.75")
    metrics = fit(tiny_cfg(tmp_path / "straight", *args))
    assert "test/knn_acc" in metrics  # evaluated at full size
    # 3 steps at 4x4 (12 masked tokens, 6 decoded), 1 at 8x8 (48 masked, 24 decoded), then 2 with every token
    assert [s[1:] for s in seen if s[0]] == [(4, 6)] * 3 + [(8, 24)] + [(8, 48)] * 2
    monkeypatch.undo()

    stop_at(monkeypatch, 3)  # killed inside the first phase (4x4, half decoded), then resumed
    with pytest.raises(Interrupt):
        fit(tiny_cfg(tmp_path / "resumed", *args))
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["progress"]["step"] == 2
    assert fit(tiny_cfg(tmp_path / "resumed", *args, "resume=auto")) == metrics
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.slow
def test_dit_trains_at_a_lower_resolution_first_and_samples_at_full_size(tmp_path, monkeypatch):
    # 8x8 digits: 4 steps on 4x4 images (a 16-token grid), then 4 at 8x8; the test loss and the samples at full size.
    from pixelformer.models import DiT

    sides, forward = [], DiT.forward

    def recording(self, x, t, y):
        out = forward(self, x, t, y)
        assert out.shape[-2:] == x.shape[-2:]  # a noise prediction for every pixel of the grid it was given
        sides.append((self.training, x.shape[-1]))
        return out
    monkeypatch.setattr(DiT, "forward", recording)
    run = tmp_path / "dit"
    metrics = fit(tiny_cfg(run, "task=dit", "data.limit_train=64", "data.batch_size=16", "trainer.max_steps=8",
                           "recipe.low_res_scale=0.5", "recipe.low_res_frac=0.5", "trainer.eval_every_steps=4",
                           "task.sample_steps=2", "task.samples_per_class=1"))
    trained = [side for training, side in sides if training]
    assert trained == [4] * 4 + [8] * 4
    assert {side for training, side in sides if not training} == {8}  # test loss and sampling at full size
    assert torch.isfinite(torch.tensor(metrics["test/loss"])) and (run / "samples.png").is_file()


def test_dit_refuses_progressive_resolution_on_latents(tmp_path):
    cfg = compose([*QUIET, f"run.dir={tmp_path / 'run'}", "task=dit", "task.latent.vae=/nonexistent/vae",
                   "recipe.low_res_scale=0.5", "model.depth=1"])
    with pytest.raises(UserError, match="task.latent.vae=/nonexistent/vae: progressive resolution"):
        get_task("dit").check(cfg, DataInfo("digits", 10, 1, 8, (0.5,), (0.5,)))

