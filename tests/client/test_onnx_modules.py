"""PyTorch modules through gradserve.client.torch.from_module, against PyTorch itself.

Models built from code (tests/support/torch_models.py follows torchvision's resnet18,
mobilenet_v3_small, efficientnet_b0 and vision transformer layer for layer; a Swin-like
block with its shifted-window mask and relative-position index; a BERT-like encoder),
random weights and batch-norm statistics, eval mode. The gradient of sum(y * w) with
respect to every parameter, computed by a real server from the imported graph, must be
PyTorch's gradient of the parameter of the same name. Where a parameter cannot be mapped
the import refuses, naming it; a default export (batch norm folded into the
convolutions) warns.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose

torch = pytest.importorskip("torch")
pytest.importorskip("onnx", reason="ONNX import needs the onnx package")
pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript")

from gradserve.client.onnx import FoldedParametersWarning, OnnxImportError, from_onnx  # noqa
from gradserve.client.torch import from_module  # noqa: E402
from support.torch_models import (BertLikeEncoder, EfficientNetB0, MobileNetV3Small,  # noqa: E402
                          ResNet18, ShiftedWindowBlock, SmallViT, randomize)



@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """PyTorch's CPU threads fight the server's on a busy machine (a depthwise
    convolution took 80 ms with both cores loaded): one thread for the references."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IMAGE = (2, 3, 32, 32)
MODELS = {
    "resnet18": (lambda: randomize(ResNet18()), lambda: (torch.randn(IMAGE),)),
    "mobilenet_v3_small": (lambda: randomize(MobileNetV3Small()), lambda: (torch.randn(IMAGE),)),
    "efficientnet_b0": (lambda: randomize(EfficientNetB0()), lambda: (torch.randn(IMAGE),)),
    # fresh layer norms (weights all 1, biases 0): the TorchScript exporter merges those
    # equal initializers into one, which from_module splits again
    "small_vit": (lambda: SmallViT().eval(), lambda: (torch.randn(2, 3, 16, 16),)),
    "swin_block": (lambda: ShiftedWindowBlock().eval(), lambda: (torch.randn(2, 8, 8, 16),)),
    "bert_like": (lambda: BertLikeEncoder().eval(),
                  lambda: (torch.tensor([[5, 7, 9, 3, 0, 0], [4, 4, 8, 2, 6, 0]]),
                           torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]]))),
}


def torch_gradients(module, args):
    """Outputs, the weights w of sum(y * w), and d/d every parameter."""
    module.zero_grad()
    outs = module(*args)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    ws = [torch.linspace(-1, 1, o.numel()).reshape(o.shape) for o in outs]
    sum((o * w).sum() for o, w in zip(outs, ws)).backward()
    grads = {n: p.grad.numpy().copy() for n, p in module.named_parameters()
             if p.grad is not None}
    return [o.detach().numpy() for o in outs], [w.numpy() for w in ws], grads


def max_gradient_error(client, module, args, imported):
    """Check values and gradients against PyTorch; the largest gradient error relative to
    the largest gradient magnitude of its parameter (at least 1e-4 of the model's)."""
    want, ws, grads = torch_gradients(module, args)
    assert set(grads) == set(imported.trainable)  # every parameter, under its own name
    values = {n: a.numpy() for n, a in zip(imported.inputs, args)}
    values.update(imported.parameters)
    out, cot = client.vjp(imported.graph, values, dict(zip(imported.outputs, ws)),
                          wrt=imported.trainable)
    for name, w in zip(imported.outputs, want):
        assert_allclose(out[name], w, rtol=2e-4, atol=2e-4 * float(np.abs(w).max()),
                        err_msg=name)
    worst = 0.0
    # a gradient that is 0 in exact arithmetic (attention's key bias: softmax ignores a
    # shift per query) is float noise in both: measured against the model's largest one
    floor = 1e-4 * max(float(np.abs(g).max()) for g in grads.values())
    for name, g in grads.items():
        scale = max(float(np.abs(g).max()), floor) or 1.0
        assert_allclose(cot[name], g, rtol=1e-3, atol=1e-3 * scale, err_msg=name)
        worst = max(worst, float(np.abs(cot[name] - g).max()) / scale)
    return worst


@pytest.mark.parametrize("name, exporter", [
    ("resnet18", "torchscript"), ("mobilenet_v3_small", "torchscript"),
    ("efficientnet_b0", "torchscript"), ("small_vit", "torchscript"), ("small_vit", "dynamo"),
    ("swin_block", "torchscript"), ("swin_block", "dynamo"),
    ("bert_like", "torchscript"), ("bert_like", "dynamo")])
def test_from_module_gives_pytorchs_gradients_under_pytorchs_names(client, name, exporter):
    torch.manual_seed(0)
    make, example = MODELS[name]
    module, args = make(), example()
    imported = from_module(module, args, exporter=exporter)
    # parameters first, then the buffers the graph reads (batch-norm statistics, Swin's
    # relative-position index is an integer buffer: a constant), each the module's own
    assert imported.trainable == [n for n, _ in module.named_parameters()]
    float_buffers = [n for n, b in module.named_buffers() if b.is_floating_point()]
    assert imported.buffers == float_buffers
    for n, t in [*module.named_parameters(), *module.named_buffers()]:
        if n in imported.parameters:
            assert np.array_equal(imported.parameters[n], t.detach().numpy()), n
    error = max_gradient_error(client, module, args, imported)
    print(f"\n{name} ({exporter}): {len(imported.trainable)} parameters, "
          f"max gradient error {error:.2e} of the largest gradient")
    # the batch stays free (a ViT's class token is expanded to it, Swin's windows are
    # counted by it, BERT's mask is shaped by it)
    other = tuple(torch.cat([a, a[:1]]) for a in args)
    got = client.evaluate(imported.graph, {**{n: a.numpy() for n, a in zip(imported.inputs,
                                                                          other)},
                                           **imported.parameters})
    with torch.no_grad():
        want = module(*other)
    for o, w in zip(imported.outputs, (want,) if isinstance(want, torch.Tensor) else want):
        assert_allclose(got[o], w.detach().numpy(), rtol=2e-4,
                        atol=2e-4 * float(w.abs().max()), err_msg=o)


class WithUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(4, 3)
        self.spare = torch.nn.Linear(4, 3)  # never called in forward

    def forward(self, x):
        return self.used(x)


def test_a_parameter_that_cannot_be_mapped_is_refused_by_name():
    module = WithUnused().eval()
    with pytest.raises(OnnxImportError, match=r"'spare.weight', 'spare.bias' \(unused in "
                                              r"forward, or folded"):
        from_module(module, torch.randn(2, 4))
    imported = from_module(module, torch.randn(2, 4), strict=False)
    assert imported.trainable == ["used.weight", "used.bias"]
    assert set(imported.parameters) == {"used.weight", "used.bias"}


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match=r"call module.eval\(\) first"):
        from_module(WithUnused(), torch.randn(2, 4))


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_a_default_export_that_folded_batch_norm_warns(client):
    """torch.onnx.export's defaults fold each batch norm into the convolution before it
    (dynamo's optimizer; TorchScript's constant folding): 'conv.weight' then holds other
    values and the batch norm's parameters are gone. from_onnx says so."""
    module = randomize(ConvBN())
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamo = io.BytesIO()
        torch.onnx.export(module, (x,), input_names=["x"], output_names=["y"],
                          verbose=False).save(dynamo)
        script = io.BytesIO()
        torch.onnx.export(module, (x,), script, input_names=["x"], output_names=["y"],
                          dynamo=False)
    for data, named in ((dynamo.getvalue(), "'conv.weight'"), (script.getvalue(), "'onnx::Conv")):
        with pytest.warns(FoldedParametersWarning, match=named + ".*not PyTorch's gradients.*"
                                                          "from_module"):
            imported = from_onnx(data, parameters="inputs")
        assert "bn.weight" not in imported.parameters
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            from_onnx(data)  # constants: the values are right, nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imported = from_module(module, x)
    assert {"conv.weight", "bn.weight", "bn.bias"} <= set(imported.parameters)
    assert max_gradient_error(client, module, (x,), imported) < 1e-3
