"""The torch switches a run sets around its passes, in one place: oneDNN graph fusion (a
process-wide switch, counted across lanes), ``unfused`` (TorchScript imgsent did not freeze, run
with its thread's graph optimisation off) and TF32 (only when the numerics say tf32)."""

from __future__ import annotations

import contextlib
import threading

import torch

_fusion_lock = threading.Lock()
_fusion_users = [0, False]  # lanes inside _fusion(True), the setting before the first entered


@contextlib.contextmanager
def fusion(on: bool):
    """oneDNN graph fusion for TorchScript on CPU (conv + bias + activation, ... in one kernel;
    1.3-1.5x on MobileNetV2 / EfficientNet here), on only while imgsent's own frozen modules run
    (counted, so that lanes running at once do not switch it off under each other), with this
    thread's graph optimisation on (see :func:`unfused`)."""
    if not on:
        yield
        return
    with torch.jit.optimized_execution(True), _counted_fusion():
        yield


@contextlib.contextmanager
def unfused():
    """Run TorchScript that imgsent did not freeze itself (exported detectors, a user's TorchScript
    backbone) with this thread's graph optimisation off. oneDNN fusion is a process-wide switch,
    on while another lane runs a frozen graph; a graph that the profiling executor optimises then
    gets fused kernels it was never checked with: D2Go's detector and the face detector then fail
    on every call ("Cannot input a tensor of dimension other than 0 as a scalar argument").
    Graph-executor optimisation is per thread, so switching it off here keeps such graphs out of
    reach of the switch; measured here it costs them nothing (D2Go 27-29 ms per image, int8
    MobileNetV2 8.4-9.3 ms, optimised or not; outputs identical)."""
    with torch.jit.optimized_execution(False):
        yield


@contextlib.contextmanager
def _counted_fusion():
    with _fusion_lock:
        if _fusion_users[0] == 0:
            _fusion_users[1] = torch.jit.onednn_fusion_enabled()
            torch.jit.enable_onednn_fusion(True)
        _fusion_users[0] += 1
    try:
        yield
    finally:
        with _fusion_lock:
            _fusion_users[0] -= 1
            if _fusion_users[0] == 0:
                torch.jit.enable_onednn_fusion(_fusion_users[1])


@contextlib.contextmanager
def tf32(numerics: str):
    """TF32 tensor cores for CUDA matmuls and convolutions only when the run's numerics say tf32
    (cuDNN allows them by default, which would make "fp32" features something else); restored."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = numerics == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
