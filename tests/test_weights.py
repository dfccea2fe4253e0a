import pytest
import torch
from torchvision.models import mobilenet_v2

from imgsent.errors import ImgsentError
from imgsent.weights import dequantize_mobilenet_v2, load_state_dict_file


def test_quantized_mobilenet_v2_converts_to_float_within_quantisation_error():
    from torchvision.models.quantization import mobilenet_v2 as quantizable_mobilenet_v2
    from torchvision.models.quantization.utils import quantize_model

    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no qnnpack engine")
    torch.manual_seed(0)
    model = quantizable_mobilenet_v2(weights=None, quantize=False)
    model.train()
    with torch.no_grad():  # give batch-norm real statistics to fold
        for _ in range(3):
            model(torch.randn(8, 3, 96, 96))
    model.eval()
    x = torch.randn(6, 3, 96, 96)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        quantize_model(model, "qnnpack")
        with torch.no_grad():
            q_out = model(x)
    finally:
        torch.backends.quantized.engine = previous
    float_model = mobilenet_v2()
    float_model.load_state_dict(dequantize_mobilenet_v2(model))
    float_model.eval()
    with torch.no_grad():
        f_out = float_model(x)
    rel = ((f_out - q_out).norm() / q_out.norm()).item()
    assert rel < 0.05  # int8 activations vs float: quantisation error only
    assert (f_out.argmax(1) == q_out.argmax(1)).float().mean() >= 5 / 6
    bn = float_model.features[0][1]
    assert torch.all(bn.weight == 1) and torch.all(bn.running_mean == 0)


def test_torch_checkpoints_load_without_unpickling_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.pth")
    assert load_state_dict_file(tmp_path / "ok.pth")["w"].tolist() == [1.0, 1.0]
    torch.save({"w": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ImgsentError, match="cannot read weights"):
        load_state_dict_file(tmp_path / "evil.pth")
