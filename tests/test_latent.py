"""Latent diffusion: the dit task on the latents of a diffusers AutoencoderKL (a tiny random one, saved locally;
nothing is downloaded)."""
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

from pixelformer import UserError
from pixelformer.checkpoint import read_checkpoint
from pixelformer.config import compose
from pixelformer.data import DataInfo
from pixelformer.diffusion import latent_geometry, load_vae
from pixelformer.engine import fit
from pixelformer.task import get_task
from conftest import QUIET, REPO, TINY_MODEL, run_tool, tiny_cfg, run_process


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A 1-channel AutoencoderKL that halves the side once: 8x8 digits -> 4x4x4 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=8, scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def test_a_saved_vae_loads_frozen_and_round_trips_shapes(tiny_vae):
    vae = load_vae(str(tiny_vae))
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert latent_geometry(vae, 8) == (4, 4)
    with pytest.raises(ValueError, match="downsamples by 2"):
        latent_geometry(vae, 7)
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    latents = vae.encode(images).latent_dist.mean
    assert latents.shape == (3, 4, 4, 4) and vae.decode(latents).sample.shape == (3, 1, 8, 8)


def test_the_denoiser_works_on_latents_and_decodes_to_images(tiny_vae):
    cfg = compose([*QUIET, *TINY_MODEL, "task=dit", f"task.latent.vae={tiny_vae}"])
    module = get_task("dit").build_module(cfg, DataInfo("digits", 10, 1, 8, (0.5,), (0.25,)))
    assert module.sample_shape == (4, 4, 4) and module.latent_scale == 0.5  # the VAE config's scaling factor
    assert module.denoiser.x_embedder.img_size == 4 and module.denoiser.in_chans == 4
    assert "vae" not in " ".join(module.state_dict())  # frozen and loaded again from task.latent.vae: not in checkpoints
    images = torch.randn(2, 1, 8, 8)
    out = module((images, torch.tensor([1, 2])))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert module.decode(torch.randn(2, 4, 4, 4)).shape == (2, 1, 8, 8)
    scaled = compose([*QUIET, *TINY_MODEL, "task=dit", f"task.latent.vae={tiny_vae}", "task.latent.scaling_factor=0.18215"])
    assert get_task("dit").build_module(scaled, DataInfo("digits", 10, 1, 8, (0.5,), (0.25,))).latent_scale == 0.18215


@pytest.mark.slow
def test_latent_training_lowers_the_loss_then_samples_images(tiny_vae, tmp_path):
    run_dir = tmp_path / "latent"
    clf = tmp_path / "clf"
    fit(tiny_cfg(clf, "trainer.max_steps=20"))
    metrics = fit(tiny_cfg(run_dir, "task=dit", f"task.latent.vae={tiny_vae}", "data.batch_size=64", "optim.lr=2e-3",
                           "trainer.max_steps=60", "trainer.log_every_steps=10", "task.ema_decay=0.9",
                           "task.sample_steps=5", "task.samples_per_class=1", "task.num_eval_samples=20",
                           f"task.classifier_ckpt={clf / 'checkpoints' / 'last.ckpt'}"))
    losses = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in line]
    first, last = (float(line.split('"train/loss": ')[1].split(",")[0]) for line in (losses[0], losses[-1]))
    assert last < 0.8 * first, (first, last)
    assert np.isfinite(metrics["test/fid"]) and "test/sample_acc" in metrics
    assert (run_dir / "samples.png").stat().st_size > 0
    assert not any(k.startswith("vae") for k in read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["model"])
    # the sampling tool decodes through the same VAE: images at the data's size
    out = run_tool("sample", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "num_samples=6", "steps=3",
                   "device=cpu", f"out={tmp_path / 'sampled'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert np.load(tmp_path / "sampled" / "samples.npz")["arr_0"].shape == (6, 8, 8, 1)
    # the sampling benchmark times a latent run with its decoding
    bench = run_process([sys.executable, str(REPO / "benchmarks" / "sampling.py"), "--ckpt",
                            str(run_dir / "checkpoints" / "last.ckpt"), "--batch", "4", "--repeats", "1"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "VAE decoding included" in bench.stdout and "dpm" in bench.stdout


def test_a_hub_id_offline_and_a_wrong_folder_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        load_vae("nobody/no-such-vae")
    assert "HF_HUB_OFFLINE" in str(e.value) and "save_pretrained" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no diffusers AutoencoderKL in that folder"):
        load_vae(str(tmp_path / "empty"))


def test_inception_fid_needs_no_classifier_and_reports_no_sample_accuracy(tmp_path, monkeypatch):
    # Inception's weights are not here: a stand-in feature network takes their place, so what is tested is that an
    # Inception-FID run (the paper's ImageNet setting) scores its samples without a classifier checkpoint.
    import pixelformer.tasks.dit as dit
    from pixelformer import create_backbone
    from pixelformer.metrics import ClassifierFeatures, build_fid

    torch.manual_seed(0)
    stand_in = ClassifierFeatures(create_backbone("pit_mini", img_size=8, in_chans=1, depth=1, num_classes=10),
                                  (0.5,), (0.25,))
    calls = []

    def fake_build_fid(features, classifier, weights, shape, reset_real_features=True):
        calls.append((features, classifier, weights))
        return build_fid("classifier", stand_in, None, shape, reset_real_features)
    monkeypatch.setattr(dit, "build_fid", fake_build_fid)
    cfg = tiny_cfg(tmp_path / "run", "task=dit", "task.fid_features=inception", "task.inception_weights=inception.pth",
                   "trainer.max_steps=4", "task.sample_steps=2", "task.num_eval_samples=10",
                   "task.samples_per_class=1")
    assert get_task("dit").monitor(cfg) == ("test/fid", "min")
    metrics = fit(cfg)
    assert np.isfinite(metrics["test/fid"]) and np.isfinite(metrics["test/fid_untrained"])
    assert not any("sample_acc" in k for k in metrics)
    assert calls and all(c[0] == "inception" and c[1] is None and c[2] == "inception.pth" for c in calls)


@pytest.mark.slow
def test_cached_latents_are_written_once_checked_and_trained_on(tiny_vae, tmp_path):
    cache_dir = tmp_path / "cache"
    args = ("task=dit", f"task.latent.vae={tiny_vae}", "task.latent.cache=true", f"task.latent.cache_dir={cache_dir}",
            "data.limit_train=128", "data.batch_size=32", "trainer.max_steps=8", "task.sample_steps=2",
            "task.samples_per_class=1")
    out = run_tool("cache_latents", *QUIET[2:], f"task.latent.vae={tiny_vae}", f"task.latent.cache_dir={cache_dir}",
                   "data.limit_train=128")
    assert out.returncode == 0, out.stderr[-2000:]
    path = cache_dir / "digits-8px.pt"
    assert "wrote" in out.stdout and str(path) in out.stdout and "128 images" in out.stdout
    saved = torch.load(path, weights_only=True)
    assert saved["params"].shape == (128, 8, 4, 4) and saved["manifest"]["vae"] == str(tiny_vae)
    assert (saved["params"][:, 4:] > 0).all()  # the second half is the posterior's standard deviation
    before = path.stat().st_mtime_ns
    fit(tiny_cfg(tmp_path / "run", *args))
    assert path.stat().st_mtime_ns == before  # read, not written again
    again = run_tool("cache_latents", *QUIET[2:], f"task.latent.vae={tiny_vae}", f"task.latent.cache_dir={cache_dir}",
                     "data.limit_train=128")
    assert again.returncode == 0 and again.stdout.startswith("checked")
    # a cache made for other data is refused, naming the key, both values and the fix
    with pytest.raises(UserError, match=r"was made with limit_train=128, this run has 64: delete it"):
        fit(tiny_cfg(tmp_path / "other", *args[:-5], "data.limit_train=64", "trainer.max_steps=1"))
    with pytest.raises(UserError, match="not data.augment=crop_flip: set data.augment=flip or none"):
        fit(tiny_cfg(tmp_path / "aug", *args, "data.augment=crop_flip"))
    with pytest.raises(UserError, match="task.latent.cache=true caches VAE latents: set task.latent.vae"):
        fit(tiny_cfg(tmp_path / "pixels", "task=dit", "task.latent.cache=true", "trainer.max_steps=1"))


def test_a_cached_posterior_trains_like_encoding_at_every_step(tiny_vae):
    # The same images through the cache (mean, std) or the encoder: the same distribution of latents per image.
    from pixelformer.latents import encode_posteriors

    cfg = compose([*QUIET, *TINY_MODEL, "task=dit", f"task.latent.vae={tiny_vae}"])
    module = get_task("dit").build_module(cfg, DataInfo("digits", 10, 1, 8, (0.5,), (0.25,)))
    images = torch.randn(4, 1, 8, 8)
    params = encode_posteriors(module.vae, [(x, 0) for x in images], module.to_signed_unit_interval, torch.device("cpu"))
    torch.manual_seed(3)
    cached = module((params, torch.arange(4)))["loss"]
    torch.manual_seed(3)
    encoded = module((images, torch.arange(4)))["loss"]
    assert torch.allclose(cached, encoded, atol=1e-5)


def test_with_flips_the_cache_holds_each_image_and_its_mirror_and_training_draws_both(tiny_vae, tmp_path):
    # DiT's recipe flips images; a cache for data.augment=flip holds both posteriors, and each step takes one of
    # them, seeded per sample like the pixel-space flip (so a resumed run draws the same).
    from pixelformer.data import build_datasets
    from pixelformer.latents import encode_posteriors, latent_training_set

    cache_dir = tmp_path / "cache"
    overrides = [*QUIET, *TINY_MODEL, "task=dit", f"task.latent.vae={tiny_vae}", f"task.latent.cache_dir={cache_dir}",
                 "data.limit_train=16", "data.augment=flip"]
    cfg = compose(overrides)
    train_set, _, info = build_datasets(cfg.data)
    module = get_task("dit").build_module(cfg, info)
    cached = latent_training_set(cfg, module.vae, train_set, module.to_signed_unit_interval, torch.device("cpu"))
    saved = torch.load(cache_dir / "digits-8px.pt", weights_only=True)
    assert saved["params"].shape == (16, 2, 8, 4, 4) and saved["manifest"]["flips"] is True
    plain = train_set.without_augmentation()
    images = torch.stack([plain[i][0] for i in range(16)])
    for view, batch in enumerate((images, images.flip(-1))):
        expected = encode_posteriors(module.vae, [(x, 0) for x in batch], module.to_signed_unit_interval, torch.device("cpu"))
        assert torch.allclose(saved["params"][:, view], expected, atol=1e-6)
    draws = [cached[(seed, 3)][0] for seed in range(20)]
    assert all(any(torch.equal(d, saved["params"][3, v]) for v in (0, 1)) for d in draws)
    assert {int(torch.equal(d, saved["params"][3, 1])) for d in draws} == {0, 1}  # both views are drawn
    assert torch.equal(cached[(5, 3)][0], cached[(5, 3)][0])  # seeded: the same key draws the same view
    # a cache without mirror images is not taken for one with them
    with pytest.raises(UserError, match="was made with flips=True, this run has False"):
        latent_training_set(compose(overrides[:-1]), module.vae, train_set, module.to_signed_unit_interval, torch.device("cpu"))
    fit(tiny_cfg(tmp_path / "run", "task=dit", f"task.latent.vae={tiny_vae}", "task.latent.cache=true",
                 f"task.latent.cache_dir={cache_dir}", "data.limit_train=16", "data.augment=flip",
                 "data.batch_size=8", "trainer.max_steps=3", "task.sample_steps=2", "task.samples_per_class=1"))


VAE_RUN = ("task=vae", "task.block_out_channels=[8,16]", "task.norm_num_groups=8", "task.scale_images=256",
           "data.batch_size=32", "optim.lr=3e-3", "optim.warmup_epochs=0", "trainer.log_every_steps=5")


@pytest.mark.slow
def test_a_vae_trained_here_reconstructs_and_a_latent_dit_trains_on_it(tmp_path):
    # task=vae trains an AutoencoderKL on the run's data; its checkpoint is what task.latent.vae points at, with
    # the scaling factor the run measured (unit-variance latents, as SD's 0.18215 gives for its VAE).
    vae_dir = tmp_path / "vae"
    metrics = fit(tiny_cfg(vae_dir, *VAE_RUN, "trainer.max_steps=60"))
    rows = [json.loads(line) for line in (vae_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/l1" in r]
    assert train[-1]["train/l1"] < 0.85 * train[0]["train/l1"], (train[0], train[-1])
    assert metrics["test/psnr"] > metrics["test/psnr_untrained"] + 2 and metrics["test/latent_std"] > 0
    assert abs(metrics["test/psnr"] + 10 * math.log10(metrics["test/mse"])) < 1e-6
    assert (vae_dir / "reconstructions.png").stat().st_size > 0
    vae = load_vae(str(vae_dir / "checkpoints" / "last.ckpt"))
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae.config.scaling_factor == pytest.approx(1 / metrics["test/latent_std"])
    assert load_vae(str(vae_dir)).config.scaling_factor == vae.config.scaling_factor  # a run directory works too

    run = fit(tiny_cfg(tmp_path / "dit", "task=dit", f"task.latent.vae={vae_dir}", "task.latent.cache=true",
                       f"task.latent.cache_dir={tmp_path / 'cache'}", "data.limit_train=128", "data.batch_size=32",
                       "trainer.max_steps=4", "task.sample_steps=2", "task.samples_per_class=1"))
    assert math.isfinite(run["test/loss"])
    module = get_task("dit").build_module(compose([*QUIET, *TINY_MODEL, "task=dit", f"task.latent.vae={vae_dir}"]),
                                          DataInfo("digits", 10, 1, 8, (0.5,), (0.25,)))
    assert module.latent_scale == pytest.approx(1 / metrics["test/latent_std"]) and module.sample_shape == (4, 4, 4)
    # retrained at the same path, same config, other weights: its latents are not the cached ones
    fit(tiny_cfg(vae_dir, *VAE_RUN, "trainer.max_steps=62", "resume=auto"))
    with pytest.raises(UserError, match="was made with vae_weights="):
        fit(tiny_cfg(tmp_path / "dit2", "task=dit", f"task.latent.vae={vae_dir}", "task.latent.cache=true",
                     f"task.latent.cache_dir={tmp_path / 'cache'}", "data.limit_train=128", "trainer.max_steps=1"))
    # a checkpoint that holds no autoencoder, and an architecture the image size cannot take, are one line each
    cls_dir = tmp_path / "cls"
    fit(tiny_cfg(cls_dir, "trainer.max_steps=1"))
    with pytest.raises(UserError, match="without a trained autoencoder"):
        load_vae(str(cls_dir))
    with pytest.raises(UserError, match=r"downsample 8x8 images by 16: .* set data.img_size to a multiple of 16"):
        fit(tiny_cfg(tmp_path / "bad", "task=vae", "task.block_out_channels=[8,8,8,8,8]", "task.norm_num_groups=8"))


@pytest.mark.slow
def test_latent_and_vae_mistakes_are_refused_before_training(tiny_vae, tmp_path, monkeypatch):
    # The "Latent diffusion and VAE" rows of docs/bad-input.md, each refused with its key, value and fix.
    from diffusers import AutoencoderKL

    for name, chans, blocks in (("flat-vae", 1, (8,)), ("rgb-vae", 3, (8, 16))):
        AutoencoderKL(in_channels=chans, out_channels=chans, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                      up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
                      layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=8
                      ).save_pretrained(tmp_path / name)
    (tmp_path / "empty").mkdir()
    fit(tiny_cfg(tmp_path / "cls", "trainer.max_steps=1"))
    cases = [
        (["task.latent.vae=nobody/no-such-vae"], "HF_HUB_OFFLINE=1, or no network"),
        ([f"task.latent.vae={tmp_path / 'empty'}"], "no diffusers AutoencoderKL in that folder"),
        ([f"task.latent.vae={tmp_path / 'cls'}"], "is a checkpoint without a trained autoencoder"),
        ([f"task.latent.vae={tmp_path / 'rgb-vae'}"], "encodes 3-channel images but digits has 1"),
        ([f"task.latent.vae={tiny_vae}", "data.img_size=7"], "downsamples by 2, which does not divide the image size 7"),
        (["task.latent.cache=true"], "task.latent.cache=true caches VAE latents: set task.latent.vae"),
        ([f"task.latent.vae={tmp_path / 'flat-vae'}", "task.latent.cache=true",
          f"task.latent.cache_dir={tmp_path / 'cache'}"], "needs a VAE that downsamples"),
        ([f"task.latent.vae={tiny_vae}", "task.latent.cache=true", "data.augment=crop_flip"],
         "not data.augment=crop_flip: set data.augment=flip or none"),
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for args, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            fit(tiny_cfg(tmp_path / "bad", "task=dit", *args, "trainer.max_steps=1"))
    for args, message in [(["task.block_out_channels=[8,8,8,8,8]", "task.norm_num_groups=8"],
                           "downsample 8x8 images by 16: that does not divide the side"),
                          (["task.block_out_channels=[8,12]", "task.norm_num_groups=8"],
                           "must be a multiple of the group count"),
                          (["task.kl_weight=-1"], "task.kl_weight must be >= 0, got -1.0")]:
        with pytest.raises(UserError, match=re.escape(message)):
            fit(tiny_cfg(tmp_path / "bad", "task=vae", *args, "trainer.max_steps=1"))
    assert not list((tmp_path / "bad").rglob("*.ckpt"))  # nothing trained


def test_runs_saved_with_the_flat_latent_keys_still_load(tiny_vae):
    # Before task.latent.* the same settings were task.vae, task.vae_scaling_factor, task.cache_latents and
    # task.latent_cache_dir; checkpoints that hold those names load with their values in the new places.
    from omegaconf import OmegaConf

    from pixelformer.config import compose_saved

    saved = OmegaConf.to_container(compose([*QUIET, *TINY_MODEL, "task=dit"]), resolve=True)
    del saved["task"]["latent"]
    saved["task"].update({"vae": str(tiny_vae), "vae_scaling_factor": 0.5, "cache_latents": True,
                          "latent_cache_dir": "/tmp/cache"})
    cfg = compose_saved(saved, ["task.sample_steps=3"])
    assert dict(cfg.task.latent) == {"vae": str(tiny_vae), "scaling_factor": 0.5, "cache": True,
                                     "cache_dir": "/tmp/cache"}
    assert cfg.task.sample_steps == 3 and "vae" not in cfg.task
