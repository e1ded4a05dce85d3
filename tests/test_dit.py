"""DiT: adaLN-Zero, shapes for every size, training, EMA, deterministic guided sampling, offline FID."""
import json
import math

import numpy as np
import pytest
import torch

from pixelformer import UserError, create_backbone, list_backbones
from pixelformer.checkpoint import read_checkpoint
from pixelformer.diffusion import build_sampling_scheduler, build_train_scheduler, guided_output, sample, sample_chunks, \
    variational_bound
from pixelformer.trainer import EMA
from pixelformer.engine import evaluate_checkpoint, fit
from pixelformer.metrics import ClassifierFeatures, build_fid
from pixelformer.models import create_dit
from pixelformer.models.backbone import run_block

from reference_dit import DiT as ReferenceDiT
from conftest import assert_same_weights, on_step, run_tool, tiny_cfg

TINY = dict(img_size=8, in_chans=3, num_classes=5, depth=2, embed_dim=32, num_heads=2)


def perturbed(model):
    """The same model with every parameter nudged, so that no output is zero by construction."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_adaln_zero_blocks_start_as_identity_and_the_model_at_zero():
    torch.manual_seed(0)
    nn_init = create_dit("pit_mini", **TINY)  # DiT's init zeroes every block's modulation
    x, c = torch.randn(2, 9, 32), torch.randn(2, 32)
    assert torch.equal(run_block(nn_init.backbone.blocks[0], x, c), x)
    out = nn_init(torch.randn(2, 3, 8, 8), torch.tensor([0, 999]), torch.tensor([1, 5]))
    assert out.shape == (2, 3, 8, 8) and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("learn_sigma,pos_embed", [(False, "sincos"), (True, "learned")])
def test_backbone_built_dit_is_the_reference_dit(learn_sigma, pos_embed):
    """Built around pit_mini's blocks, the denoiser has the reference DiT's parameters (names, shapes and, from the
    same seed, values: the same random draws) and computes the same outputs bit for bit."""
    sizes = dict(img_size=8, in_chans=3, num_classes=5, depth=2, embed_dim=32, num_heads=2, mlp_ratio=4.0)
    torch.manual_seed(0)
    reference = ReferenceDiT(patch_size=1, learn_sigma=learn_sigma, pos_embed=pos_embed, **sizes)
    torch.manual_seed(0)
    ours = create_dit("pit_mini", learn_sigma=learn_sigma, pos_embed=pos_embed, **sizes)
    theirs, mine = reference.state_dict(), ours.reference_state_dict()
    assert sorted(theirs) == sorted(mine)
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)
    perturbed(reference)
    ours.load_state_dict(reference.state_dict())  # strict: the reference names load as they are
    ours.train()  # label dropout draws: the same stream on both sides
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 400, 999]), torch.tensor([0, 3, 5])
    for mode in ("train", "eval"):
        reference.train(mode == "train"), ours.train(mode == "train")
        torch.manual_seed(1)
        expected = reference(x, t, y)
        torch.manual_seed(1)
        assert torch.equal(ours(x, t, y), expected), mode
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("name", list_backbones())
def test_denoiser_for_every_registered_size(name):
    model = perturbed(create_dit(name, **TINY, learn_sigma=name.endswith("tiny")))
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.tensor([3, 700]), torch.tensor([0, 4]))
    assert out.shape == (2, 6 if name.endswith("tiny") else 3, 8, 8)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], missing


def test_guidance_scale_one_is_the_conditional_prediction():
    model = perturbed(create_dit("pit_mini", **TINY)).eval()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([0, 2, 4])
    assert torch.allclose(guided_output(model, x, t, y, 1.0, null_label=5), model(x, t, y), atol=1e-6)
    assert torch.allclose(guided_output(model, x, t, y, 0.0, null_label=5), model(x, t, torch.full_like(y, 5)),
                          atol=1e-6)
    assert not torch.allclose(guided_output(model, x, t, y, 4.0, null_label=5), model(x, t, y), atol=1e-4)
    # a learned variance is not guided: it is the conditional pass's, as in DiT's forward_with_cfg
    sigma = perturbed(create_dit("pit_mini", **TINY, learn_sigma=True)).eval()
    out = guided_output(sigma, x, t, y, 4.0, null_label=5)
    assert out.shape == (3, 6, 8, 8) and torch.allclose(out[:, 3:], sigma(x, t, y)[:, 3:], atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "ddpm"])
def test_sampling_is_deterministic_under_a_seed(sampler):
    model = perturbed(create_dit("pit_mini", **TINY)).eval()
    config = dict(build_train_scheduler().config)
    labels = torch.tensor([0, 1, 2, 3])

    def run(seed):
        return sample(model, config, labels, (3, 8, 8), steps=5, cfg_scale=2.0, sampler=sampler, null_label=5,
                      generator=torch.Generator().manual_seed(seed))
    first = run(0)
    assert first.shape == (4, 3, 8, 8) and first.abs().max() <= 1
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))


def test_ema_is_a_float32_average_with_dits_warm_up():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)  # starts as an exact copy, frozen
    assert torch.equal(ema.module.weight, model.weight) and not ema.module.weight.requires_grad
    assert ema.get_decay(0) == 0.1 and ema.get_decay(5) == 0.4 and ema.get_decay(10 ** 6) == 0.9
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=10 ** 6)
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * model.weight)
    # a bf16 model's average accumulates in float32: a 1e-4 step that bf16 could not hold is kept
    half = torch.nn.Linear(2, 2).to(torch.bfloat16)
    ema = EMA(half, decay=0.9999)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        half.weight.add_(1.0)
    ema.update(half, step=10 ** 6)
    assert ema.module.weight.dtype == torch.float32
    assert torch.allclose(ema.module.weight - start, 1e-4 * (half.weight.float() - start), atol=1e-7)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    torch.manual_seed(0)
    backbone = create_backbone("pit_mini", img_size=8, in_chans=1, depth=1, num_classes=10).eval()
    features = ClassifierFeatures(backbone, (0.3,), (0.4,))
    images = torch.rand(300, 1, 8, 8)

    def fid_to(other):
        fid = build_fid("classifier", features, None, (1, 8, 8))
        fid.update(images, real=True)
        fid.update(other, real=False)
        return float(fid.compute())
    same = fid_to(images)
    noisy = [fid_to((images + s * torch.randn_like(images)).clamp(0, 1)) for s in (0.1, 0.3, 0.6)]
    assert abs(same) < 1e-3
    assert 0 < noisy[0] < noisy[1] < noisy[2], noisy


def test_missing_feature_extractor_and_unsupported_options_are_explained(run_dir, tmp_path):
    with pytest.raises(UserError, match="feature-extractor checkpoint .* not found"):
        fit(tiny_cfg(run_dir, "task=dit", f"task.classifier_ckpt={tmp_path / 'nope.ckpt'}", "trainer.max_steps=1"))
    with pytest.raises(UserError, match="Inception|torch-fidelity"):
        fit(tiny_cfg(run_dir, "task=dit", "task.fid_features=inception", "trainer.max_steps=1"))


DIT_ARGS = ("task=dit", "data.batch_size=64", "optim.lr=2e-3", "trainer.max_steps=60", "trainer.log_every_steps=10",
            "task.ema_decay=0.9", "task.sample_steps=5", "task.samples_per_class=2")


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clf") / "run"
    fit(tiny_cfg(run_dir, "trainer.max_epochs=2"))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_tiny_dit_run_lowers_the_loss_and_keeps_ema(run_dir, classifier_ckpt):
    metrics = fit(tiny_cfg(run_dir, *DIT_ARGS, f"task.classifier_ckpt={classifier_ckpt}",
                           "task.num_eval_samples=40"))
    losses = [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert losses[-1] < 0.7 * losses[0], losses
    assert {"test/fid", "test/sample_acc", "test/fid_untrained", "test/sample_acc_untrained"} <= set(metrics)
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert set(ckpt["ema"]) == {k[len("denoiser."):] for k in ckpt["model"]}
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"]["denoiser." + k]) for k in ckpt["ema"])
    assert (run_dir / "samples.png").exists()

    out = run_tool("sample", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "num_samples=20", "steps=4",
                   "sampler=dpm", f"out={run_dir / 'sampled'}", "device=cpu")
    assert out.returncode == 0, out.stderr
    saved = np.load(run_dir / "sampled" / "samples.npz")
    assert saved["arr_0"].shape == (20, 8, 8, 1) and saved["arr_0"].dtype == np.uint8
    assert saved["arr_1"].tolist() == [c for c in range(10) for _ in range(2)]
    bad = run_tool("sample", f"ckpt={classifier_ckpt}")
    assert bad.returncode == 2 and "not a dit checkpoint (task cls): sampling needs the checkpoint of a task=dit " \
        "run" in bad.stderr and "weights=" not in bad.stderr, bad.stderr  # sample.py has no weights= option


@pytest.mark.slow
def test_dit_resume_restores_weights_and_ema_exactly(tmp_path, monkeypatch):
    args = (*DIT_ARGS, "trainer.max_steps=16", "trainer.ckpt_every_steps=5", "data.limit_train=256")
    fit(tiny_cfg(tmp_path / "straight", *args))

    def stop_at_12(trainer, step):
        if step == 12:
            raise KeyboardInterrupt
    on_step(monkeypatch, stop_at_12)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_cfg(tmp_path / "resumed", *args))
    monkeypatch.undo()
    fit(tiny_cfg(tmp_path / "resumed", *args, "resume=auto"))
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed", parts=("model", "ema"))


@pytest.mark.slow
@pytest.mark.parametrize("sampler,learn_sigma", [("ddim", False), ("dpm", False), ("ddpm", False), ("ddpm", True)])
def test_sharded_sampling_gives_the_same_samples_whatever_the_number_of_processes(sampler, learn_sigma):
    model = perturbed(create_dit("pit_mini", **TINY, learn_sigma=learn_sigma)).eval()
    config = dict(build_train_scheduler().config)
    labels = torch.arange(10) % 5
    # one process, one generator over the chunks in order: what sample() gives chunk by chunk
    generator, expected = torch.Generator().manual_seed(7), []
    for chunk in labels.split(3):
        expected.append(sample(model, config, chunk, (3, 8, 8), 3, 2.0, sampler, 5, generator))

    def shards(world):
        out = {}
        for rank in range(world):
            for index, chunk, images in sample_chunks(model, config, labels, (3, 8, 8), 3, 2.0, sampler, 5, seed=7,
                                                      batch_size=3, rank=rank, world_size=world):
                assert index % world == rank
                out[index] = (chunk, images)
        return out
    one = shards(1)
    assert sorted(one) == [0, 1, 2, 3]  # 10 labels in chunks of 3
    assert all(torch.equal(one[i][1], expected[i]) for i in one)
    for world in (2, 3, 5):
        split = shards(world)
        assert sorted(split) == sorted(one)
        for index in one:
            assert torch.equal(split[index][0], one[index][0]) and torch.equal(split[index][1], one[index][1])


@pytest.mark.slow
def test_two_process_fid_scores_all_samples_once(tmp_path, classifier_ckpt):
    # Each DDP process samples its share; the Fréchet statistics and correct counts are summed over processes. The
    # same checkpoint evaluated again by one process scores the same samples: the same FID and sample accuracy.
    run_dir = tmp_path / "ddp"
    out = run_tool("train", *DIT_ARGS, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                   "trainer.max_steps=4", "trainer.precision=32-true", "trainer.progress_bar=false", "logger=disabled",
                   "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "task.num_eval_samples=50",
                   "data.eval_batch_size=8", f"task.classifier_ckpt={classifier_ckpt}", f"run.dir={run_dir}",
                   timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    two = json.loads((run_dir / "eval.json").read_text())["metrics"]
    one, _, _ = evaluate_checkpoint(run_dir / "checkpoints" / "last.ckpt", ["trainer.strategy=auto",
                                                                           "trainer.devices=1"])
    for key in ("test/fid", "test/sample_acc", "test/fid_untrained", "test/sample_acc_untrained"):
        assert one[key] == pytest.approx(two[key], rel=1e-6, abs=1e-9), key


def _step_distribution(scheduler, output, t, xt):
    """Mean and standard deviation of the Gaussian that diffusers' DDPM ``step`` draws x_{t-1} from, read off two
    draws with known noise (``randn_tensor`` on the CPU is ``torch.randn`` under the generator)."""
    draws, noises = [], []
    for seed in (1, 2):
        draws.append(scheduler.step(output, t, xt, generator=torch.Generator().manual_seed(seed)).prev_sample)
        noises.append(torch.randn(xt.shape, generator=torch.Generator().manual_seed(seed)))
    std = (draws[0] - draws[1]) / (noises[0] - noises[1])
    return draws[0] - std * noises[0], std


def test_variational_bound_is_the_kl_to_the_distribution_diffusers_ddpm_samples_from():
    # The training bound and the sampler must agree on p(x_{t-1} | x_t): the KL computed here from diffusers' own
    # DDPM steps (learned_range variance, full 1,000-step schedule) equals variational_bound's, in bits per dim.
    torch.manual_seed(0)
    train = build_train_scheduler()
    config = {**dict(train.config), "clip_sample": False}
    scheduler = build_sampling_scheduler(config, "ddpm", learned_variance=True)
    assert scheduler.config.variance_type == "learned_range"
    scheduler.set_timesteps(1000)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    for step in (1, 37, 500, 999):
        t = torch.full((2,), step)
        xt = train.add_noise(x0, noise, t)
        eps = noise + 0.3 * torch.randn_like(noise)  # an imperfect denoiser
        v = torch.rand_like(x0) * 2 - 1
        true_mean, true_std = _step_distribution(scheduler, torch.cat([noise, -torch.ones_like(v)], 1), step, xt)
        model_mean, model_std = _step_distribution(scheduler, torch.cat([eps, v], 1), step, xt)
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(true_mean.double(), true_std.double()),
                                               torch.distributions.Normal(model_mean.double(), model_std.double()))
        expected = kl.flatten(1).mean(1) / math.log(2)
        got = variational_bound(train, x0, xt, t, eps, v)
        assert torch.allclose(got.double(), expected, rtol=2e-3, atol=1e-5), (step, got, expected)
    # the exact noise and the true variance (v = -1): no gap between the model and the posterior
    t = torch.full((2,), 300)
    xt = train.add_noise(x0, noise, t)
    assert variational_bound(train, x0, xt, t, noise, -torch.ones_like(x0)).abs().max() < 1e-4


def test_decoder_likelihood_at_step_zero_is_a_distribution_over_the_256_pixel_values():
    from pixelformer.diffusion import _discretized_log_likelihood
    values = (torch.arange(256, dtype=torch.float64) / 255 * 2 - 1).view(-1, 1)
    for mean, log_scale in ((0.0, -3.0), (0.7, -5.0), (-1.2, -1.0)):
        log_p = _discretized_log_likelihood(values, torch.full_like(values, mean), torch.full_like(values, log_scale))
        assert abs(float(log_p.exp().sum()) - 1) < 1e-6, (mean, log_scale)
    # at step 0 the bound is that likelihood, in bits: a perfect denoiser with the smallest variance (v = -1: step
    # 1's posterior variance, as DiT clips it) puts the pixel's bin under N(x0, var)
    train = build_train_scheduler()
    x0 = (torch.randint(1, 255, (2, 1, 4, 4)) / 255 * 2 - 1).float()  # inner bins: both edges finite
    noise = torch.randn_like(x0)
    t = torch.zeros(2, dtype=torch.long)
    xt = train.add_noise(x0, noise, t)
    betas = train.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    std = (betas[1] * (1 - abar[0]) / (1 - abar[1])).sqrt()
    normal = torch.distributions.Normal(0.0, std)
    expected = -math.log2(float(normal.cdf(torch.tensor(1 / 255)) - normal.cdf(torch.tensor(-1 / 255))))
    got = variational_bound(train, x0, xt, t, noise, -torch.ones_like(x0))
    assert torch.allclose(got.double(), torch.full((2,), expected, dtype=torch.float64), rtol=1e-4), (got, expected)


@pytest.mark.slow
def test_learned_sigma_trains_with_the_hybrid_loss_and_samples_with_its_variance(run_dir):
    metrics = fit(tiny_cfg(run_dir, *DIT_ARGS, "task.learn_sigma=true", "task.sampler=ddpm"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert {"train/mse", "train/vb"} <= set(train[-1])
    assert all(abs(r["train/loss"] - r["train/mse"] - r["train/vb"]) < 1e-4 for r in train)
    assert train[-1]["train/loss"] < 0.7 * train[0]["train/loss"] and train[-1]["train/vb"] < train[0]["train/vb"]
    assert math.isfinite(metrics["test/loss"]) and (run_dir / "samples.png").exists()
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["ema"]["final_layer.linear.weight"].shape[0] == 2 * 1  # noise and variance for the 1 digit channel
    # the ddpm sampler draws with the learned variance: changing the variance output changes the samples
    model = create_dit("pit_mini", **TINY, learn_sigma=True).eval()
    config = dict(build_train_scheduler().config)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        model.final_layer.linear.bias[3:] = -1.0
        low = sample(model, config, labels, (3, 8, 8), 5, 1.0, "ddpm", 5, torch.Generator().manual_seed(0))
        model.final_layer.linear.bias[3:] = 1.0
        high = sample(model, config, labels, (3, 8, 8), 5, 1.0, "ddpm", 5, torch.Generator().manual_seed(0))
        ddim = [sample(model, config, labels, (3, 8, 8), 5, 1.0, "ddim", 5, torch.Generator().manual_seed(0))]
        model.final_layer.linear.bias[3:] = -1.0
        ddim.append(sample(model, config, labels, (3, 8, 8), 5, 1.0, "ddim", 5, torch.Generator().manual_seed(0)))
    assert not torch.allclose(low, high)
    assert torch.equal(ddim[0], ddim[1])  # deterministic samplers use the noise half only
