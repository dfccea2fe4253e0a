"""int8 backbones (``--precision int8``, CPU): torchvision's official quantized checkpoints, run
natively with the fastest quantized engine this CPU has (``x86``, else ``fbgemm``, else ``qnnpack``).

Which weights: the tag's own entry when it is a quantized one (``mobilenet_v2.IMAGENET1K_QNNPACK_V1``),
else the quantized entry made from the tag's float weights (``resnet50.IMAGENET1K_V2`` ->
``IMAGENET1K_FBGEMM_V2``). They come from ``@FILE`` (torchvision's quantized state dict, or, for
MobileNetV2, a traced int8 TorchScript of the same network such as ``mobilenet_v2_quantized_torchscript.pt``),
else from torchvision's download. Their activation ranges were calibrated by torchvision when it
published them: nothing here depends on which images a run sees.

Other convolutional networks (timm, torchvision without official int8 weights) get post-training
static quantization (:func:`post_training_int8`: torch.ao FX, the engine's default qconfig), calibrated
on :data:`CALIBRATION`: seeded synthetic images with natural-image statistics, generated in float64
and rounded to uint8, so the calibration is the same on every machine and every run and never
depends on the images being processed. Transformers (more Linear than convolution weights),
TorchScript files and models FX cannot trace stay float32, with a one-line warning.

Features are the input of the last quantized Linear, dequantized (as the float path takes the input
of the last ``nn.Linear``); ``:probs`` the softmax of the dequantized logits.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import nn

from .errors import ImgsentError, one_line

ENGINES = ("x86", "fbgemm", "qnnpack")  # fastest first


def engine_name() -> str:
    """The quantized engine int8 backbones use here."""
    for name in ENGINES:
        if name in torch.backends.quantized.supported_engines:
            return name
    raise ImgsentError("this PyTorch build has no quantized CPU engine (x86, fbgemm or qnnpack): int8 is unavailable")


@contextlib.contextmanager
def quantized_engine():
    """The int8 engine, for as long as modules are built and their weights packed (the packed
    weights keep their engine's kernels afterwards); the previous setting is restored. torch.ao's
    notices (eager quantization is deprecated in favour of torchao; observers on random weights)
    are not shown: imgsent only reads torchvision's published int8 models with it."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine_name()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"torch\.ao\..*")
            warnings.filterwarnings("ignore", module=r"torchvision\.models\.quantization\..*")
            warnings.filterwarnings("ignore", message=r".*(quantiz|migrat|torchao).*")
            yield
    finally:
        torch.backends.quantized.engine = previous


def int8_entry(name: str, tag: str | None, float_file: bool = False):
    """torchvision's official quantized weights entry for ``name`` with weights ``tag``, or None:
    the tag itself when it names a quantized entry; else (a float tag, or none: DEFAULT) the
    quantized entry made from that float entry, unless ``float_file`` (local float weights, which
    get post-training int8 instead)."""
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(f"quantized_{name}")
    except Exception:
        return None
    tag = tag or "DEFAULT"
    if tag != "DEFAULT" and tag in enum.__members__:
        return enum[tag]
    if float_file:
        return None
    try:
        float_entry = tvm.get_model_weights(name)[tag]
    except KeyError:
        return None
    return next((e for e in enum if e.meta.get("unquantized") == float_entry), None)


CALIBRATION = {
    "method": "post-training static (torch.ao FX, default qconfig of the engine)",
    "images": 64,
    "seed": 0,
    "kind": "synthetic, 1/f amplitude spectrum, correlated colours, uint8",
}


def calibration_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded uint8 (3, H, W) images with natural-image statistics: a 1/f amplitude spectrum,
    random phases, correlated colour channels, varied contrast and mean (float64, then rounded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    amplitude = 1.0 / np.maximum(np.sqrt(fx**2 + fy**2), 1.0 / max(height, width))
    out = np.empty((n, 3, height, width), dtype=np.uint8)
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi, size=(3, height, width // 2 + 1))
        img = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(height, width))
        img = np.einsum("ij,jhw->ihw", rng.uniform(0, 0.5, size=(3, 3)) + np.eye(3), img)
        img = (img - img.mean()) / img.std() * rng.uniform(0.18, 0.28) + rng.uniform(0.35, 0.65, size=(3, 1, 1))
        out[i] = np.rint(np.clip(img, 0, 1) * 255)
    return torch.from_numpy(out)


def not_quantizable(module: nn.Module) -> str | None:
    """Why static int8 does not suit ``module`` (None when it does)."""
    if isinstance(module, torch.jit.ScriptModule):
        return "a TorchScript file cannot be re-quantized"
    conv = sum(p.numel() for m in module.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())
    linear = sum(p.numel() for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    if conv == 0 or linear > conv:
        return "not a convolutional network (a transformer's attention and norms do not quantize statically)"
    return None


def post_training_int8(
    module: nn.Module, mean, std, input_size: tuple[int, int], images: torch.Tensor | None = None
) -> nn.Module:
    """``module`` (float, eval) quantized with torch.ao FX and calibrated on :data:`CALIBRATION`
    (or on ``images``, uint8 (N, 3, H, W), for experiments); raises ImgsentError when FX cannot
    trace it."""
    import copy

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if images is None:
        images = calibration_images(CALIBRATION["images"], *input_size, seed=CALIBRATION["seed"])
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    module = static_same_padding(copy.deepcopy(module).eval(), x[:1])
    with quantized_engine():
        try:
            prepared = prepare_fx(module, get_default_qconfig_mapping(engine_name()), (x[:2],))
        except Exception as exc:
            raise ImgsentError(f"FX cannot trace it ({type(exc).__name__})") from None
        with torch.inference_mode():
            for s in range(0, len(x), 16):
                prepared(x[s : s + 16])
        return convert_fx(prepared).eval()


def static_same_padding(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """``module`` with each TensorFlow-style "same" convolution (timm's ``Conv2dSame``, as in the
    ``tf_`` EfficientNets and EfficientNet-Lite: padding computed from the input's shape at every
    call, which FX cannot trace) replaced by a fixed ``ZeroPad2d`` + ``Conv2d`` for the input size
    of ``x``: the same numbers at that size. Modules without them are returned as they are."""
    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.padding import get_same_padding
    except ImportError:
        return module
    same = {name: m for name, m in module.named_modules() if isinstance(m, Conv2dSame)}
    if not same:
        return module
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(_module, args):  # returns None: the call's arguments stay as they are
            sizes.setdefault(name, tuple(args[0].shape[-2:]))

        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in same.items()]
    try:
        with torch.inference_mode():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    for name, m in same.items():
        (ih, iw), (kh, kw) = sizes[name], m.weight.shape[-2:]
        ph = get_same_padding(ih, kh, m.stride[0], m.dilation[0])
        pw = get_same_padding(iw, kw, m.stride[1], m.dilation[1])
        conv = nn.Conv2d(
            m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups, m.bias is not None
        )
        conv.load_state_dict(m.state_dict())
        fixed = nn.Sequential(nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), conv)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, fixed)
    return module


def _repack(model: nn.Module) -> nn.Module:
    """Pack every quantized weight again under the current engine (torchvision packs them for
    the backend they were calibrated for, whose kernels may be slow on this CPU)."""
    for mod in model.modules():
        if hasattr(mod, "set_weight_bias") and callable(getattr(mod, "weight", None)):
            mod.set_weight_bias(mod.weight(), mod.bias())
    return model


def _torchvision_int8(name: str, entry=None) -> nn.Module:
    """torchvision's ``quantized_NAME`` with the weights ``entry`` (downloaded), or random weights
    (seeded by the caller) when ``entry`` is None."""
    import torchvision.models as tvm

    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    previous = torch.backends.quantized.engine
    try:
        return tvm.get_model(f"quantized_{name}", weights=entry, quantize=True, **kwargs)
    except Exception as exc:
        if entry is None:
            raise
        reason = one_line(exc, 160)
        raise ImgsentError(
            f"cannot get torchvision's int8 weights {entry} ({type(exc).__name__}: {reason}); offline, give "
            f"torchvision:{name}@FILE with its quantized state dict"
        ) from None
    finally:
        torch.backends.quantized.engine = previous  # torchvision sets its backend globally


def _load_file(model: nn.Module, name: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ImgsentError(f"int8 weights not found: {path}")
    try:
        scripted = torch.jit.load(path, map_location="cpu")
    except Exception:
        scripted = None
    if scripted is not None:
        if name != "mobilenet_v2":
            raise ImgsentError(f"{path}: int8 TorchScript files are read for mobilenet_v2 only; give a state dict")
        _from_traced_mobilenet_v2(model, scripted)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except Exception as exc:
        raise ImgsentError(
            f"cannot read {path} as int8 weights of {name} ({one_line(exc, 160)}); give torchvision's "
            f"quantized state dict (quantized_{name})"
        ) from None


def _from_traced_mobilenet_v2(model: nn.Module, traced: torch.jit.ScriptModule) -> None:
    """Copy a traced int8 MobileNetV2 (torchvision's quantized one, traced and frozen) into ``model``:
    packed weights by their module names, activation scales and zero points from the graph."""
    prefix = "_jit_pass_hoist_conv_packed_params."
    adds = [block.skip_add for block in model.features if getattr(block, "use_res_connect", False)]
    done = {"quant": 0, "conv": 0, "add": 0, "linear": 0}
    for node in traced.graph.nodes():
        kind, ins = node.kind(), list(node.inputs())
        if kind == "aten::quantize_per_tensor":
            model.quant.scale = torch.tensor([float(ins[1].toIValue())])
            model.quant.zero_point = torch.tensor([int(ins[2].toIValue())])
            done["quant"] += 1
        elif kind in ("quantized::conv2d", "quantized::conv2d_relu"):
            attr = ins[1].node().s("name")
            module = model.get_submodule(attr[len(prefix) :].rsplit("._packed_params", 1)[0])
            module.set_weight_bias(*torch.ops.quantized.conv2d_unpack(getattr(traced, attr)))
            module.scale, module.zero_point = float(ins[2].toIValue()), int(ins[3].toIValue())
            done["conv"] += 1
        elif kind == "quantized::add":
            if done["add"] >= len(adds):
                raise ImgsentError("the TorchScript file is not torchvision's quantized mobilenet_v2 (extra adds)")
            adds[done["add"]].scale, adds[done["add"]].zero_point = float(ins[2].toIValue()), int(ins[3].toIValue())
            done["add"] += 1
        elif kind == "quantized::linear":
            linear = model.classifier[1]
            packed = traced.classifier._modules["1"]._packed_params._packed_params
            linear.set_weight_bias(*torch.ops.quantized.linear_unpack(packed))
            linear.scale, linear.zero_point = float(ins[2].toIValue()), int(ins[3].toIValue())
            done["linear"] += 1
    import torch.ao.nn.quantized as nnq

    convs = sum(1 for m in model.modules() if isinstance(m, nnq.Conv2d))
    if done != {"quant": 1, "conv": convs, "add": len(adds), "linear": 1}:
        raise ImgsentError(f"the TorchScript file is not torchvision's quantized mobilenet_v2 (found {done})")


def _drop_last_linear(model: nn.Module) -> None:
    """Features: the last quantized Linear becomes an identity (its input comes out, dequantized)."""
    import torch.ao.nn.quantized as nnq

    last = [n for n, m in model.named_modules() if isinstance(m, nnq.Linear)]
    if not last:
        raise ImgsentError("this quantized model has no final Linear to take pooled features before")
    parent_name, _, child = last[-1].rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())


def load_int8(name: str, entry, weights: str | None, random_weights: bool, output: str) -> tuple[nn.Module, str]:
    """(int8 module in eval mode, weights source) for torchvision's ``name`` with quantized ``entry``."""
    with quantized_engine():
        if random_weights or weights:
            model = _torchvision_int8(name)
            if weights:
                _load_file(model, name, weights)
            source = weights or "random (seeded)"
        else:
            model = _torchvision_int8(name, entry)
            source = f"torchvision {entry} (torch hub cache)"
        _repack(model)
        if output == "features":
            _drop_last_linear(model)
    return model.eval(), source
