"""The catalogue of user mistakes in docs/bad-input.md: each one fails early with a message naming the problem and
the fix (a UserError, printed without a traceback by the tools)."""
import pytest
import torch

from pixelformer import UserError
from pixelformer.config import compose
from pixelformer.engine import fit
from conftest import run_tool, tiny_cfg


def reference_checkpoint_3ch(path):
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    vit = TimmViT(img_size=8, patch_size=1, in_chans=3, num_classes=0, embed_dim=32, depth=1, num_heads=2)
    torch.save({"model": vit.state_dict()}, path)


CATALOGUE = [
    # (mistake, arguments, what the message must say)
    ("misspelt config key", ["optim.lrr=1"], "Key 'lrr' not in 'OptimCfg'. Did you mean: 'lr'?"),
    ("wrong value type", ["optim.lr=fast"], "could not be converted to Float"),
    ("value outside a choice", ["model.pos_embed=rope"], "expected one of ['sincos', 'learned', 'none']"),
    ("unknown model", ["model=pit_tinny"], "unknown model 'pit_tinny'. Did you mean: pit_tiny"),
    ("unknown dataset", ["data=cifar1000"], "unknown data 'cifar1000'"),
    ("unknown task", ["task=clss"], "unknown task 'clss'. Did you mean: cls"),
    ("argument without '='", ["lr"], "cannot parse argument 'lr'"),
    ("batch size 0", ["data.batch_size=0"], "data.batch_size must be positive"),
    ("negative step budget", ["trainer.max_steps=-1"], "trainer.max_steps must be positive"),
    ("data on the device with augmentation", ["data.on_device=true", "data.augment=crop_flip"],
     "set data.augment=none or data.on_device=false"),
    ("image folder on the device", ["data=imagefolder", "data.root={tmp}", "data.img_size=8", "data.on_device=true"],
     "imagefolder decodes files as it goes"),
    ("image size not divisible by the patch size", ["model=vit_mini", "model.patch_size=3"],
     "img_size 8 is not divisible by patch_size 3"),
    ("patch size on a pixel model", ["model=pit_tiny", "model.patch_size=2"], "use vit_tiny for patches"),
    ("missing data root", ["data=cifar100", "data.root=/nonexistent/cifar"], "add data.download=true"),
    ("data root not set", ["data=cifar10", "data.root=null"], "data.root is not set"),
    ("empty image folder", ["data=imagefolder", "data.root={tmp}", "data.img_size=8"], "must contain train/"),
    ("imagefolder without a size", ["data=imagefolder", "data.root={tmp}"], "data.img_size is required"),
    ("wrong channel count in init_from", ["init_from={tmp}/rgb.pth"], "patch_embed.proj.weight: checkpoint (32, 3, 1, 1)"),
    ("init_from a missing file", ["init_from={tmp}/nope.ckpt"], "does not exist"),
    ("unwritable run dir", ["run.dir={tmp}/file/run"], "cannot write to run directory"),
    ("mask ratio of 1", ["task=mae", "task.mask_ratio=1.0"], "task.mask_ratio must be in [0, 1)"),
    ("norm_pix_loss on 1-channel pixels", ["task=mae", "task.norm_pix_loss=true"], "single value"),
    ("FID classifier checkpoint missing", ["task=dit", "task.classifier_ckpt={tmp}/none.ckpt"], "not found"),
    ("learned sigma without a VLB loss", ["task=dit", "task.learn_sigma=true"], "variational-bound"),
    ("positions switched off for DiT", ["task=dit", "model.pos_embed=none"], "needs positions"),
]


@pytest.mark.parametrize("mistake,args,needle", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_catalogue(mistake, args, needle, tmp_path):
    (tmp_path / "file").write_text("a file, not a directory")
    reference_checkpoint_3ch(tmp_path / "rgb.pth")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(UserError) as info:
        if not any(a.startswith("run.dir=") for a in args):
            args.append(f"run.dir={tmp_path / 'run'}")
        fit(tiny_cfg(tmp_path / "unused", "trainer.max_steps=1", *args))
    assert needle in str(info.value), str(info.value)


def test_existing_run_and_corrupt_resume(tmp_path):
    run_dir = tmp_path / "run"
    fit(tiny_cfg(run_dir, "trainer.max_steps=1"))
    with pytest.raises(UserError, match="already holds a run .* pass resume=auto"):
        fit(tiny_cfg(run_dir, "trainer.max_steps=1"))
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="cannot read checkpoint .*last.ckpt"):
        fit(tiny_cfg(run_dir, "trainer.max_steps=2", "resume=auto"))


def test_external_launcher_needs_a_shared_run_dir(tmp_path, monkeypatch):
    # torchrun sets WORLD_SIZE in every process it starts; each would otherwise stamp its own default run.dir.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("PIXELFORMER_RUN_DIR", raising=False)
    cfg = tiny_cfg(tmp_path / "unused", "trainer.max_steps=1")
    cfg.run.dir = None
    with pytest.raises(UserError, match="set run.dir=<shared path>"):
        fit(cfg)


def test_tools_print_the_message_without_a_traceback(tmp_path):
    for tool, args in (("train", ["data=cifar100", "data.root=/nonexistent"]), ("eval", ["ckpt=/nonexistent.ckpt"]),
                       ("sample", ["ckpt=/nonexistent.ckpt"])):
        out = run_tool(tool, *args)
        assert out.returncode == 2, (tool, out.stderr[-2000:])
        assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert compose(["data.batch_size=3"]).data.batch_size == 3
