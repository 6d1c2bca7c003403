"""Datasets in every format, bad-image handling, the digits split, the latent cache and the resumable sampler."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import io
import json
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sit_workbench.errors import UserError
from sit_workbench import latents as L
from sit_workbench.checkpoint import CONFIG_VAE_HINT, load_vae
from sit_workbench.data import (BadImageWarning, ResumableSampler, augment_generator, build_dataset, center_crop_arr,
                                digits_indices, digits_split, draw_flip_mask, flip_batch, make_loader, to_tensor)
from sit_workbench.latents import LatentDataset, build_latent_cache, encode_images, latents_from_cache_batch, tiny_vae

datasets = pytest.importorskip("datasets")

# class k of the test images is a solid colour of these (R, G, B) values
COLOURS = [(0, 0, 0), (255, 255, 255), (255, 0, 51)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: threads only add overhead (and stall badly on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub access, and the datasets cache in tmp_path."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def cfg(fmt, path, image_size=8, **kw):
    return types.SimpleNamespace(**{**dict(dataset_format=fmt, dataset_path=str(path) if path else None,
                                           image_size=image_size, image_column=None, label_column=None,
                                           split="train", max_bad_images=0), **kw})


def png_bytes(colour, size=(20, 14)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def expected(label):
    """The [-1, 1] value of each channel of a solid image of class `label`."""
    return torch.tensor(COLOURS[label], dtype=torch.float32) / 127.5 - 1


def check_items(ds, labels, image_size=8):
    assert len(ds) == len(labels)
    for i, label in enumerate(labels):
        x, y = ds[i]
        assert y == label and isinstance(y, int)
        assert x.shape == (3, image_size, image_size) and x.dtype == torch.float32
        assert torch.allclose(x, expected(label)[:, None, None].expand_as(x), atol=1e-6), (i, x[:, 0, 0])


LABELS = [0, 2, 1, 1, 0, 2]


def table(image_key="image", label_key="label", n=len(LABELS)):
    feats = datasets.Features({image_key: datasets.Image(), label_key: datasets.ClassLabel(names=["a", "b", "c"])})
    imgs = [Image.new("RGB", (20, 14), COLOURS[y]) for y in LABELS[:n]]
    return datasets.Dataset.from_dict({image_key: imgs, label_key: LABELS[:n]}, features=feats)


# ---------------------------------------------------------------- pixels


def test_center_crop_sizes_and_centre():
    for size in [(300, 200), (200, 300), (64, 64), (17, 40), (129, 1000)]:
        assert center_crop_arr(Image.new("RGB", size), 32).size == (32, 32)
    tall = np.zeros((60, 20, 3), np.uint8)
    tall[20:40] = 200  # only the middle rows are bright
    out = np.array(center_crop_arr(Image.fromarray(tall), 20))
    assert out.min() == 200
    out = np.array(center_crop_arr(Image.fromarray(tall), 10))  # halved to 30x10 first, then the middle 10 rows
    assert out.min() == 200


def test_to_tensor_matches_torchvision():
    from torchvision import transforms
    official = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (13, 11, 3), dtype=np.uint8))
    assert torch.equal(to_tensor(img), official(img))
    assert to_tensor(img.convert("L")).shape == (1, 13, 11)
    assert to_tensor(img.convert("RGBA")).shape == (3, 13, 11)


# ---------------------------------------------------------------- the four file formats


def make_folder(root, labels=LABELS, size=(20, 14)):
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
    for i, y in enumerate(labels):
        Image.new("RGB", size, COLOURS[y]).save(root / "abc"[y] / f"{i:03d}.png")


def test_imagefolder(tmp_path):
    make_folder(tmp_path / "train")
    ds = build_dataset(cfg("imagefolder", tmp_path / "train"))
    assert ds.classes == ["a", "b", "c"] and ds.num_classes == 3
    check_items(ds, sorted(LABELS))  # ImageFolder orders by class, then file name
    big = build_dataset(cfg("imagefolder", tmp_path / "train", image_size=32))
    assert big[0][0].shape == (3, 32, 32)
    grey = build_dataset(cfg("imagefolder", tmp_path / "train"), in_channels=1)[len(LABELS) - 1][0]
    assert grey.shape == (1, 8, 8)
    lum = (299 * 255 + 587 * 0 + 114 * 51) / 1000  # PIL's L conversion of (255, 0, 51)
    assert abs(grey.mean().item() - (round(lum) / 127.5 - 1)) < 1e-6


def test_hf_dataset_save_to_disk(tmp_path):
    table().save_to_disk(str(tmp_path / "ds"))
    ds = build_dataset(cfg("hf_dataset", tmp_path / "ds", image_size=10))
    check_items(ds, LABELS, image_size=10)
    assert ds.classes == ["a", "b", "c"]
    # a DatasetDict: the split is picked
    datasets.DatasetDict({"train": table(n=2), "test": table()}).save_to_disk(str(tmp_path / "dd"))
    check_items(build_dataset(cfg("hf_dataset", tmp_path / "dd", split="test")), LABELS)
    check_items(build_dataset(cfg("hf_dataset", tmp_path / "dd")), LABELS[:2])
    with pytest.raises(ValueError, match="'train', 'test'"):
        build_dataset(cfg("hf_dataset", tmp_path / "dd", split="validation"))


def test_hf_hub_name_offline_gives_a_clear_error(monkeypatch):
    calls = []

    def offline_load(name, split=None, **kw):
        calls.append((name, split))
        raise ConnectionError("Couldn't reach 'someone/cifar-thing' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(datasets, "load_dataset", offline_load)
    with pytest.raises(UserError) as e:
        build_dataset(cfg("hf_dataset", "someone/cifar-thing"))
    msg = str(e.value)
    assert "someone/cifar-thing" in msg and "save_to_disk" in msg and "dataset_path" in msg
    assert calls == [("someone/cifar-thing", "train")]
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        build_dataset(cfg("hf_dataset", "./no_such_folder"))
    assert len(calls) == 1  # a local-looking path never goes to the hub


def test_arrow_file_and_folder(tmp_path):
    table(image_key="img", label_key="target").save_to_disk(str(tmp_path / "saved"))
    files = list((tmp_path / "saved").glob("*.arrow"))
    assert len(files) == 1
    check_items(build_dataset(cfg("arrow", files[0])), LABELS)
    check_items(build_dataset(cfg("arrow", tmp_path / "saved")), LABELS)
    # a folder holding both splits in the HF cache's naming: the split's files are taken
    both = tmp_path / "both"
    both.mkdir()
    for split, n in (("train", 3), ("test", 6)):
        part = tmp_path / split
        table(n=n).save_to_disk(str(part))
        next(part.glob("*.arrow")).rename(both / f"mydata-{split}.arrow")
    check_items(build_dataset(cfg("arrow", both, split="test")), LABELS)
    check_items(build_dataset(cfg("arrow", both)), LABELS[:3])


def test_parquet_file_and_folder_with_bytes_cells(tmp_path):
    table().to_parquet(str(tmp_path / "one.parquet"))
    check_items(build_dataset(cfg("parquet", tmp_path / "one.parquet")), LABELS)
    # plain parquet, no datasets metadata: encoded bytes in a 'jpg' column, int labels in 'cls', two files
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "many").mkdir()
    for k, rows in enumerate((LABELS[:4], LABELS[4:])):
        pq.write_table(pa.table({"jpg": [png_bytes(COLOURS[y]) for y in rows], "cls": rows}),
                       tmp_path / "many" / f"part-{k}.parquet")
    ds = build_dataset(cfg("parquet", tmp_path / "many"))
    check_items(ds, LABELS)
    assert ds.image_column == "jpg" and ds.label_column == "cls" and ds.num_classes == 3


def test_string_labels_and_explicit_columns(tmp_path):
    d = datasets.Dataset.from_dict({"picture": [png_bytes(COLOURS[y]) for y in LABELS],
                                    "name": [["zebra", "ant", "cat"][y] for y in LABELS]})
    d.save_to_disk(str(tmp_path / "d"))
    ds = build_dataset(cfg("hf_dataset", tmp_path / "d", image_column="picture", label_column="name"))
    assert ds.classes == ["ant", "cat", "zebra"]
    assert [ds[i][1] for i in range(len(ds))] == [{0: 2, 1: 0, 2: 1}[y] for y in LABELS]
    with pytest.raises(ValueError, match=r"\['picture', 'name'\]"):
        build_dataset(cfg("hf_dataset", tmp_path / "d"))  # no default image column: the columns are listed
    with pytest.raises(ValueError, match="'photo' is not in"):
        build_dataset(cfg("hf_dataset", tmp_path / "d", image_column="photo", label_column="name"))


def test_missing_paths_empty_folders_unknown_format(tmp_path):
    for fmt in ("imagefolder", "arrow", "parquet", "hf_dataset"):
        with pytest.raises(FileNotFoundError, match="nowhere"):
            build_dataset(cfg(fmt, tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        build_dataset(cfg("imagefolder", tmp_path / "empty"))
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        build_dataset(cfg("imagefolder", tmp_path / "empty"))
    for fmt in ("arrow", "parquet"):
        with pytest.raises(ValueError, match=f"no .{fmt} files"):
            build_dataset(cfg(fmt, tmp_path / "empty"))
    with pytest.raises(ValueError, match="'imagefolder', 'hf_dataset', 'arrow', 'parquet', 'digits'"):
        build_dataset(cfg("webdataset", tmp_path))
    with pytest.raises(ValueError, match="dataset_path"):
        build_dataset(cfg("imagefolder", None))


# ---------------------------------------------------------------- unreadable images


def test_corrupted_png_is_skipped_reported_and_counted(tmp_path):
    make_folder(tmp_path / "train", labels=[0, 0, 1, 2])
    bad = tmp_path / "train" / "b" / "999.png"  # sorts last: its stand-in wraps round to item 0
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    ds = build_dataset(cfg("imagefolder", tmp_path / "train", max_bad_images=1))
    assert len(ds) == 5
    i = [k for k, (p, _) in enumerate(ds.samples) if p == str(bad)][0]
    with pytest.warns(BadImageWarning, match="999.png"):
        x, y = ds[i]
    assert torch.equal(x, ds[(i + 1) % 5][0]) and y == ds[(i + 1) % 5][1]
    assert ds.bad_count == 1 and ds.bad_items[0]["index"] == i and str(bad) in ds.bad_items[0]["item"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: no second warning
        ds[i]
        assert ds.bad_count == 1        # counted once
    # a second bad image passes the limit of 1
    bad2 = tmp_path / "train" / "c" / "998.png"
    bad2.write_bytes(b"")
    ds = build_dataset(cfg("imagefolder", tmp_path / "train", max_bad_images=1))
    with pytest.warns(BadImageWarning):
        ds[[k for k, (p, _) in enumerate(ds.samples) if p == str(bad)][0]]
        with pytest.raises(UserError, match=r"998\.png.*") as e:
            ds[[k for k, (p, _) in enumerate(ds.samples) if p == str(bad2)][0]]
    assert "2 unreadable images" in str(e.value) and "max_bad_images=1" in str(e.value)


def test_corrupted_row_in_a_table(tmp_path):
    cells = [png_bytes(COLOURS[y]) for y in LABELS]
    cells[2] = b"garbage"
    datasets.Dataset.from_dict({"png": cells, "labels": LABELS}).save_to_disk(str(tmp_path / "d"))
    ds = build_dataset(cfg("hf_dataset", tmp_path / "d", max_bad_images=3))
    with pytest.warns(BadImageWarning, match="row 2"):
        items = [ds[i] for i in range(len(ds))]
    assert [y for _, y in items] == [LABELS[0], LABELS[1], LABELS[3], LABELS[3], LABELS[4], LABELS[5]]
    assert ds.bad_count == 1 and ds.bad_items[0]["index"] == 2


# ---------------------------------------------------------------- digits


def test_digits_split():
    from sklearn.datasets import load_digits
    xtr, ytr = digits_split("train")
    xte, yte = digits_split("test")
    assert len(ytr) + len(yte) == 1797 and len(yte) == 360
    itr, ite = digits_indices("train"), digits_indices("test")
    assert not set(itr) & set(ite) and len(set(itr) | set(ite)) == 1797
    d = load_digits()
    assert torch.equal(yte, torch.from_numpy(d.target[ite]))
    assert torch.equal(xte[:, 0], torch.from_numpy(d.images[ite]).float() / 8 - 1)
    per_class = np.bincount(d.target)
    assert (np.abs(np.bincount(yte.numpy()) - 0.2 * per_class) <= 1).all()  # stratified
    assert xtr.shape == (1437, 1, 8, 8) and xtr.min() == -1 and xtr.max() == 1
    assert torch.equal(digits_split("train")[0], xtr)  # fixed
    ds = build_dataset(cfg("digits", None, split="test"), in_channels=1)
    assert len(ds) == 360 and ds[5][1] == int(yte[5]) and torch.equal(ds[5][0], xte[5])
    with pytest.raises(ValueError, match="image_size=8"):
        build_dataset(cfg("digits", None, image_size=16), in_channels=1)
    with pytest.raises(ValueError, match="in_channels=1"):
        build_dataset(cfg("digits", None))
    with pytest.raises(ValueError, match="'train' and 'test'"):
        digits_split("val")


# ---------------------------------------------------------------- flips and the sampler


def test_flip_batch_deterministic():
    x = torch.randn(64, 3, 4, 6)
    a, ma = flip_batch(x, augment_generator(7, 2, 11))
    b, mb = flip_batch(x, augment_generator(7, 2, 11))
    c, mc = flip_batch(x, augment_generator(7, 2, 12))
    assert torch.equal(a, b) and torch.equal(ma, mb) and not torch.equal(ma, mc)
    assert 16 < ma.sum() < 48
    assert torch.equal(a[ma], x[ma].flip(-1)) and torch.equal(a[~ma], x[~ma])
    state = torch.random.get_rng_state()
    flip_batch(x, augment_generator(0, 0, 0))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    whole = draw_flip_mask(64, augment_generator(1, 2, 3))
    parts = [flip_batch(x[:16], augment_generator(1, 2, 3), rank=r, world_size=4)[1] for r in range(4)]
    assert torch.equal(torch.cat(parts), whole)


def test_sampler_resume_mid_epoch():
    full = ResumableSampler(103, 5, seed=9)
    run = [b for _ in range(3) for b in full]  # three epochs in one go
    assert len(run) == 3 * (103 // 5)
    s = ResumableSampler(103, 5, seed=9)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state == {"epoch": 0, "position": 7}
    r = ResumableSampler(103, 5, seed=9)
    r.load_state_dict(json.loads(json.dumps(state)))
    got = head[:]
    for epoch in range(3):
        r.set_epoch(epoch)  # the usual loop; keeps the resumed position
        got += list(r)
    assert got == run
    assert run[:20] != run[20:40]  # epochs are shuffled differently
    with pytest.raises(ValueError, match="position"):
        r.load_state_dict({"epoch": 0, "position": 21})


def test_sampler_world_size_invariance():
    one = ResumableSampler(100, 6, seed=1)
    ranks = [ResumableSampler(100, 3, rank=r, world_size=2, seed=1) for r in range(2)]
    for epoch in range(2):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        a, b0, b1 = list(one), list(ranks[0]), list(ranks[1])
        assert len(a) == 100 // 6 and [x + y for x, y in zip(b0, b1)] == a
        assert not set(sum(b0, [])) & set(sum(b1, []))
    # a 2-process checkpoint resumes in 1 process with the same global batch
    ranks[0].set_epoch(5)
    it = iter(ranks[0])
    next(it), next(it)
    one.load_state_dict(ranks[0].state_dict())
    assert next(iter(one))[:3] == next(it)


def test_sampler_drop_last_false_pads():
    s = ResumableSampler(10, 4, seed=0, drop_last=False)
    batches = list(s)
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)
    assert set(sum(batches, [])) == set(range(10))
    with pytest.raises(ValueError, match="no global batch"):
        ResumableSampler(10, 6, world_size=2)


class Numbers(torch.utils.data.Dataset):
    def __len__(self): return 40
    def __getitem__(self, i): return torch.tensor([float(i)]), i


def test_loader_counts_delivered_batches_with_workers():
    loader = make_loader(Numbers(), 4, seed=2, num_workers=2)
    assert len(loader) == 10
    it = iter(loader)
    seen = [next(it)[1].tolist() for _ in range(3)]
    assert loader.state_dict() == {"epoch": 0, "position": 3}  # the workers have fetched further ahead
    rest = [y.tolist() for _, y in it]
    assert loader.state_dict() == {"epoch": 1, "position": 0}
    fresh = make_loader(Numbers(), 4, seed=2)
    fresh.load_state_dict({"epoch": 0, "position": 3})
    fresh.set_epoch(0)
    assert [y.tolist() for _, y in fresh] == rest
    assert sorted(sum(seen + rest, [])) == list(range(40))
    two = [make_loader(Numbers(), 2, rank=r, world_size=2, seed=2) for r in range(2)]
    assert [a[1].tolist() + b[1].tolist() for a, b in zip(*two)] == seen + rest


# ---------------------------------------------------------------- VAE and latent cache


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(0)


def images(n=7, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x, fail_from=None):
        self.x, self.fail_from, self.seen = x, fail_from, []
        self.image_size, self.path = x.shape[-1], "in memory"
    def __len__(self): return len(self.x)
    def __getitem__(self, i):
        if self.fail_from is not None and i >= self.fail_from: raise KeyboardInterrupt("killed")
        self.seen.append(i)
        return self.x[i], i % 3


def test_tiny_vae():
    a, b, c = tiny_vae(0), tiny_vae(0), tiny_vae(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    z = encode_images(a, images(2, 32), sample=False)
    assert z.shape == (2, 4, 32 // L.TINY_VAE_FACTOR, 32 // L.TINY_VAE_FACTOR)


def test_encode_images_matches_diffusers(vae):
    x = images(4)
    ref = vae.encode(x).latent_dist
    assert torch.equal(encode_images(vae, x, sample=False), ref.mean * 0.18215)
    got = encode_images(vae, x, generator=torch.Generator().manual_seed(3))
    official = ref.sample(generator=torch.Generator().manual_seed(3)).mul_(0.18215)
    assert torch.allclose(got, official, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, encode_images(vae, x, generator=torch.Generator().manual_seed(4)))
    whole = encode_images(vae, x, generator=torch.Generator().manual_seed(3))
    halves = [encode_images(vae, x[2 * r:2 * r + 2], generator=torch.Generator().manual_seed(3), rank=r,
                            world_size=2) for r in range(2)]
    assert torch.allclose(torch.cat(halves), whole, atol=1e-6)


def test_latent_cache_round_trip(vae, tmp_path):
    x = images(7)
    meta = build_latent_cache(Pairs(x), vae, tmp_path / "c", batch_size=2, shard_size=3, progress=False)
    assert (meta["count"], meta["num_shards"], meta["latent_shape"], meta["scale"]) \
        == (7, 3, [4, 2, 2], 0.18215)
    on_disk = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert on_disk["encoder_hash"] == L.vae_identity(vae)["encoder_hash"] and on_disk["image_size"] == 16
    assert not (tmp_path / "c" / "plan.json").exists() and not list((tmp_path / "c").glob("*.tmp"))
    for in_memory in (False, True):
        lat = LatentDataset(tmp_path / "c", in_memory=in_memory)
        assert len(lat) == 7
        mean, std, labels = next(iter(torch.utils.data.DataLoader(lat, batch_size=7)))
        assert mean.shape == (7, 2, 4, 2, 2) and labels.tolist() == [i % 3 for i in range(7)]
        assert torch.allclose(mean[:, 0], encode_images(vae, x, sample=False), atol=1e-6)
        assert torch.allclose(mean[:, 1], encode_images(vae, x.flip(-1), sample=False), atol=1e-6)
        assert torch.allclose(std[:, 0], vae.encode(x).latent_dist.std * 0.18215, atol=1e-6)
    # the same draws as flipping and encoding on the fly, from the same generator
    g1, g2 = augment_generator(0, 3, 5), augment_generator(0, 3, 5)
    flipped, mask = flip_batch(x, g1)
    direct = encode_images(vae, flipped, generator=g1)
    cached, y = latents_from_cache_batch((mean, std, labels), draw_flip_mask(7, g2), g2)
    assert 0 < mask.sum() < 7 and torch.allclose(cached, direct, atol=1e-5) and torch.equal(y, labels)
    means, _ = latents_from_cache_batch((mean, std, labels), mask, sample=False)
    assert torch.allclose(means, encode_images(vae, flipped, sample=False), atol=1e-6)
    # a complete cache is not rebuilt; one for another VAE encoder is refused
    assert build_latent_cache(Pairs(x, fail_from=0), vae, tmp_path / "c", progress=False)["count"] == 7
    with pytest.raises(ValueError, match="count: 7 there, 6 now"):
        build_latent_cache(Pairs(x[:6]), vae, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="encoder_hash"):
        build_latent_cache(Pairs(x), tiny_vae(1), tmp_path / "c", shard_size=3, progress=False)


def test_latent_cache_resumes_and_refuses_incomplete(vae, tmp_path):
    x = images(7, seed=1)
    folder = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(Pairs(x, fail_from=4), vae, folder, batch_size=2, shard_size=2, progress=False)
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (folder / "meta.json").exists()
    with pytest.raises(UserError, match="incomplete.*2 shards"):
        LatentDataset(folder)
    (folder / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # left by a crash mid-write
    with pytest.raises(ValueError, match="count"):  # resuming with another dataset is refused
        build_latent_cache(Pairs(x[:6]), vae, folder, batch_size=2, shard_size=2, progress=False)
    second = Pairs(x)
    build_latent_cache(second, vae, folder, batch_size=2, shard_size=2, progress=False)
    assert sorted(set(second.seen)) == [4, 5, 6]  # only the missing shards were encoded
    whole = tmp_path / "whole"
    build_latent_cache(Pairs(x), vae, whole, batch_size=2, shard_size=2, progress=False)
    a, b = LatentDataset(folder, in_memory=True), LatentDataset(whole, in_memory=True)
    for i in range(7):
        assert all(torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(a[i], b[i]))
    with pytest.raises(FileNotFoundError, match="nothing"):
        LatentDataset(tmp_path / "nothing")


def test_latent_cache_float16_and_pickling(vae, tmp_path):
    import pickle
    x = images(3)
    build_latent_cache(Pairs(x), vae, tmp_path / "h", dtype=torch.float16, progress=False)
    lat = LatentDataset(tmp_path / "h")
    mean, std, label = lat[1]
    assert mean.dtype == torch.float16 and label == 1
    lat2 = pickle.loads(pickle.dumps(lat))  # what DataLoader workers receive
    assert torch.equal(lat2[2][0], lat[2][0])
    z, _ = latents_from_cache_batch((mean[None], std[None], torch.tensor([label])), torch.tensor([True]),
                                    sample=False)
    assert z.dtype == torch.float32
    assert torch.allclose(z[0], encode_images(vae, x[1:2].flip(-1), sample=False)[0], atol=2e-3)


def test_load_vae(vae, tmp_path):
    with pytest.raises(UserError) as e:
        load_vae(str(tmp_path / "sd-vae-ft-ema"), hint=CONFIG_VAE_HINT)
    msg = str(e.value)
    assert "sd-vae-ft-ema" in msg and "model_config.vae_path" in msg and "huggingface-cli download" in msg
    vae.save_pretrained(str(tmp_path / "tiny"))
    loaded = load_vae(str(tmp_path / "tiny"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in vae.state_dict().items())
    assert not loaded.training and load_vae("none") is None
    (tmp_path / "broken").mkdir()
    with pytest.raises(UserError, match="broken"):
        load_vae(str(tmp_path / "broken"))
