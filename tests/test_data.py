"""Data sets, parsers, sampler, loader and download, on small files written here (offline)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import itertools
import struct
import tarfile
import threading
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixeldiffusion import data
from pixeldiffusion.config import DataConfig
from pixeldiffusion.data import (
    EpochBatchSampler,
    FolderDataset,
    TensorImageDataset,
    download,
    load_dataset,
    make_loader,
    random_hflip,
)
from pixeldiffusion.errors import DataError
from pixeldiffusion.files import temp_path_of
from pixeldiffusion.images import uint8_to_float


def value(pixel: float) -> float:
    """The [-1, 1] value of a uint8 pixel."""
    return pixel / 127.5 - 1.0


def check_images(x: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert x.shape == shape and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> TensorImageDataset:
    return load_dataset(DataConfig())


def test_digits_are_5000_padded_images_in_10_classes(digits):
    x, y = digits.__getitems__(list(range(len(digits))))
    check_images(x, (5000, 1, 32, 32))
    assert digits.num_classes == 10 and digits.class_names == [str(d) for d in range(10)]
    assert torch.equal(torch.bincount(y), torch.full((10,), 500))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, 0][:, border] == -1.0).all()
    assert x[:, :, 2:30, 2:30].max() == 1.0
    single, label = digits[4999]
    assert torch.equal(single, x[4999]) and label == 9


def test_digits_resize_and_rgb():
    ds = load_dataset(DataConfig(image_size=16, channels=3))
    x, y = ds[0]
    check_images(x, (3, 16, 16))
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert ds.channels == 3 and ds.image_size == 16 and y == 0


# --------------------------------------------------------------------------- mnist (IDX)


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path) -> np.ndarray:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[1, 5, 7] = 200
    images[2] = 255
    folder = root / "mnist"
    folder.mkdir(parents=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", images, 0x803)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.array([7, 3, 1]), 0x801)
    return images


def test_mnist_idx_round_trip(tmp_path):
    fake_mnist(tmp_path)
    ds = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path), download=False))
    x, y = ds.__getitems__([0, 1, 2])
    check_images(x, (3, 1, 32, 32))
    assert y.tolist() == [7, 3, 1] and ds.num_classes == 10
    assert x[1, 0, 7, 9] == pytest.approx(value(200))
    assert (x[1].sum() - x[1, 0, 7, 9]) == pytest.approx(-(32 * 32 - 1))
    assert (x[2, 0, 2:30, 2:30] == 1).all() and (x[2, 0, :2] == -1).all()


def test_mnist_native_size_has_no_border(tmp_path):
    fake_mnist(tmp_path)
    ds = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path), image_size=28,
                                 download=False))
    assert ds[1][0][0, 5, 7] == pytest.approx(value(200))


def test_mnist_wrong_magic_names_the_file(tmp_path):
    fake_mnist(tmp_path)
    bad = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    write_idx(bad, np.array([1, 2, 3]), 0x803)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path), download=False))


def test_mnist_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="--data.download true"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path), download=False))


# --------------------------------------------------------------------------- cifar10 (binary)


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def fake_cifar(root: Path) -> Path:
    """5 batch files of 2 records; record 0 of batch 1 has a known R/G/B pixel at (3, 4)."""
    folder = root / "cifar10"
    folder.mkdir(parents=True)
    archive = folder / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for b in range(1, 6):
            records = np.zeros((2, 3073), dtype=np.uint8)
            records[:, 0] = [b, (b + 5) % 10]
            planes = records[:, 1:].reshape(2, 3, 32, 32)
            planes[0, :, 3, 4] = [10 * b, 100, 250]
            add_member(tar, f"data_batch_{b}.bin", records.tobytes())
        add_member(tar, "batches.meta.txt", b"airplane\nautomobile\nbird\ncat\ndeer\ndog\n"
                                           b"frog\nhorse\nship\ntruck\n\n")
    return archive


def test_cifar10_binary_parse_and_cache(tmp_path):
    archive = fake_cifar(tmp_path)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), channels=3, download=False)
    ds = load_dataset(cfg)
    x, y = ds.__getitems__(list(range(10)))
    check_images(x, (10, 3, 32, 32))
    assert y.tolist() == [1, 6, 2, 7, 3, 8, 4, 9, 5, 0]
    assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
    assert ds.num_classes == 10
    assert x[2, :, 3, 4].tolist() == pytest.approx([value(20), value(100), value(250)])
    assert (tmp_path / "cifar10" / "train_images.npy").is_file()
    archive.unlink()
    cached = load_dataset(cfg)
    assert torch.equal(cached.__getitems__(list(range(10)))[0], x)


def test_cifar10_grey_and_resize(tmp_path):
    fake_cifar(tmp_path)
    grey = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))
    luma = round(0.299 * 10 + 0.587 * 100 + 0.114 * 250)
    assert grey[0][0].shape == (1, 32, 32)
    assert grey[0][0][0, 3, 4] == pytest.approx(value(luma))
    small = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=16,
                                    channels=3, download=False))
    check_images(small[0][0], (3, 16, 16))


def test_cifar10_missing_batch(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    with tarfile.open(folder / "cifar-10-binary.tar.gz", "w:gz") as tar:
        add_member(tar, "data_batch_1.bin", bytes(3073))
    with pytest.raises(DataError, match="data_batch_2.bin"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))


# --------------------------------------------------------------------------- celeba64 (zip)


def face_jpeg() -> bytes:
    """A 178x218 image: the centre 140x140 square red, the rest blue."""
    pixels = np.zeros((218, 178, 3), dtype=np.uint8)
    pixels[..., 2] = 255
    pixels[39:179, 19:159] = [255, 0, 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=100, subsampling=0)
    return buffer.getvalue()


def test_celeba64_crop_resize_and_cache(tmp_path):
    folder = tmp_path / "celeba64"
    folder.mkdir()
    with zipfile.ZipFile(folder / "img_align_celeba.zip", "w") as zf:
        for i in range(3):
            zf.writestr(f"img_align_celeba/{i + 1:06d}.jpg", face_jpeg())
    cfg = DataConfig(dataset="celeba64", root=str(tmp_path), image_size=16, channels=3,
                     download=False)
    ds = load_dataset(cfg)
    x, y = ds.__getitems__([0, 1, 2])
    check_images(x, (3, 3, 16, 16))
    assert ds.num_classes == 0 and ds.class_names is None and y.tolist() == [-1, -1, -1]
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    error = (x - red).abs()
    assert error[..., 1:-1, 1:-1].max() < 0.05 and error.max() < 0.25  # JPEG rings at the edge
    (folder / "img_align_celeba.zip").unlink()
    assert torch.equal(load_dataset(cfg).__getitems__([0, 1, 2])[0], x)


def test_celeba64_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="img_align_celeba.zip"):
        load_dataset(DataConfig(dataset="celeba64", root=str(tmp_path), download=False))


# --------------------------------------------------------------------------- folder


def save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, 10:, 3] = 255  # left half transparent -> white, right half opaque red
    save(root / "a" / "rgba.png", Image.fromarray(rgba, "RGBA"))
    save(root / "a" / "palette.gif", Image.new("RGB", (12, 12), (0, 0, 255)).convert("P"))
    save(root / "b" / "deep" / "sixteen.png", Image.fromarray(np.full((8, 8), 65535, np.uint16)))
    save(root / "b" / "grey.jpg", Image.new("L", (16, 16), 0))
    save(root / "b" / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 0, 0, 0)))
    save(root / "b" / "la.png", Image.new("LA", (8, 8), (0, 0)))
    (root / "a" / "empty.png").write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
        buffer, "JPEG")
    (root / "b" / "truncated.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    return root


def folder_dataset(root: Path, channels: int = 3, labels: bool = True) -> FolderDataset:
    with pytest.warns(UserWarning, match="skipped 1 unreadable image file.*empty.png"):
        return load_dataset(DataConfig(dataset="folder", root=str(root), image_size=8,
                                       channels=channels, class_labels=labels))


def test_folder_modes_and_labels(image_folder):
    ds = folder_dataset(image_folder)
    names = [p.relative_to(image_folder).as_posix() for p in ds.files]
    assert names == ["a/palette.gif", "a/rgba.png", "b/cmyk.jpg", "b/deep/sixteen.png",
                     "b/grey.jpg", "b/la.png", "b/truncated.jpg"]
    assert ds.class_names == ["a", "b"] and ds.num_classes == 2
    assert ds.labels == [0, 0, 1, 1, 1, 1, 1]
    items = {name: ds[i] for i, name in enumerate(names[:-1])}
    for x, _ in items.values():
        check_images(x, (3, 8, 8))
    rgba = items["a/rgba.png"][0]
    assert (rgba[:, :, 0] == 1.0).all()  # transparent left edge -> white
    assert torch.allclose(rgba[:, :, -1], torch.tensor([1.0, -1.0, -1.0])[:, None], atol=0.02)
    assert items["a/palette.gif"][0][:, 4, 4].tolist() == pytest.approx([-1, -1, 1], abs=0.02)
    assert (items["b/deep/sixteen.png"][0] == 1.0).all()
    assert (items["b/grey.jpg"][0] == -1.0).all()
    assert (items["b/cmyk.jpg"][0] > 0.95).all()
    assert (items["b/la.png"][0] == 1.0).all()  # fully transparent -> white
    assert items["b/grey.jpg"][1] == 1


def test_folder_bad_file_is_replaced_by_the_next(image_folder):
    ds = folder_dataset(image_folder, channels=1)
    with pytest.warns(UserWarning, match="truncated.jpg"):
        x, y = ds[len(ds) - 1]
    assert torch.equal(x, ds[0][0]) and y == 0
    check_images(x, (1, 8, 8))


def test_folder_unlabelled_and_non_square(tmp_path):
    save(tmp_path / "wide.png", Image.new("RGB", (40, 10), (255, 255, 255)))
    ds = load_dataset(DataConfig(dataset="folder", root=str(tmp_path), image_size=8))
    x, y = ds[0]
    check_images(x, (1, 8, 8))
    assert y == -1 and ds.num_classes == 0 and ds.class_names is None


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist; set --data.root"):
        load_dataset(DataConfig(dataset="folder", root=str(tmp_path / "nope")))
    (tmp_path / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="no readable images"):
        load_dataset(DataConfig(dataset="folder", root=str(tmp_path)))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "bad.jpg").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no readable images"):
        load_dataset(DataConfig(dataset="folder", root=str(tmp_path)))


def test_folder_class_labels_need_sub_folders(tmp_path):
    save(tmp_path / "loose.png", Image.new("RGB", (8, 8)))
    save(tmp_path / "cats" / "cat.png", Image.new("RGB", (8, 8)))
    with pytest.raises(DataError, match="sub-folder named after its class"):
        load_dataset(DataConfig(dataset="folder", root=str(tmp_path), class_labels=True))


# --------------------------------------------------------------------------- download


def test_download_good_md5(tmp_path):
    source = tmp_path / "remote.bin"
    source.write_bytes(b"pixels" * 1000)
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "file.bin"
    assert download(["http://127.0.0.1:9/x", source.as_uri()], dest, md5) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert not temp_path_of(dest).exists()
    source.unlink()
    assert download(source.as_uri(), dest, md5) == dest  # present and correct: not fetched again


def test_download_bad_md5(tmp_path):
    source = tmp_path / "remote.bin"
    source.write_bytes(b"pixels")
    dest = tmp_path / "file.bin"
    actual = hashlib.md5(b"pixels").hexdigest()
    with pytest.raises(DataError, match=f"file.bin.*{actual}.*{'0' * 32}"):
        download(source.as_uri(), dest, "0" * 32)
    assert not dest.exists() and not temp_path_of(dest).exists()


def test_download_unreachable(tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DataError, match=r"could not download file.bin from .*place it at"):
        download("http://127.0.0.1:9/x", dest, "0" * 32)
    assert not dest.exists()


def test_missing_file_is_downloaded_when_allowed(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    images = fake_mnist(remote)
    files = {name: remote / "mnist" / name for name, _ in data.MNIST_FILES.values()}
    md5s = {name: hashlib.md5(path.read_bytes()).hexdigest() for name, path in files.items()}
    monkeypatch.setattr(data, "MNIST_MIRRORS", ("http://127.0.0.1:9/", remote.as_uri() + "/mnist/"))
    monkeypatch.setattr(data, "MNIST_FILES", {k: (n, md5s[n]) for k, (n, _) in
                                              data.MNIST_FILES.items()})
    ds = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path / "local"), image_size=28))
    assert len(ds) == len(images) and (tmp_path / "local" / "mnist" / files.popitem()[0]).is_file()


DRIVE_PAGE = ('<html><form id="download-form" action="{action}" method="get">'
              '<input type="hidden" name="id" value="abc"><input type="hidden" name="confirm" '
              'value="t"><input type="hidden" name="uuid" value="u-1"></form></html>')


class FakeDrive(http.server.BaseHTTPRequestHandler):
    """Answers /uc with Drive's "download anyway" page, and the form's target with the file."""

    def do_GET(self) -> None:
        wanted = "/download?id=abc&confirm=t&uuid=u-1"
        body, kind = (b"zip bytes", "application/zip") if self.path == wanted else (
            DRIVE_PAGE.format(action="/download").encode(), "text/html; charset=utf-8")
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_drive_confirmation_page_is_followed(tmp_path):
    page = DRIVE_PAGE.format(action="https://drive.usercontent.google.com/download")
    assert data._html_form_url(page, "https://drive.google.com/uc?id=abc") == (
        "https://drive.usercontent.google.com/download?id=abc&confirm=t&uuid=u-1")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeDrive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/uc?id=abc"
        dest = download(url, tmp_path / "x.zip", hashlib.md5(b"zip bytes").hexdigest())
    finally:
        server.shutdown()
    assert dest.read_bytes() == b"zip bytes"


# --------------------------------------------------------------------------- sampler and loader


def stream(n: int = 10, batch_size: int = 3, count: int = 12, **kwargs) -> list[list[int]]:
    return list(itertools.islice(EpochBatchSampler(n, batch_size, seed=5, **kwargs), count))


def test_sampler_epochs_cover_each_index_once():
    batches = stream(count=9)
    for epoch in range(3):
        flat = sum(batches[3 * epoch:3 * epoch + 3], [])
        order = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch))
        assert flat == order[:9].tolist() and len(set(flat)) == 9
    assert batches[:3] != batches[3:6]


def test_sampler_is_deterministic_and_resumable():
    full = stream(count=30)
    assert full == stream(count=30)
    for k in (1, 3, 7, 17):
        assert stream(count=10, start=k) == full[k:k + 10]


def test_sampler_ranks_take_interleaved_disjoint_batches():
    full = stream(n=20, batch_size=4, count=20)
    rank0 = stream(n=20, batch_size=4, count=10, rank=0, world_size=2)
    rank1 = stream(n=20, batch_size=4, count=10, rank=1, world_size=2)
    assert rank0 == full[0::2] and rank1 == full[1::2]
    assert not set(rank0[0]) & set(rank1[0])
    assert stream(n=20, batch_size=4, count=4, start=3, rank=1, world_size=2) == full[7:15:2]


def test_make_loader_in_memory_is_fast():
    images = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8)
    ds = TensorImageDataset(images, torch.arange(1000) % 10, [str(i) for i in range(10)])
    loader = make_loader(ds, 64, seed=0)
    begin = time.perf_counter()
    batches = list(itertools.islice(loader, 50))
    assert time.perf_counter() - begin < 5.0
    x, y = batches[0]
    check_images(x, (64, 3, 32, 32))
    assert y.dtype == torch.long and y.shape == (64,)
    first = EpochBatchSampler(1000, 64, seed=0).global_batch(0)
    assert torch.equal(x, uint8_to_float(images[first]))
    resumed = next(iter(make_loader(ds, 64, seed=0, start=49)))
    assert torch.equal(resumed[0], batches[49][0])


def test_make_loader_folder_with_worker(image_folder):
    ds = folder_dataset(image_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for workers in (0, 1):
            x, y = next(iter(make_loader(ds, 4, seed=1, num_workers=workers)))
            check_images(x, (4, 3, 8, 8))
            assert y.dtype == torch.long and set(y.tolist()) <= {0, 1}


def test_make_loader_batch_larger_than_data():
    ds = TensorImageDataset(torch.zeros(5, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(DataError, match="batch size 8 is larger than the data set"):
        make_loader(ds, 8, seed=0)


def test_random_hflip():
    x = torch.arange(64 * 4, dtype=torch.float32).reshape(64, 1, 1, 4)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).all(dim=(1, 2, 3))
    kept = (out == x).all(dim=(1, 2, 3))
    assert (flipped | kept).all() and 10 < int(flipped.sum()) < 54
    again = random_hflip(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
