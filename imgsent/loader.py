"""The decode stage of the torch engine: a map-style dataset over image references, DataLoader
processes that decode each image once for every backbone, and a run that survives them dying.

:class:`ImageDataset` item ``i`` is ``refs[i]`` decoded (:func:`~imgsent.decode.decode_ref`), or a
plain JPEG's bytes for decoding on the device; :func:`collate` stacks a batch's views (the bytes of
JPEGs end to end in one shared-memory block); :func:`decoded_batches` yields the batches in order,
and when a decoding process dies (a decoder segfault, an OOM kill) decodes the batches it may have
held again one image at a time in a separate process; :func:`check_shared_memory` fails at once,
saying what to change, where the batches in flight cannot fit in ``/dev/shm``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .decode import DecodedImage, Preprocess, crop_count, decode_ref, decode_refs, read_jpeg
from .decodepool import PREFETCH
from .errors import ImgsentError
from .inputs import ImageRef

DEVICE_PREFETCH = 2  # the same when they only read JPEG files (decode="device"): reading is quick
JPEG_BYTES = 512 * 1024  # shared memory assumed per JPEG handed over whole (decode="device")


class ImageDataset(Dataset):
    """The decode step as a map-style dataset: item ``i`` is ``refs[i]`` decoded into the views
    of every distinct preprocessing (:func:`~imgsent.decode.decode_ref`); with ``decode="device"``
    a plain JPEG's bytes instead (:func:`~imgsent.decode.read_jpeg`), decoded later on the device."""

    def __init__(
        self,
        refs: Sequence[ImageRef],
        preprocesses: list[Preprocess],
        tta: str,
        max_pixels: int,
        decode: str = "workers",
        keep_images: str | None = None,
    ):
        self.refs = list(refs)
        self.keep_images = keep_images
        self.preprocesses = preprocesses
        self.tta = tta
        self.max_pixels = max_pixels
        self.decode = decode

    def __len__(self) -> int:
        return len(self.refs)

    def __getitems__(self, indices: list[int]) -> list[DecodedImage]:
        """A whole batch (the DataLoader asks so): URLs in it download side by side."""
        if self.decode == "device" or not any(self.refs[i].source for i in indices):
            return [self[i] for i in indices]
        refs = [self.refs[i] for i in indices]
        return decode_refs(refs, self.preprocesses, self.tta, self.max_pixels, self.keep_images)

    def __getitem__(self, index: int) -> DecodedImage:
        if self.decode == "device":
            encoded = read_jpeg(self.refs[index], self.max_pixels)
            if encoded is not None:
                return encoded
        return decode_ref(self.refs[index], self.preprocesses, self.tta, self.max_pixels)


@dataclasses.dataclass
class CollatedBatch:
    items: list[DecodedImage]
    views: dict[tuple, torch.Tensor]  # key -> uint8 (n_decoded, n_crops, 3, H, W), the rows decoded by Pillow
    jpeg_pos: list[int] = dataclasses.field(default_factory=list)  # rows left for the device to decode
    jpeg_bytes: torch.Tensor | None = None  # their files' bytes, end to end (one shared-memory block)
    jpeg_sizes: list[int] = dataclasses.field(default_factory=list)

    def pin_memory(self):
        self.views = {k: v.pin_memory() for k, v in self.views.items()}
        return self


def collate(items: list[DecodedImage]) -> CollatedBatch:
    """Stack the views of the rows Pillow decoded; the bytes of JPEGs left for the device go end
    to end into one tensor (a decoding process hands it over in shared memory, not pickled)."""
    ok = [it for it in items if it.status == "ok" and it.views is not None]
    views: dict[tuple, torch.Tensor] = {}
    if ok:
        for key in ok[0].views:
            views[key] = torch.from_numpy(np.stack([it.views[key] for it in ok]))
    jpeg_pos = [i for i, it in enumerate(items) if it.jpeg is not None]
    blob = torch.from_numpy(np.concatenate([items[i].jpeg for i in jpeg_pos])) if jpeg_pos else None
    sizes = [len(items[i].jpeg) for i in jpeg_pos]
    for it in items:
        it.views = it.jpeg = None  # pixels and bytes travel once, in the tensors
    return CollatedBatch(items, views, jpeg_pos, blob, sizes)


def _isolated_decode(dataset: ImageDataset, indices: list[int]) -> list[DecodedImage]:
    """Decode ``indices`` one by one in a forked process (:func:`imgsent.decodepool.decode_isolated`)."""
    from .decodepool import decode_isolated

    return decode_isolated(dataset.__getitem__, dataset.refs, indices)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)
    sys.excepthook = _quiet_lost_parent


def _quiet_lost_parent(exc_type, exc, tb) -> None:
    """In a decoding process: when the main process ends (Ctrl-C, SIGTERM), the thread that hands
    it shared-memory batches (multiprocessing's resource sharer, which reports through
    ``sys.excepthook``) loses its connection; that is no error worth a traceback."""
    if not issubclass(exc_type, (ConnectionError, EOFError)):
        sys.__excepthook__(exc_type, exc, tb)


def make_loader(dataset: ImageDataset, batches: list[list[int]], workers: int, prefetch: int, pin: bool) -> DataLoader:
    """``workers`` decoding processes (0: this process) turning index ``batches`` of ``dataset``
    into :class:`CollatedBatch`es, ``prefetch`` batches ahead each, pinned when ``pin``."""
    kwargs = {}
    if workers > 0:
        kwargs = {"worker_init_fn": _worker_init, "prefetch_factor": prefetch, "persistent_workers": False}
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate, pin_memory=pin, **kwargs)


def decoded_batches(
    dataset: ImageDataset,
    batches: list[list[int]],
    workers: int,
    prefetch: int,
    pin: bool,
    started: Callable[[], None] = lambda: None,
) -> Iterator[CollatedBatch]:
    """Every batch of ``batches`` decoded, in order (:func:`make_loader`); ``started()`` runs once
    the decoding processes have started (the engine prepares its models meanwhile). A decoding
    process that dies does not end the run: the batches it may have held are decoded again one
    image at a time in a separate process, and an image that kills that process too becomes an
    error row."""
    received = 0
    while received < len(batches):
        loader = iter(make_loader(dataset, batches[received:], workers, prefetch, pin))  # decoding processes start
        started()
        try:
            for batch in loader:
                received += 1
                yield batch
        except RuntimeError as exc:
            if workers == 0 or "DataLoader worker" not in str(exc):
                raise
            # Unregister the dead loader's workers first: torch's SIGCHLD handler would
            # otherwise raise again, anywhere, when the next child process exits.
            getattr(loader, "_shutdown_workers", lambda: None)()
            in_flight = batches[received : received + workers * prefetch + 1]
            for indices in in_flight:
                received += 1
                yield collate(_isolated_decode(dataset, indices))


def prefetch_for(decode: str) -> int:
    """Batches each decoding process works ahead: fewer when it only reads JPEG files."""
    return DEVICE_PREFETCH if decode == "device" else PREFETCH


SHM = "/dev/shm"


def check_shared_memory(
    workers: int, batch_size: int, preprocesses: list[Preprocess], tta: str, decode: str = "workers"
) -> None:
    """Decoding processes hand batches over in shared memory (``/dev/shm``); containers give it
    64 MB by default. Fail at once, saying what to change, when the batches in flight cannot fit.
    With ``decode="device"`` they hand over whole JPEG files, assumed :data:`JPEG_BYTES` each (a
    tweet photo is 0.1-0.3 MB, a 12-megapixel camera photo 3-5 MB)."""
    if workers < 1 or not os.path.isdir(SHM):
        return
    crops = crop_count(tta)
    views = {pp.view_key: pp.input_size for pp in preprocesses}
    per_image = crops * sum(3 * h * w for h, w in views.values())
    if decode == "device":
        per_image = max(per_image, JPEG_BYTES)
    need = 2 * batch_size * per_image * workers * prefetch_for(decode)  # batches in flight, and room to hand them over
    free = shutil.disk_usage(SHM).free
    if free < need:
        raise ImgsentError(
            f"{SHM} has {free / 2**20:.0f} MB free, but {workers} decoding processes with batches of {batch_size} "
            f"need about {need / 2**20:.0f} MB there; give the container more shared memory (docker run "
            f"--shm-size=2g), or lower workers or batch_size (workers=0 decodes in this process)"
        )


def batch_views(
    batch: CollatedBatch,
    preprocesses: list[Preprocess],
    tta: str,
    max_pixels: int,
    device: torch.device,
    decoder: str | None,
) -> tuple[dict[tuple, torch.Tensor], list[int], tuple[int, int]]:
    """A batch of ``decode="device"``'s views on ``device``: its JPEGs decoded there together
    (:func:`imgsent.devicedecode.decode_views`), one the device refuses decoded by Pillow here (an
    error row with Pillow's reason if that fails too), and the images the workers decoded copied
    over: (views, rows of its good images in order, (JPEGs decoded on the device, refused))."""
    from .devicedecode import decode_views

    items, jpeg_pos = batch.items, batch.jpeg_pos
    left = set(jpeg_pos)
    host_pos = [i for i, it in enumerate(items) if it.status == "ok" and i not in left]
    jpegs = list(torch.split(batch.jpeg_bytes, batch.jpeg_sizes))
    on_device, failed = decode_views(
        jpegs, [items[i].orientation for i in jpeg_pos], preprocesses, tta, device, decoder
    )
    refused = [jpeg_pos[j] for j in failed]
    refused_set = set(refused)
    device_pos = [p for p in jpeg_pos if p not in refused_set]
    for p in refused:
        items[p] = decode_ref(items[p].ref, preprocesses, tta, max_pixels)
    redone = [p for p in refused if items[p].status == "ok"]
    redone_views = collate([items[p] for p in redone]).views
    ok_pos = [i for i, it in enumerate(items) if it.status == "ok"]
    row = {p: r for r, p in enumerate(ok_pos)}
    crops = crop_count(tta)
    views: dict[tuple, torch.Tensor] = {}
    for pp in preprocesses:
        if pp.view_key in views:
            continue
        x = torch.empty((len(ok_pos), crops, 3, *pp.input_size), dtype=torch.uint8, device=device)
        for positions, source in ((host_pos, batch.views), (device_pos, on_device), (redone, redone_views)):
            if positions:
                x[[row[p] for p in positions]] = source[pp.view_key].to(device, non_blocking=True)
        views[pp.view_key] = x
    return views, ok_pos, (len(device_pos), len(refused))
