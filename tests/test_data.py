import pytest
import torch
from omegaconf import OmegaConf

from pixelformer import UserError
from pixelformer.config import DataCfg
from pixelformer.data import DeviceTensorLoader, ShardedEpochSampler, build_datasets, build_loader
from conftest import write_fake_cifar


def data_cfg(**kwargs):
    return OmegaConf.merge(OmegaConf.structured(DataCfg), kwargs)


def test_digits_split_is_fixed():
    train, test, info = build_datasets(data_cfg(name="digits"))
    assert (len(train), len(test)) == (1437, 360)
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 8)
    image, label = train[(0, 0)]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and 0 <= label < 10
    again, _, _ = build_datasets(data_cfg(name="digits"))
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    # normalised with the training split's own statistics
    assert abs(float(train.ready.mean())) < 1e-4 and abs(float(train.ready.std()) - 1) < 1e-2


def test_digits_at_another_size():
    train, _, info = build_datasets(data_cfg(name="digits", img_size=16))
    assert info.img_size == 16 and train[(0, 3)][0].shape == (1, 16, 16)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_reader_on_fake_files(tmp_path, num_classes):
    folder = write_fake_cifar(tmp_path, num_classes, n_train=40, n_test=20)
    name = f"cifar{num_classes}"
    train, test, info = build_datasets(data_cfg(name=name, root=str(tmp_path), augment="mocov3"))
    assert (len(train), len(test), info.num_classes, info.in_chans, info.img_size) == (40, 20, num_classes, 3, 32)
    # pixels come back exactly as stored (channel-major rows of 3,072 values)
    import pickle
    raw = pickle.loads(((folder / "test_batch") if num_classes == 10 else (folder / "test")).read_bytes())
    assert torch.equal(test.images[3].flatten(), torch.as_tensor(raw["data"][3]))
    x, y = train[(123, 5)]
    assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
    # the root may also point at the extracted folder itself
    assert len(build_datasets(data_cfg(name=name, root=str(folder)))[0]) == 40


def test_missing_cifar_root_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="data.download=true"):
        build_datasets(data_cfg(name="cifar100", root=str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="data.root is not set"):
        build_datasets(data_cfg(name="cifar10"))


def test_imagefolder(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 14), (i * 40, 100, 200 if cls == "cat" else 0)).save(
                    tmp_path / split / cls / f"{i}.png")
    train, test, info = build_datasets(data_cfg(name="imagefolder", root=str(tmp_path), img_size=12,
                                                augment="rrc_flip"))
    assert info.class_names == ["cat", "dog"] and (len(train), len(test)) == (6, 6)
    assert train[(1, 4)][0].shape == (3, 12, 12)
    with pytest.raises(UserError, match="data.img_size is required"):
        build_datasets(data_cfg(name="imagefolder", root=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="must contain train/"):
        build_datasets(data_cfg(name="imagefolder", root=str(tmp_path / "empty"), img_size=8))


def test_augmentation_is_a_function_of_the_sample_seed(tmp_path):
    write_fake_cifar(tmp_path, 10)
    train, _, _ = build_datasets(data_cfg(name="cifar10", root=str(tmp_path), augment="mocov3"))
    a, b = train[(7, 2)][0], train[(7, 2)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, train[(8, 2)][0])
    state = torch.get_rng_state()
    train[(9, 1)]
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def test_sampler_shards_and_resumes():
    full = list(ShardedEpochSampler(10, shuffle=True, seed=3))
    assert sorted(i for _, i in full) == list(range(10))
    shards = [list(ShardedEpochSampler(10, shuffle=True, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # padded to equal length
    assert set(i for s in shards for _, i in s) == set(range(10))
    resumed = ShardedEpochSampler(10, shuffle=True, seed=3)
    resumed.set_position(0, skip=6)
    assert list(resumed) == full[6:]
    resumed.set_position(1)
    assert [i for _, i in resumed] != [i for _, i in full]  # a new permutation each epoch


def test_loader_batches():
    train, _, _ = build_datasets(data_cfg(name="digits", limit_train=100))
    loader = build_loader(train, 32, train=True, seed=0, rank=0, world_size=1, num_workers=0)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (32, 1, 8, 8)  # drop_last on training batches


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_same_batches(loader, on_device, epoch, skip=0):
    for each in (loader, on_device):
        each.sampler.set_position(epoch, skip)
    assert len(on_device) == len(loader)
    expected, got = list(loader), list(on_device)
    assert len(got) == len(expected)
    for (x, y), (dx, dy) in zip(expected, got):
        assert (dx.dtype, dy.dtype, dx.shape, dy.shape) == (x.dtype, y.dtype, x.shape, y.shape)
        assert torch.equal(dx.cpu(), x) and torch.equal(dy.cpu(), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("world_size", [1, 2])
def test_device_loader_gives_the_dataloader_batches(device, world_size):
    # 101 images: odd, so the 2-rank training shards are padded and the evaluation shards are uneven.
    train, test, _ = build_datasets(data_cfg(name="digits", limit_train=101, limit_test=45))
    for rank in range(world_size):  # each rank built on its own, as each process would
        for dataset, batch_size, is_train in ((train, 16, True), (test, 20, False)):
            args = (dataset, batch_size, is_train, 3, rank, world_size, 0)
            loader, on_device = build_loader(*args), build_loader(*args, device=torch.device(device))
            assert isinstance(on_device, DeviceTensorLoader) and on_device.drop_last == loader.drop_last
            assert on_device.images.device.type == device
            for epoch in range(3):
                assert_same_batches(loader, on_device, epoch)
            assert_same_batches(loader, on_device, 1, skip=2 * batch_size)  # mid-epoch resume
    # the shards split the epoch between the ranks, as the DataLoader's do
    shards = [build_loader(train, 16, True, 3, rank, 2, 0, device=torch.device(device)) for rank in range(2)]
    seen = torch.cat([y for shard in shards for _, y in shard]).cpu()
    assert len(seen) == 2 * 3 * 16 and not torch.equal(*[torch.cat([y for _, y in s]) for s in shards])


def test_device_loader_needs_an_unaugmented_in_memory_dataset(tmp_path):
    write_fake_cifar(tmp_path, 10)
    train, test, _ = build_datasets(data_cfg(name="cifar10", root=str(tmp_path), augment="crop_flip"))
    with pytest.raises(UserError, match="data.on_device=false"):
        build_loader(train, 8, True, 0, 0, 1, 0, device=torch.device("cpu"))
    # its deterministic copy (evaluation's training split) can be held on the device
    plain = build_loader(train.without_augmentation(), 8, False, 0, 0, 1, 0, device=torch.device("cpu"))
    assert len(plain) == 5 and next(iter(plain))[0].shape == (8, 3, 32, 32)
    assert test.without_augmentation() is test  # already deterministic: one copy of its tensors
