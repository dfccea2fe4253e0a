"""int8 on the CPU: imgsent's torch.ao path (deprecated in torch 2.14) against its successor, PT2E in torchao.

    pip install torchao   # not an imgsent dependency: this check decides whether it should be
    python bench/int8_successor_check.py [--spec timm:tf_efficientnet_lite1] [--images 256] [--json OUT]
    python bench/int8_successor_check.py --spec MOBILENET --official MOBILENET_INT8   # the _common.py specs

One float backbone (default: EfficientNet-Lite1 from its installed package, offline), quantized post-training
two ways from the same float weights and the same calibration images (imgsent's 64 synthetic ones,
:data:`imgsent.quantized.CALIBRATION`):

* ``torch_ao_fx``: what ``--precision int8`` does today for a network without official int8 weights
  (:func:`imgsent.quantized.post_training_int8`: torch.ao FX, the engine's default qconfig);
* ``pt2e_x86_inductor``: torchao's PT2E flow (``torch.export``, ``X86InductorQuantizer`` with its default
  config, ``convert_pt2e``, then ``torch.compile`` with inductor freezing), the documented successor.

``--official SPEC`` adds the official int8 checkpoint of the same network as imgsent runs it today
(torchvision's quantization-aware weights, torch.ao quantized tensors), and ``float_frozen`` is the float
network as imgsent's engine runs it on a CPU (traced, frozen, oneDNN fusion).
For each: features of ``--images`` Twitter I images against the float features (cosine, min and mean),
images/s at 8 images a pass on 2 threads (best of 2), and the seconds to quantize (and compile).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from _common import TWITTER, require_shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="timm:tf_efficientnet_lite1")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--official", help="the same network's official int8 spec (run with int8=True)")
    ap.add_argument("--json")
    args = ap.parse_args()
    import _common

    args.spec = getattr(_common, args.spec, args.spec)  # MOBILENET, MOBILENET_INT8: names in _common.py
    args.official = getattr(_common, args.official or "", args.official)
    require_shared()
    warnings.filterwarnings("ignore")
    import torch

    import imgsent
    from imgsent.decode import decode_ref
    from imgsent.inputs import ImageRef
    from imgsent.quantized import CALIBRATION, calibration_images, post_training_int8, static_same_padding

    torch.set_num_threads(args.threads)
    bb = imgsent.create_backbone(args.spec)
    pp = bb.preprocess
    mean = torch.tensor(pp.mean).view(1, 3, 1, 1)
    std = torch.tensor(pp.std).view(1, 3, 1, 1)
    files = sorted(str(p) for p in TWITTER.glob("*.jpg"))[: args.images // 8 * 8]  # whole passes of 8
    pixels = torch.stack([torch.from_numpy(decode_ref(ImageRef(f, f), [pp]).views[pp.view_key][0]) for f in files])
    test = (pixels.float() / 255 - mean) / std
    calib_u8 = calibration_images(CALIBRATION["images"], *pp.input_size, seed=CALIBRATION["seed"])
    calib = (calib_u8.float() / 255 - mean) / std

    def timed(fn) -> tuple[torch.Tensor, float]:
        with torch.inference_mode():
            fn(test[:8])
            best, out = float("inf"), None
            for _ in range(2):
                start = time.perf_counter()
                out = torch.cat([fn(test[s : s + 8]).float() for s in range(0, len(test), 8)])
                best = min(best, time.perf_counter() - start)
        return out, len(test) / best

    def cosines(a: torch.Tensor, b: torch.Tensor) -> dict:
        c = torch.nn.functional.cosine_similarity(a, b)
        return {"cos_vs_float_min": round(float(c.min()), 4), "cos_vs_float_mean": round(float(c.mean()), 4)}

    result = {"spec": args.spec, "images": len(files), "threads": args.threads, "torch": torch.__version__}
    module = static_same_padding(bb.module.eval(), test[:1])
    ref, rate = timed(module)
    result["float_eager"] = {"images_per_s": round(rate, 1)}
    with torch.inference_mode():
        frozen = torch.jit.freeze(torch.jit.trace(module, test[:8]))
    torch.jit.enable_onednn_fusion(True)
    _, rate = timed(frozen)
    torch.jit.enable_onednn_fusion(False)
    result["float_frozen"] = {"images_per_s": round(rate, 1)}
    print(result, flush=True)
    if args.official:
        from imgsent.quantized import quantized_engine

        official = imgsent.create_backbone(args.official, int8=True)
        with quantized_engine():
            out, rate = timed(official.module)
        result["torch_ao_official"] = {"images_per_s": round(rate, 1), **cosines(out, ref), "spec": args.official}
        print(result["torch_ao_official"], flush=True)

    start = time.perf_counter()
    fx = post_training_int8(bb.module, pp.mean, pp.std, pp.input_size, images=calib_u8)
    quantize_s = time.perf_counter() - start
    out, rate = timed(fx)
    result["torch_ao_fx"] = {"images_per_s": round(rate, 1), **cosines(out, ref), "quantize_s": round(quantize_s, 1)}
    print(result["torch_ao_fx"], flush=True)

    import torchao
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    start = time.perf_counter()
    exported = torch.export.export(module, (calib[:8],)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for s in range(0, len(calib), 8):  # exported for passes of 8
            prepared(calib[s : s + 8])
    converted = convert_pt2e(prepared)
    torch._inductor.config.freezing = True
    compiled = torch.compile(converted)
    with torch.no_grad():
        compiled(test[:8])
    quantize_s = time.perf_counter() - start
    with torch.no_grad():
        out, rate = timed(compiled)
    result["pt2e_x86_inductor"] = {
        "images_per_s": round(rate, 1),
        **cosines(out, ref),
        "quantize_and_compile_s": round(quantize_s, 1),
        "torchao": torchao.__version__,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
