"""Weights: reading local weight files safely, fingerprints, imgsent's cache, the key layout of
weights that ship inside installed Python packages (the files: :mod:`imgsent.shipped`), and the conversion of torchvision's quantized
MobileNetV2 checkpoint into float weights.

Nothing here unpickles arbitrary objects: ``.safetensors`` files are read with safetensors, other
checkpoints with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ImgsentError, one_line
from .shipped import PACKAGED, WEIGHTS_ENV, PackagedWeights, packaged_weights_file  # noqa: F401  (imported from here too)
from .specs import HOME_ENV, cache_dir, file_sha256  # noqa: F401  (cache_dir: imported from here too)

TIMEOUT_ENV = "IMGSENT_DOWNLOAD_TIMEOUT"
DOWNLOAD_TIMEOUT = 30.0  # seconds a weights download may wait to connect, or for its next bytes


def download_timeout() -> float:
    """``$IMGSENT_DOWNLOAD_TIMEOUT`` seconds, else :data:`DOWNLOAD_TIMEOUT`."""
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DOWNLOAD_TIMEOUT
    except ValueError:
        raise ImgsentError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ImgsentError(f"{TIMEOUT_ENV} must be > 0 seconds, got {raw}")
    return value


@contextlib.contextmanager
def downloading():
    """Around anything that may download weights (timm's and torchvision's hubs): every socket
    opened meanwhile gives up after :func:`download_timeout` seconds without an answer (to connect,
    or between bytes: torch hub's ``urlopen`` has no timeout of its own, so a proxy that accepts
    and never answers hung a run for good), Hugging Face's client gets the same limits unless its
    own variables are set, and what the hubs print ("Downloading: ...") goes to stderr, never into a
    data stream on stdout. Restores the previous settings."""
    import socket
    import sys

    limit = download_timeout()
    before = socket.getdefaulttimeout()
    env = {k: os.environ.get(k) for k in ("HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT")}
    socket.setdefaulttimeout(limit)
    for k, v in env.items():
        if v is None:
            os.environ[k] = str(int(math.ceil(limit)))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        socket.setdefaulttimeout(before)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)


def stall_guarded(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` (a download) on a helper thread, given up with ``TimeoutError`` once no
    byte has arrived in the hubs' caches for :func:`download_timeout` seconds. Each socket already
    gives up after that long, but a client that retries (Hugging Face's retries its metadata request
    five times, with pauses) would otherwise keep a run waiting for several times the limit behind
    a proxy that never answers; a slow download that keeps arriving is never cut."""
    import threading
    import time

    limit = download_timeout()
    dirs = _hub_dirs()
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    worker = threading.Thread(target=run, name="imgsent-download", daemon=True)
    worker.start()
    seen, since = _bytes_under(dirs), time.monotonic()
    while True:
        worker.join(min(1.0, limit))
        if not worker.is_alive():
            break
        now = _bytes_under(dirs)
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= limit:
            raise TimeoutError(f"nothing arrived for {limit:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _hub_dirs() -> list[str]:
    import torch.hub

    dirs = [torch.hub.get_dir()]
    try:
        from huggingface_hub import constants

        dirs.append(constants.HF_HUB_CACHE)
    except ImportError:
        pass
    return dirs


def _bytes_under(dirs: list[str]) -> int:
    total = 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, f)).st_size
    return total


def describe_failure(exc: BaseException) -> str:
    """A download's exception as one short clause; a timeout says so, and how to change the limit."""
    text = one_line(exc, 160)
    timed_out = isinstance(exc, TimeoutError) or "timed out" in text.lower() or "timeout" in type(exc).__name__.lower()
    if timed_out:
        return (
            f"no answer within {download_timeout():g} s ({type(exc).__name__}); check the network or proxy, or set "
            f"{TIMEOUT_ENV}"
        )
    return f"{type(exc).__name__}: {text}"


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch checkpoint (``weights_only=True``).

    Checkpoints that wrap the state dict (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.
    Raises :class:`ImgsentError` with one line when the file is missing or not a weights file.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ImgsentError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = one_line(exc, 200)
        raise ImgsentError(f"cannot read weights file {path}: {msg}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ImgsentError(f"weights file {path} does not hold a state dict of tensors")
    return obj


def state_dict_sha256(module: nn.Module) -> str:
    """Exact fingerprint of a module's parameters and buffers (sorted names, raw bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach()
        if t.is_quantized:
            t = t.dequantize()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    from .atomicio import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(str(path)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


# --- torchvision's quantized MobileNetV2 -> float MobileNetV2 --------------------------------


def dequantize_mobilenet_v2(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """Turn a quantized (fused conv+bn) torchvision MobileNetV2 into a float ``mobilenet_v2`` state dict.

    Every fused quantized conv at ``P.i`` becomes the float conv ``P.i`` (dequantized weight) and
    the batch-norm ``P.(i+1)`` that was folded into it holds weight=1, bias=the folded bias,
    running_mean=0, running_var=1-eps, so that BN(x) = x + bias exactly.
    """
    import torch.ao.nn.quantized as nnq
    from torchvision.models import mobilenet_v2

    float_model = mobilenet_v2(weights=None)
    target = float_model.state_dict()
    out: dict[str, torch.Tensor] = {}
    bn_modules = dict(float_model.named_modules())
    for name, mod in qmodel.named_modules():
        if isinstance(mod, nnq.Conv2d):
            weight = mod.weight().dequantize().float()
            bias = mod.bias()
            out[f"{name}.weight"] = weight
            parent, _, index = name.rpartition(".")
            bn_name = f"{parent}.{int(index) + 1}"
            bn = bn_modules.get(bn_name)
            if not isinstance(bn, nn.BatchNorm2d):
                raise ValueError(f"no batch-norm after quantized conv {name} in mobilenet_v2")
            channels = weight.shape[0]
            out[f"{bn_name}.weight"] = torch.ones(channels)
            out[f"{bn_name}.bias"] = bias.detach().float() if bias is not None else torch.zeros(channels)
            out[f"{bn_name}.running_mean"] = torch.zeros(channels)
            out[f"{bn_name}.running_var"] = torch.full((channels,), 1.0 - bn.eps)
            out[f"{bn_name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        elif isinstance(mod, nnq.Linear):
            out[f"{name}.weight"] = mod.weight().dequantize().float()
            out[f"{name}.bias"] = mod.bias().detach().float()
    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(f"conversion left {len(missing)} float keys unset, e.g. {missing[:3]}")
    return {k: out[k] for k in target}


def download_quantized_mobilenet_v2() -> dict[str, torch.Tensor]:
    """Download torchvision's official QNNPACK MobileNetV2 (torchvision's weights API) and convert it."""
    from torchvision.models import quantization as tvq

    previous = torch.backends.quantized.engine
    try:
        if "qnnpack" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "qnnpack"
        qmodel = tvq.mobilenet_v2(weights=tvq.MobileNet_V2_QuantizedWeights.IMAGENET1K_QNNPACK_V1, quantize=True)
    finally:
        torch.backends.quantized.engine = previous
    return dequantize_mobilenet_v2(qmodel)


# --- packaged weights (their files: imgsent.shipped.PACKAGED) into a model's own key layout ----------


def _tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def convert_state_dict(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], layout: str):
    """``state`` (in ``layout``) in the keys of ``target`` (a model's own state dict).

    ``lukemelas-efficientnet``: EfficientNet-PyTorch registers the same tensors as timm's
    EfficientNet, in the same order (stem, blocks, head, classifier), under other names; they are
    matched in order, and every pair must have the same shape.
    """
    if layout != "lukemelas-efficientnet":
        raise ValueError(f"unknown weights layout {layout!r}")
    src, dst = _tensors(state), _tensors(target)
    if len(src) != len(dst):
        raise ImgsentError(f"weights layout {layout}: {len(src)} tensors for a model of {len(dst)}")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            raise ImgsentError(f"weights layout {layout}: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def load_torchscript_file(path: str, what: str = "TorchScript file") -> torch.jit.ScriptModule:
    """A TorchScript file on the CPU, or one line saying why not (TorchScript files are code: load
    only files you trust)."""
    if not os.path.isfile(path):
        raise ImgsentError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            return torch.jit.load(path, map_location="cpu")
    except Exception as exc:
        raise ImgsentError(f"cannot load {what} {path}: {one_line(exc, 160)}") from None
