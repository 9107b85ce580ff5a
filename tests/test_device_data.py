"""``data.loader=device``: the training split in memory as uint8, whole batches augmented with batched tensor ops
(src/mimzoo/data/device.py), checked against torchvision's parameter sampling and functional ops."""

import csv
import math
import os
import random

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from conftest import TINY, TINY_IBOT
from mimzoo.data import IMAGENET_MEAN, IMAGENET_STD, MIMDataModule, ResumableSampler
from mimzoo.data import device as D
from mimzoo.errors import ConfigError, DataError

CPU = torch.device("cpu")
VIEWS = {"local_number": 2, "global_scale": (0.14, 1.0), "local_scale": (0.05, 0.4), "local_size": 16, "blur": True}


def datamodule(**kwargs):
    kwargs = {
        "name": "cifar10-mini",
        "root": os.environ["MIMZOO_DATA"],
        "batch_size": 64,
        "num_workers": 0,
        "loader": "device",
        **kwargs,
    }
    return MIMDataModule(**kwargs)


def pixels(views):
    """Normalised views back to [0, 1] pixels."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return views * std + mean


def test_mae_and_multicrop_batches_shapes_dtypes_ranges_and_samples():
    dm = datamodule()
    loader = dm.device_dataloader(CPU, seed=0)
    images, labels = next(iter(loader))
    assert len(loader) == 8 and images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    p = pixels(images)
    assert p.min() >= -1e-5 and p.max() <= 1 + 1e-5 and p.std() > 0.1
    # the same samples, in the same order, as the PIL path's sampler gives the first batch
    order = [i for _, i in ResumableSampler(range(512), seed=0)][:64]
    assert torch.equal(labels, dm._dataset("train").targets[order])

    dm.train_views = VIEWS
    views, labels = next(iter(dm.device_dataloader(CPU, seed=0)))
    assert [tuple(v.shape) for v in views] == [(64, 3, 32, 32)] * 2 + [(64, 3, 16, 16)] * 2
    for v in views:
        p = pixels(v)
        assert v.dtype == torch.float32 and p.min() >= -1e-5 and p.max() <= 1 + 1e-5


def test_crop_boxes_follow_torchvisions_random_resized_crop_sampling():
    """Area fraction, log aspect ratio, position and the fallback's frequency agree with
    ``RandomResizedCrop.get_params`` over 4000 draws (a square image, and a thin one where the tries often fail)."""
    for height, width, scale in ((32, 32, (0.2, 1.0)), (12, 64, (0.5, 1.0))):
        n = 4000
        boxes = D.crop_boxes(n, height, width, scale, torch.Generator().manual_seed(0), CPU)
        left, top, right, bottom = boxes.unbind(1)
        w, h = right - left, bottom - top
        assert torch.equal(boxes, boxes.round()) and (left >= 0).all() and (top >= 0).all()
        assert (right <= width).all() and (bottom <= height).all() and (w > 0).all() and (h > 0).all()
        torch.manual_seed(0)
        img = torch.zeros(1, height, width)
        ref = torch.tensor([T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3)) for _ in range(n)]).float()
        ref_top, ref_left, ref_h, ref_w = ref.unbind(1)

        def stats(top, left, h, w, height=height, width=width):
            return torch.stack(
                [
                    (w * h / (height * width)).mean(),
                    torch.log(w / h).mean(),
                    ((top + 0.5) / (height - h + 1)).mean(),
                    ((left + 0.5) / (width - w + 1)).mean(),
                    ((w == width) & (h == height)).float().mean(),
                ]
            )

        ours, theirs = stats(top, left, h, w), stats(ref_top, ref_left, ref_h, ref_w)
        assert torch.allclose(ours, theirs, atol=0.02), (height, width, ours, theirs)


def test_resized_crop_is_bilinear_when_enlarging_and_an_area_mean_when_shrinking():
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2)
    up = D.resized_crop(image, whole, 32)
    assert torch.allclose(up, TF.resize(image, [32, 32], T.InterpolationMode.BILINEAR, antialias=False), atol=1e-5)
    down = D.resized_crop(image, whole, 4)  # 4 x 4 samples per output pixel, at the input pixels' centres
    assert torch.allclose(down, torch.nn.functional.avg_pool2d(image, 4), atol=1e-5)
    # a box inside the image: the crop, then the resize (box k of image k)
    box = torch.tensor([[4.0, 2.0, 12.0, 10.0], [0.0, 8.0, 8.0, 16.0]])
    got = D.resized_crop(image, box, 4)
    assert torch.allclose(got[1], torch.nn.functional.avg_pool2d(image[1, :, 8:16, 0:8], 2), atol=1e-5)
    assert torch.allclose(got[0], torch.nn.functional.avg_pool2d(image[0, :, 2:10, 4:12], 2), atol=1e-5)


def test_flip_per_sample():
    x = torch.rand(64, 3, 4, 4)
    assert torch.equal(D.flip(x, torch.Generator(), p=1.0), x.flip(-1))
    assert torch.equal(D.flip(x, torch.Generator(), p=0.0), x)
    out = D.flip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped ^ kept).all() and 16 < flipped.sum() < 48


def test_colour_ops_match_torchvision_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 12, 12, generator=g)
    shift = torch.tensor([-0.1, 0.0, 0.05, 0.5])
    for i in range(4):
        assert torch.allclose(D.adjust_hue(x, shift)[i], TF.adjust_hue(x[i], float(shift[i])), atol=1e-5)
    assert torch.allclose(D.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6)
    assert torch.allclose(D.solarize(x, g, p=1.0), TF.solarize(x, 128 / 255))
    # blur with p=1: each sample's sigma is the generator's draw after the p draw
    blurred = D.gaussian_blur(x, torch.Generator().manual_seed(1), p=1.0, kernel=5)
    draw = torch.Generator().manual_seed(1)
    torch.rand(4, generator=draw)
    sigma = torch.rand(4, generator=draw) * 1.9 + 0.1
    for i in range(4):
        assert torch.allclose(blurred[i], TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2), atol=1e-5)
    # colour jitter with p=1: for one order, the composition of torchvision's four adjustments with our factors
    jittered = D.color_jitter(x, torch.Generator().manual_seed(2), random.Random(3), p=1.0)
    draw = torch.Generator().manual_seed(2)
    b, c, s = (torch.rand(4, generator=draw) * r + lo for r, lo in ((0.8, 0.6), (0.8, 0.6), (0.4, 0.8)))
    h = torch.rand(4, generator=draw) * 0.2 - 0.1
    ops = [
        lambda im, i: TF.adjust_brightness(im, float(b[i])),
        lambda im, i: TF.adjust_contrast(im, float(c[i])),
        lambda im, i: TF.adjust_saturation(im, float(s[i])),
        lambda im, i: TF.adjust_hue(im, float(h[i])),
    ]
    order = random.Random(3).sample(range(4), 4)
    for i in range(4):
        want = x[i]
        for k in order:
            want = ops[k](want, i)
        assert torch.allclose(jittered[i], want, atol=1e-4), i


def test_probabilities_are_per_sample():
    x = torch.rand(400, 3, 4, 4)
    gray = D.random_grayscale(x, torch.Generator().manual_seed(0), p=0.2)
    chosen = (gray[:, 0] == gray[:, 1]).all(-1).all(-1) & (gray[:, 1] == gray[:, 2]).all(-1).all(-1)
    assert 50 < chosen.sum() < 110
    jittered = D.color_jitter(x, torch.Generator().manual_seed(0), random.Random(0), p=0.8)
    kept = torch.tensor([torch.equal(a, b) for a, b in zip(jittered, x)])
    assert 50 < kept.sum() < 110


def test_batches_are_a_function_of_seed_epoch_batch_and_rank():
    dm = datamodule()
    dm.train_views = VIEWS
    loader = dm.device_dataloader(CPU, seed=5)
    dataset, items = loader.dataset, list(loader.sampler)
    first = dataset[items[1]]
    again = dataset[items[1]]
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    assert not torch.equal(first[0][0], dataset[(0, 2, items[1][2])][0][0])  # same samples, another batch index
    other_rank = D.DeviceBatches(dataset.images, dataset.labels, dataset.views, seed=5, rank=1)
    assert not torch.equal(first[0][0], other_rank[items[1]][0][0])
    # a resumed loader (epoch 0, 3 batches done) yields the rest of the same epoch
    resumed = dm.device_dataloader(CPU, seed=5, epoch=0, batches=3)
    assert len(resumed) == len(loader) and list(resumed.sampler) == items[3:]
    # two ranks share the epoch's samples out
    shards = [list(dm.device_dataloader(CPU, seed=5, world=2, rank=r).sampler) for r in (0, 1)]
    ids = [set(i for _, _, batch in s for i in batch) for s in shards]
    assert len(shards[0]) == 4 and not ids[0] & ids[1]


def test_image_folder_in_memory_and_its_size_limit(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = torch.randint(0, 256, (30, 40 + 10 * i, 3), generator=torch.Generator().manual_seed(i))
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(tmp_path / split / cls / f"{i}.png")
    dm = MIMDataModule(
        name="imagefolder",
        root=str(tmp_path),
        image_size=16,
        batch_size=2,
        num_workers=0,
        loader="device",
        memory_image_size=24,
    )
    images, labels = next(iter(dm.device_dataloader(CPU, seed=0)))
    assert images.shape == (2, 3, 16, 16) and dm._in_memory[0].shape == (6, 3, 24, 24)
    stored = TF.center_crop(
        TF.resize(Image.open(tmp_path / "train" / "dog" / "2.png"), 24, T.InterpolationMode.BICUBIC), 24
    )
    assert torch.equal(dm._in_memory[0][5], TF.pil_to_tensor(stored))  # resized (shorter side), centre-cropped
    assert dm._in_memory[0].dtype == torch.uint8 and sorted(dm._in_memory[1].tolist()) == [0, 0, 0, 1, 1, 1]
    small = MIMDataModule(
        name="imagefolder",
        root=str(tmp_path),
        image_size=16,
        batch_size=2,
        num_workers=0,
        loader="device",
        memory_image_size=24,
        memory_limit_gb=1e-5,
    )
    with pytest.raises(
        DataError,
        match=r"6 images of 3x24x24 .* over data.memory_limit_gb=1e-05: raise .* lower "
        r"data.memory_image_size, or use data.loader=pil",
    ):
        small.device_dataloader(CPU, seed=0)
    with pytest.raises(
        DataError,
        match=r"512 images of 3x32x32 uint8 \(0.00157 GB\), over data.memory_limit_gb=0.001: "
        r"raise data.memory_limit_gb \(the training device must hold it\), or use",
    ):
        datamodule(memory_limit_gb=0.001).device_dataloader(CPU, seed=0)


def test_bad_loader_settings_are_refused():
    with pytest.raises(ConfigError, match="choose one of pil, device"):
        datamodule(loader="gpu")
    with pytest.raises(ConfigError, match="set data.train_aug=mae or data.loader=pil"):
        datamodule(train_aug="finetune").device_dataloader(CPU, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [TINY, TINY_IBOT], ids=["mae", "ibot"])
def test_training_with_the_device_loader(overrides, cli, tmp_path):
    cli(
        "train",
        *overrides,
        "data.loader=device",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "probe.knn.enabled=false",
        "recon.enabled=false",
        f"hydra.run.dir={tmp_path}",
    )
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["datamodule_hyper_parameters"]["loader"] == "device"
    losses = [float(row["train/loss"]) for row in csv.DictReader(open(tmp_path / "metrics.csv")) if row["train/loss"]]
    assert losses and all(math.isfinite(v) for v in losses)


def test_a_batch_reads_nothing_back_from_its_device(monkeypatch):
    """On a GPU a read of a device value (``bool``, ``int``, ``float``, ``.item()``, ``.tolist()``) stalls the
    host until the GPU catches up: the augmentation of a batch makes none (checked here on CPU tensors, whose
    Python-level reads are made to raise; per-batch choices come from the host-side generator instead)."""
    dm = datamodule()
    dm.train_views = VIEWS
    loader = dm.device_dataloader(CPU, seed=0)
    item = next(iter(loader.sampler))

    def read(*args, **kwargs):
        raise AssertionError("a tensor value was read back to the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, read)
    views, labels = loader.dataset[item]
    dm.train_views = None
    images, labels = dm.device_dataloader(CPU, seed=0).dataset[item]
    monkeypatch.undo()
    assert len(views) == 4 and images.shape == (64, 3, 32, 32)


def test_no_advice_to_add_loading_workers():
    """Lightning advises workers for a loader with fewer than 2 (on machines with more cores than this one); the
    device loader has none to add, so the advice is not shown for it, and still is for the PIL path."""
    import warnings

    from lightning.pytorch.trainer.connectors.data_connector import _worker_check

    class Trainer:
        num_devices = 1

    advice = []
    for loader in ("pil", "device"):
        dm = datamodule(loader=loader)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(
                    "lightning.pytorch.trainer.connectors.data_connector.suggested_max_num_workers", lambda devices: 8
                )
                _worker_check(Trainer(), dm.train_dataloader(), "train_dataloader")
        advice.append(any("does not have many workers" in str(w.message) for w in caught))
    assert advice == [True, False]
