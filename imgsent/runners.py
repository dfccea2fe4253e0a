"""Runners: what runs each backbone's network in an engine, chosen once per backbone.

:func:`prepare` ``(backbone, plan) -> Runner`` asks the runtimes of :data:`RUNTIMES` in turn (each
a module of imgsent with ``NAME``, ``applies_to(plan)``, ``runs_there(backbone)`` and
``runner(backbone, plan) -> Runner | None``: today :mod:`imgsent.onnxrunner`, ONNX Runtime on a
CPU), and torch takes the rest: :class:`TorchRunner` (eager; traced and frozen with the graph cache
of :mod:`imgsent.graphcache`; ``torch.compile``; a user's TorchScript checked on its device; a
detector view as it is, its crop classifier frozen). A new runtime is one more module in that
list: the engine's loop has no branch for any of them.

Every runner runs passes of the plan's ``model_batch`` images, each normalised just before its
pass; a runner with ``fixed_shape`` always gets exactly that many (the last pass padded), so an
image's features never depend on which images share its pass.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import warnings

import torch

from .backbones import Backbone
from .engineplan import EnginePlan
from .errors import ImgsentError, ImgsentWarning, one_line
from .fingerprints import fingerprint_of, fingerprints_match, probe_batch, probe_image, same_outputs
from .graphcache import WARMUP_CALLS, drop_graph, first_output, graph_key, load_graph, save_graph
from .switches import fusion as _fusion
from .switches import tf32, unfused

RUNTIMES = ("onnxrunner",)  # imgsent's runtime modules, asked in this order before torch


class Runner:
    """One backbone's network as an engine runs it: ``module`` on ``device``, and how.

    ``runtime``: what a store's header records (``torch``, ``onnx``). ``fixed_shape``: passes are
    padded to exactly ``plan.model_batch`` images. ``memory_format``: the layout passes are given in.
    :meth:`ready` makes it (once, before the first batch; one runner after another), :meth:`warm`
    checks and warms it (side by side, one lane each), :meth:`embed` runs it."""

    runtime = "torch"

    def __init__(self, backbone: Backbone, plan: EnginePlan, module, device: torch.device):
        self.backbone, self.plan, self.module, self.device = backbone, plan, module, device
        self.fixed_shape = False
        self.memory_format = torch.contiguous_format
        pp = backbone.preprocess
        self._mean = torch.tensor(pp.mean, device=device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(pp.std, device=device).view(1, 3, 1, 1) * 255.0

    def ready(self) -> None:
        """Make what runs (trace, freeze, move, compile); a no-op where that was done at construction."""

    def warm(self) -> None:
        """Check and warm up what :meth:`ready` made, where that may run beside other runners."""

    def context(self):
        """What passes run inside (a runtime's thread-local switches)."""
        return contextlib.nullcontext()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.run(self.module, x)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (n, crops, 3, H, W) -> float32 (n, D), averaged over crops and flips; on this
        runner's device (``pixels`` may already be there)."""
        dev, plan = self.device, self.plan
        n, crops = pixels.shape[:2]
        x = pixels.to(dev, non_blocking=True).flatten(0, 1)  # uint8; normalised pass by pass
        amp = (
            torch.autocast(device_type=dev.type, dtype=plan.amp_dtype)
            if plan.amp_dtype is not None and dev.type == plan.torch_device.type
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), amp, self.context(), tf32(plan.numerics):
            out = self._passes(x)
            if "flip" in plan.tta:
                out = (out + self._passes(torch.flip(x, dims=[3]))) / 2
        return out.view(n, crops, -1).mean(dim=1)

    def _passes(self, x: torch.Tensor) -> torch.Tensor:
        """Forward passes of ``model_batch`` uint8 images, each normalised just before its pass
        (while it is in cache: on CPU this costs as much as an int8 model otherwise)."""
        step, outs = self.plan.model_batch, []
        for s in range(0, len(x), step):
            part = x[s : s + step]
            m = len(part)
            if m < step and self.fixed_shape:
                part = torch.cat([part, part.new_zeros((step - m, *part.shape[1:]))])
            part = part.contiguous(memory_format=self.memory_format).float().sub_(self._mean).div_(self._std)
            outs.append(self(part)[:m].float())
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class TorchRunner(Runner):
    """A backbone on torch, in the engine's own copy of its module (the caller's is never changed):
    on a CPU traced and frozen for fixed passes (oneDNN-fused; or a cached graph), ``torch.compile``
    where asked, eager otherwise; padded to fixed passes on CUDA, where cuDNN picks kernels by batch
    size (on an H200 an image in a 44-image pass came out up to 3.3e-5 off the same image in a
    64-image pass)."""

    def __init__(self, backbone: Backbone, plan: EnginePlan):
        super().__init__(backbone, plan, backbone.module, device_for(backbone, plan))
        self.memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format

    def ready(self) -> None:
        bb, dev, plan = self.backbone, self.device, self.plan
        module = bb.module
        if bb.is_view:  # detectors: as they are, on their device
            self.module = _prepare_view(module, dev, plan)
            return
        if bb.frozen_batch is not None:  # a cached frozen CPU graph (models.model_backbones)
            if not plan.runs_frozen(bb.frozen_batch, dev):
                raise ImgsentError(
                    f"{bb.key} comes as a CPU graph frozen for passes of {bb.frozen_batch} images; this "
                    f"engine runs {plan.model_batch} on {dev}{' compiled' if plan.compile else ''}"
                )
            self.module, self.fixed_shape = module, True
            return
        scripted = isinstance(module, torch.jit.ScriptModule)
        if dev != _device_of(module) or (plan.channels_last and not scripted):
            module = copy.deepcopy(module).to(dev)  # the caller's module stays as it was
            if plan.channels_last and not scripted:
                module = module.to(memory_format=torch.channels_last)
        if scripted and dev.type != "cpu":
            module = check_on_device(bb, module.to(dev), dev, plan.channels_last)
        if plan.compile and not scripted:
            module, self.fixed_shape = torch.compile(module, dynamic=False), True
        elif not scripted and plan.traces(dev):
            module, self.fixed_shape = freeze(bb, module, dev, plan.channels_last, plan.model_batch)
        if dev.type == "cuda":
            self.fixed_shape = True
        self.module = module

    def warm(self) -> None:
        bb = self.backbone
        if bb.frozen_batch is not None:
            warm_frozen(bb, self.module, bb.frozen_batch, self.plan.channels_last)

    def context(self):
        """On a CPU: oneDNN fusion for the graphs this runner froze; every other module (detectors,
        a user's TorchScript) runs unoptimised, out of reach of that process-wide switch, which
        another lane may hold on meanwhile (:func:`~imgsent.switches.unfused`)."""
        if self.device.type != "cpu":
            return contextlib.nullcontext()
        return _fusion(True) if self.fixed_shape else unfused()


def device_for(bb: Backbone, plan: EnginePlan) -> torch.device:
    """Where torch runs ``bb`` under ``plan``: the plan's device, except a quantized module (torch's
    quantized kernels exist for CPUs only) and a cached frozen CPU graph, which run on the CPU."""
    return torch.device("cpu") if bb.quantized or bb.frozen_batch is not None else plan.torch_device


def prepare(backbone: Backbone, plan: EnginePlan) -> Runner:
    """The runner of ``backbone`` under ``plan``: the first runtime of :data:`RUNTIMES` that applies
    and takes it, else torch. A runtime asked for by name (``--runtime onnx``) that cannot take a
    backbone it should stops the run with its one line; under ``auto`` that backbone runs on torch,
    with a warning saying why."""
    for module in map(_runtime, RUNTIMES):
        if not module.applies_to(plan) or not module.runs_there(backbone):
            continue
        try:
            runner = module.runner(backbone, plan)
        except ImgsentError as exc:
            if plan.runtime == module.NAME:
                raise
            warnings.warn(f"{exc}; it runs on torch", ImgsentWarning, stacklevel=3)
            continue
        if runner is not None:  # None: a detector view with no part that runs there
            return runner
    return TorchRunner(backbone, plan)


def prepare_on(backbone: Backbone, plan: EnginePlan, runtime: str) -> Runner:
    """The runner of ``backbone`` on the runtime a store's header names (to resume it as begun)."""
    if runtime == TorchRunner.runtime:
        return TorchRunner(backbone, plan)
    module = next((m for m in map(_runtime, RUNTIMES) if m.NAME == runtime), None)
    runner = module.runner(backbone, plan) if module is not None else None
    if runner is None:
        raise ImgsentError(f"{backbone.key}: this store ran it on {runtime}, which it cannot use here")
    return runner


def _runtime(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def _device_of(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _prepare_view(module: torch.nn.Module, dev: torch.device, plan: EnginePlan) -> torch.nn.Module:
    """A detector view runs as it is, except the classifier a regions view runs on its crops
    (``inner``, ``inner_backbone``): on CPU traced and frozen for its fixed crop batch."""
    if dev != _device_of(module):
        module = copy.deepcopy(module).to(dev)  # the caller's module stays as it was
    inner = getattr(module, "inner_backbone", None)
    if inner is None or plan.compile or not plan.traces(dev):
        return module
    fmt = torch.channels_last if plan.channels_last else torch.contiguous_format
    own = copy.deepcopy(module.inner).to(memory_format=fmt)
    frozen, ok = freeze(inner, own, dev, plan.channels_last, module.crop_batch)
    if not ok:
        return module
    return module.with_inner(frozen, fmt, functools.partial(_fusion, dev.type == "cpu"))


def freeze(bb: Backbone, module: torch.nn.Module, dev: torch.device, channels_last: bool, batch: int):
    """Trace and freeze ``module`` for batches of exactly ``batch`` images (folds batch-norm; on CPU
    oneDNN fuses the graph on the first calls, done here), or on a CPU load the graph a previous run
    cached (:mod:`imgsent.graphcache`). Returns (module, frozen): eager when tracing fails or the frozen
    module disagrees with eager on the probe image (a cached graph that does is removed, and traced anew)."""
    x = probe_batch(bb.preprocess, batch, channels_last, dev)
    key = graph_key(bb.recipe(), batch, channels_last) if dev.type == "cpu" else None
    for use_cache in (True, False):
        frozen = load_graph(key) if use_cache else None
        if use_cache and frozen is None:
            continue
        try:
            with torch.inference_mode(), warnings.catch_warnings(), _fusion(dev.type == "cpu"):
                warnings.simplefilter("ignore")
                eager = first_output(module(x[:2]))  # the probe and its mirror: all the check needs
                if frozen is None:
                    frozen = torch.jit.freeze(torch.jit.trace(module, x, check_trace=False))
                for _ in range(WARMUP_CALLS):  # the profiling executor optimises (and fuses) after these
                    got = frozen(x)
                got = first_output(got)[:2]
        except Exception:
            got = eager = None
        if got is not None and same_outputs(got, eager):
            if not use_cache:
                save_graph(key, frozen)
            return frozen, True
        if use_cache:
            drop_graph(key)
    return module, False


def warm_frozen(bb: Backbone, module: torch.jit.ScriptModule, batch: int, channels_last: bool) -> None:
    """A backbone whose module is a cached frozen graph (``bb.frozen_batch``): check it against the
    probe features its recipe recorded, and run the warm-up calls a freshly frozen graph gets."""
    x = probe_batch(bb.preprocess, batch, channels_last)
    with torch.inference_mode(), _fusion(True):
        for _ in range(WARMUP_CALLS):
            got = bb.run(module, x).float()[0]
    if not fingerprints_match(bb.fingerprint, fingerprint_of(got)):
        drop_graph(graph_key(bb.recipe(), batch, channels_last))
        raise ImgsentError(
            f"the compiled graph cached for {bb.key} does not give its recipe's features; it was removed: run the "
            f"command again"
        )


def check_on_device(bb: Backbone, module: torch.nn.Module, dev: torch.device, channels_last: bool):
    """A TorchScript backbone moved to ``dev``: it must run there, and give the features its CPU
    fingerprint recorded (within GPU rounding); else one clear error before any batch runs."""
    if channels_last:
        try:
            module = module.to(memory_format=torch.channels_last)
        except (RuntimeError, TypeError):
            pass  # a module that keeps its own layout
    x = probe_image(bb.preprocess).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            got = bb.run(module, x).float()[0].cpu()
    except Exception as exc:
        reason = one_line(exc, 160)
        raise ImgsentError(f"backbone {bb.key} cannot run on {dev} ({reason}); use device cpu for it") from None
    if not fingerprints_match(bb.fingerprint, fingerprint_of(got), kind="device"):
        raise ImgsentError(f"backbone {bb.key} gives other features on {dev} than on the CPU; use device cpu for it")
    return module
