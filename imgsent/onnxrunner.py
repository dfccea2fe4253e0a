"""ONNX Runtime: a runner for backbones on the CPU.

A backbone whose network exports to ONNX (timm, torchvision and shipped networks in float32; not
a user's TorchScript or int8 modules; of a detector view, its exportable parts: :func:`prepare_view`)
can run on ONNX Runtime instead of torch: ``--runtime onnx``, or ``auto`` (the default) on a CPU.
Measured on 2 cores (``bench/runtime_bench.py``): the default model scores 1,000 Twitter I images
1.31x as fast as on imgsent's frozen TorchScript graphs, probabilities within 2.4e-6.

The graph is exported once from the torch network for passes of exactly ``batch`` images (the
engine's pass size; the last pass is padded, so an image's features never depend on the others)
and cached in ``$IMGSENT_HOME/onnx/``, keyed as imgsent's frozen graphs are (backbone key, weights
hash, preprocessing, pass size, torch, onnxruntime and imgsent versions). Every session is checked
on the fingerprint's probe images before use: when exported, against the torch network's
features (cosine >= 0.9999 and max difference <= 1e-4 of the largest value, else refused); when
loaded from the cache, against the probe features the recipe recorded (a file that fails is
removed and exported again). One session serves every lane: each call runs on its caller's
thread, one intra-op thread, like the engine's torch lanes.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np
import torch

from . import __version__
from .errors import ImgsentError, one_line
from .options import RUNTIMES  # noqa: F401  (auto, torch, onnx)
from .ortengine import session as _session
from .runners import Runner
from .weights import cache_dir

NAME = "onnx"  # this runtime's name in --runtime and in store headers (imgsent.runners.RUNTIMES)

OPSET = 17
COSINE_MIN = 0.9999
MAX_DIFF = 1e-4  # of the largest absolute feature value
GRAPH = 2  # what a backbone's graph holds (2: its network's output, flattened; 1 had ``:probs``'s softmax inside)


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def not_exportable(bb) -> str | None:
    """Why ``bb`` (a :class:`~imgsent.backbones.Backbone`) cannot run on ONNX Runtime as a whole,
    or None. Detector views run their exportable parts there instead (:func:`prepare_view`)."""
    if bb.is_view:
        return "a detector view (per-image loops, variable outputs)"
    if bb.spec.source == "torchscript":
        return "a TorchScript file (exported as it was given)"
    if bb.int8:
        return "int8"
    if not bb.batchable:
        return "traced for one image at a time"
    if not bb.fingerprint.get("sha256"):
        return "no weights hash to key its graph by"
    return None


def runs_there(bb) -> bool:
    """Whether ``bb`` runs on ONNX Runtime (all of it, or a detector view's exportable parts)
    under ``--runtime auto`` on a CPU: decided from what it is, without exporting anything."""
    if bb.int8:
        return False
    if not bb.is_view:
        return not_exportable(bb) is None
    view = bb.module
    inner = getattr(view, "inner_backbone", None)
    return hasattr(view.detector.module, "exportable") or (inner is not None and not_exportable(inner) is None)


def applies(runtime: str, on_cpu: bool, compiled: bool, numerics: str) -> bool:
    """Whether a run with ``--runtime runtime`` puts anything on ONNX Runtime (the same rule for the
    local engine and Ray): not ``torch``, on a CPU, float32, without ``--compile``, with onnxruntime
    installed. ``onnx`` where that cannot hold is a one-line error."""
    if runtime == "torch":
        return False
    if runtime == "onnx" and (not on_cpu or compiled or numerics != "fp32"):
        raise ImgsentError(
            "--runtime onnx runs float32 networks on the CPU: use it with --device cpu (no --gpus-per-worker) "
            "and without --compile or another --precision (or --runtime auto)"
        )
    if not on_cpu or compiled or numerics != "fp32":
        return False
    if not available():
        if runtime == "onnx":
            raise ImgsentError("--runtime onnx needs the onnxruntime package: pip install onnxruntime")
        return False
    return True


def applies_to(plan) -> bool:
    """Whether an engine with ``plan`` (:class:`~imgsent.engineplan.EnginePlan`) runs anything on
    ONNX Runtime: :func:`applies`, and not with ``optimize="none"`` (eager torch asked for)."""
    on_cpu = plan.torch_device.type == "cpu"
    return applies(plan.runtime, on_cpu, plan.compile, plan.numerics) and plan.optimize != "none"


class OnnxRunner(Runner):
    """A backbone on ONNX Runtime in an engine (:mod:`imgsent.runners`): its network's graph
    (:func:`prepare`), or a detector view whose exportable parts run there (:func:`prepare_view`;
    the view loops over its images itself, so its passes are not padded). Made, exported and
    checked at construction, so that an engine knows each backbone's runtime before it runs."""

    runtime = NAME

    def __init__(self, bb, plan, module: torch.nn.Module):
        super().__init__(bb, plan, module, torch.device("cpu"))
        self.fixed_shape = not bb.is_view  # NCHW passes: ONNX Runtime takes contiguous arrays


def runner(bb, plan) -> OnnxRunner | None:
    """The engine runner of ``bb`` on ONNX Runtime for ``plan``'s passes; None for a detector view
    none of whose parts exports. Raises :class:`ImgsentError` with one line when it cannot be made."""
    module = runner_for(bb, plan.model_batch)
    return None if module is None else OnnxRunner(bb, plan, module)


def runner_for(bb, batch: int) -> torch.nn.Module | None:
    """What runs ``bb`` on ONNX Runtime: its network (:func:`prepare`, passes of ``batch``), or a
    detector view's copy with its exportable parts there (:func:`prepare_view`; None if none)."""
    if bb.is_view:
        return prepare_view(bb.module)
    return prepare(bb, batch)


def onnx_key(recipe: dict, batch: int) -> str:
    import onnxruntime

    what = {
        "key": recipe["key"],
        "dim": recipe.get("dim"),
        "weights": recipe.get("fingerprint", {}).get("sha256"),
        "preprocess": recipe.get("preprocess"),
        "batch": batch,
        "opset": OPSET,
        "graph": GRAPH,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "imgsent": __version__,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def onnx_path(key: str) -> str:
    return os.path.join(cache_dir(), "onnx", f"{key}.onnx")


class OrtRunner(torch.nn.Module):
    """A backbone's network on ONNX Runtime: a normalised float32 (batch, 3, H, W) torch tensor in,
    the backbone's output (pooled features, or probabilities) out, as a torch tensor (a tuple of
    them for a network of several outputs). A module, so that it stands where a torch network
    stood (a regions view's crop classifier); it has no parameters and stays on the CPU."""

    def __init__(self, session, batch: int, path: str):
        super().__init__()
        self.session = session
        self.batch = batch
        self.path = path
        self._input = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor):
        outs = self.session.run(None, {self._input: np.ascontiguousarray(x.detach().cpu().float().numpy())})
        return torch.from_numpy(outs[0]) if len(outs) == 1 else tuple(torch.from_numpy(o) for o in outs)

    def numpy(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: np.ascontiguousarray(x, dtype=np.float32)})[0]


class _Output(torch.nn.Module):
    """A backbone's network as one graph: its module's (first) output, flattened. What
    ``Backbone.run`` does after that (a ``:probs`` softmax) stays outside the graph, so that
    ``bb.run(runner, x)`` computes what ``bb.run(module, x)`` does, once."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1)


def _export(bb, module: torch.nn.Module, batch: int, path: str) -> None:
    from .fingerprints import probe_batch

    _export_module(_Output(module), probe_batch(bb.preprocess, batch, channels_last=False), path)


def _agrees(got: np.ndarray, want: np.ndarray) -> tuple[bool, str]:
    got, want = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    scale = max(float(np.abs(want).max()), 1e-6)
    diff = float(np.abs(got - want).max())
    denom = float(np.linalg.norm(got) * np.linalg.norm(want))
    cosine = float(got @ want / denom) if denom > 0 else float(diff == 0)
    ok = cosine >= COSINE_MIN and diff <= MAX_DIFF * scale
    return ok, f"cosine {cosine:.6f}, max difference {diff:.2e} (largest value {scale:.3g})"


def _eager_module(bb) -> torch.nn.Module:
    """The torch network of ``bb``: its own module, or (a cached frozen graph, which does not
    export) the network built again from its recipe, checked to be the same weights."""
    if bb.frozen_batch is None:
        return bb.module
    from .backbones import create_backbone

    again = create_backbone(bb.recipe()["spec"], random_weights=bool(bb.fingerprint.get("random")))
    if again.fingerprint.get("sha256") != bb.fingerprint.get("sha256"):
        raise ImgsentError(f"{bb.key}: the network built again for ONNX export has other weights than its recipe")
    return again.module


def prepare(bb, batch: int) -> OrtRunner:
    """An ONNX Runtime runner of ``bb`` for passes of exactly ``batch`` images (see the module
    docstring); raises :class:`ImgsentError` with one line when it cannot be made or checked."""
    from .fingerprints import fingerprint_of, fingerprints_match, probe_batch

    reason = not_exportable(bb)
    if reason:
        raise ImgsentError(f"{bb.key} cannot run on ONNX Runtime: {reason}")
    recipe = bb.recipe()
    path = onnx_path(onnx_key(recipe, batch))
    x = probe_batch(bb.preprocess, batch, channels_last=False)
    if os.path.isfile(path):
        try:
            runner = OrtRunner(_session(path), batch, path)
            got = bb.run(runner, x).float()[0]
            if fingerprints_match(bb.fingerprint, fingerprint_of(got), kind="export"):
                return runner
        except Exception:
            pass
        try:
            os.remove(path)  # unreadable, or not what the recipe recorded: export again
        except OSError:
            pass
    module = _eager_module(bb)
    try:
        _export(bb, module, batch, path)
        runner = OrtRunner(_session(path), batch, path)
        with torch.inference_mode():
            want = bb.run(module, x).float().numpy()
        got = bb.run(runner, x).numpy()
    except ImgsentError:
        raise
    except Exception as exc:
        _drop(path)
        raise ImgsentError(f"{bb.key} does not export to ONNX Runtime: {one_line(exc, 160)}") from None
    ok, how = _agrees(got, want)
    if not ok:
        _drop(path)
        raise ImgsentError(f"{bb.key} on ONNX Runtime differs from torch on the probe images: {how}")
    return runner


def prepare_network(module: torch.nn.Module, example: torch.Tensor, identity: str) -> OrtRunner:
    """A runner of a network that is no backbone (a detector's ``raw`` part: see
    :meth:`imgsent.faces.RFBFaceDetector.exportable`) for inputs shaped as ``example``, cached by
    ``identity`` (its weights hash) and checked against torch on ``example``-shaped probe noise
    whenever it is made or loaded (one pass: these networks are small)."""
    import onnxruntime

    what = {
        "identity": identity,
        "shape": list(example.shape),
        "opset": OPSET,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "imgsent": __version__,
    }
    path = onnx_path(hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(example.shape, generator=g) * 2 - 1
    with torch.inference_mode():
        want = torch.cat([t.flatten() for t in module(x)]).numpy()
    for attempt in ("cache", "export"):
        if attempt == "cache" and not os.path.isfile(path):
            continue
        try:
            if attempt == "export":
                _export_module(module, example, path)
            runner = OrtRunner(_session(path), int(example.shape[0]), path)
            got = torch.cat([t.flatten() for t in runner(x)]).numpy()
        except Exception as exc:
            _drop(path)
            if attempt == "export":
                raise ImgsentError(f"{identity} does not export to ONNX Runtime: {one_line(exc, 160)}") from None
            continue
        ok, how = _agrees(got, want)
        if ok:
            return runner
        _drop(path)
        if attempt == "export":
            raise ImgsentError(f"{identity} on ONNX Runtime differs from torch: {how}")
    raise AssertionError("unreachable")


def prepare_view(view: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of a detector view (:mod:`imgsent.objects`) whose exportable parts run on ONNX
    Runtime: a detector that offers its network (``exportable()``), and a regions view's crop
    classifier when it exports; None when neither does. The caller's view is not changed."""
    import copy
    import dataclasses

    changed = False
    out = copy.copy(view)
    out._modules = dict(view._modules)
    det = view.detector
    offer = getattr(det.module, "exportable", None)
    if offer is not None:
        network, example = offer()
        runner = prepare_network(network, example, f"{det.identity} raw")
        mod = copy.copy(det.module)
        mod._modules = dict(det.module._modules)
        mod.network = runner
        new_det = copy.copy(det)
        new_det._modules = {**det._modules, "module": mod}
        new_det.identity = f"{det.identity}+onnx"  # its detections are not torch's, to the last bit
        out._modules["detector"] = new_det
        changed = True
    inner = getattr(view, "inner_backbone", None)
    if inner is not None and not_exportable(inner) is None:
        runner = prepare(dataclasses.replace(inner, module=view.inner), view.crop_batch)
        out = out.with_inner(runner, torch.contiguous_format)
        changed = True
    return out if changed else None


def _export_module(module: torch.nn.Module, example: torch.Tensor, path: str) -> None:
    from .atomicio import atomic_path

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), tmp, input_names=["x"], opset_version=OPSET, dynamo=False)


def _drop(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def version() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def plan_entries(runners: list[Runner]) -> list[dict] | None:
    """What :mod:`imgsent.ortengine` needs to run an engine's backbones (its ``runners``) without
    torch, or None when one of them needs torch: a network not on ONNX Runtime, a detector other
    than the shipped face detectors, or a detector view with a part left on torch."""
    from .faces import RFBFaceDetector

    entries = []
    for r in runners:
        bb, module = r.backbone, r.module
        if r.runtime != NAME:
            return None
        entry = {
            "key": bb.key,
            "dim": int(bb.dim),
            "preprocess": bb.preprocess.to_dict(),
            "weights_source": bb.weights_source,
        }
        if not bb.is_view:
            if not isinstance(module, OrtRunner):
                return None
            output = "probs" if bb.spec.output == "probs" else "features"
            entries.append({**entry, "kind": "network", "output": output, "graph": _graph(module)})
            continue
        det, net = module.detector, module.detector.module
        if not isinstance(net, RFBFaceDetector) or not isinstance(net.network, OrtRunner):
            return None
        detector = {
            "graph": _graph(net.network),
            "size": det.size,
            "width": net.width,
            "height": net.height,
            "threshold": net.threshold,
            "iou": net.iou,
            "top": net.top,
        }
        if bb.spec.source == "objects":
            entries.append({**entry, "kind": "objects", "classes": module.classes, "detector": detector})
            continue
        if not isinstance(module.inner, OrtRunner):
            return None
        inner_output = "probs" if module.inner_backbone.spec.output == "probs" else "features"
        entries.append(
            {
                **entry,
                "kind": "regions",
                "detector": detector,
                "k": module.k,
                "min": module.min_score,
                "crop_size": list(module.crop_size),
                "mode": module.mode,
                "mean": module.mean.flatten().tolist(),
                "std": module.std.flatten().tolist(),
                "inner": {"graph": _graph(module.inner), "output": inner_output},
            }
        )
    return entries


def _graph(runner: OrtRunner) -> dict:
    return {"file": os.path.abspath(runner.path), "batch": runner.batch}
