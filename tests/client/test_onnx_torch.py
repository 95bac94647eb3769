"""Models exported by a real exporter (torch.onnx.export) imported and differentiated
through a real server: LeNet-5, a small ResNet with batch norm, a transformer encoder
layer (embedding, multi-head attention, GELU, layer norm), each checked against the
same model in PyTorch: outputs, and the gradient of a scalar loss with respect to
every parameter against PyTorch autograd. Then training: a small CNN for the 8x8
digits, exported from PyTorch, reaches >= 95% test accuracy through the service, and
an interrupted run resumed from its checkpoint ends where an uninterrupted one does.

The model definitions here are also what bench/bench_onnx.py (P9) measures.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose

torch = pytest.importorskip("torch", reason="exporting models needs torch==2.13.0 "
                                            "(the test extra)")
pytest.importorskip("onnx", reason="ONNX import needs the onnx package (the test extra)")
nn = torch.nn

from gradserve.client.onnx import from_onnx  # noqa: E402


# --- the models (also bench/bench_onnx.py's) ------------------------------------------------

class LeNet5(nn.Module):
    """LeNet-5 for 28x28 images: conv 5x5 (padded) - pool - conv 5x5 - pool - 3 dense."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class BasicBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """A stem conv + batch norm, two basic blocks (16 channels), global pooling, dense."""

    def __init__(self, channels=16, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(BasicBlock(channels), BasicBlock(channels))
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class EncoderLayer(nn.Module):
    """Token embedding and one transformer encoder layer (multi-head attention, GELU
    feed-forward, layer norm), d=32, 4 heads."""

    def __init__(self, vocab=100, d=32, heads=4, ff=64):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation="gelu",
                                                batch_first=True)

    def forward(self, tokens):
        return self.layer(self.embedding(tokens))


class DigitsCNN(nn.Module):
    """8x8 digits: conv 3x3 (8 channels) - relu - max pool 2 - dense 10."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.max_pool2d(torch.relu(self.conv(x)), 2), 1))


class CausalAttention(nn.Module):
    """Token and position embeddings (torch.arange), attention with a causal mask, layer
    norm, tanh-approximated GELU, mean over the sequence."""

    def __init__(self):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(50, 16), nn.Embedding(10, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)

    def forward(self, t):
        n = t.shape[1]
        h = self.tokens(t) + self.positions(torch.arange(n))
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
        a, _ = self.attention(h, h, h, attn_mask=mask, need_weights=False)
        return nn.functional.gelu(self.norm(h + a), approximate="tanh").mean(1)


class Conv1dNet(nn.Module):
    """Grouped 1-D convolution, BatchNorm1d, leaky ReLU, adaptive pooling, log-softmax."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(4, 8, 3, padding=1, groups=4), nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = nn.functional.leaky_relu(self.bn(self.conv(x)), 0.1)
        h = nn.functional.adaptive_avg_pool1d(h, 1).squeeze(-1)
        return nn.functional.log_softmax(self.fc(h), -1)


class Resampling(nn.Module):
    """Strided conv, nearest upsampling, asymmetric padding, ceil-mode average pooling,
    clamp, concatenation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        F = nn.functional
        h = F.interpolate(torch.sigmoid(self.conv(x)), scale_factor=2, mode="nearest")
        h = F.avg_pool2d(F.pad(h, (1, 2, 0, 1)), 3, stride=2, ceil_mode=True)
        return torch.cat([h.flatten(1), torch.clamp(h, -0.2, 0.3).sum((2, 3))], 1)


class Elementwise(nn.Module):
    """chunk, where, cumsum, a vector norm, SiLU, hardswish, slicing."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        F = nn.functional
        h = self.fc(x)
        a, b = h.chunk(2, -1)
        y = torch.where(a > 0, a * torch.tanh(b), b.exp())
        return (y.cumsum(1) / (1 + y.norm(dim=-1, keepdim=True)) + F.silu(h[..., :3])
                + F.hardswish(h[..., 3:]))


COMMON = {"causal_attention": (CausalAttention, lambda: torch.randint(0, 50, (3, 6))),
          "conv1d": (Conv1dNet, lambda: torch.randn(5, 4, 10)),
          "resampling": (Resampling, lambda: torch.randn(2, 3, 9, 9)),
          "elementwise": (Elementwise, lambda: torch.randn(4, 5, 6))}


def randomize_batch_norm(module, seed=0):
    """Running statistics and affine parameters away from 0 and 1 (so the exporter has
    nothing to deduplicate and the check sees them)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return module


def perturb(module, seed=0):
    """Every parameter moved a little: fresh layer norms (weights all 1, biases all 0)
    have equal initializers, which exporters merge into one."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return module


def make(name, seed=0):
    """(module in eval mode, an example input) for the benchmark's sizes."""
    torch.manual_seed(seed)
    if name == "encoder":
        return perturb(EncoderLayer(), seed).eval(), torch.randint(0, 100, (16, 7))
    if name == "lenet5":
        return LeNet5().eval(), torch.randn(32, 1, 28, 28)
    if name == "resnet":
        return randomize_batch_norm(SmallResNet(), seed).eval(), torch.randn(16, 3, 16, 16)
    if name == "digits_cnn":
        return DigitsCNN().eval(), torch.randn(4, 1, 8, 8)
    raise ValueError(name)


def export(module, example, dynamo=False, dynamic_batch=True, optimize=False) -> bytes:
    """The model as ONNX bytes, input `x` and output `y`, batch dimension dynamic. The
    TorchScript exporter is asked not to fold batch norm into the convolutions; the
    dynamo exporter's optimizer (`optimize`) folds weight transposes into new
    initializers named val_*."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            program = torch.onnx.export(module, (example,), input_names=["x"],
                                        output_names=["y"], dynamo=True,
                                        dynamic_shapes=shapes, verbose=False, optimize=optimize)
            program.save(f)
        else:
            axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(module, (example,), f, input_names=["x"], output_names=["y"],
                              dynamic_axes=axes, dynamo=False, do_constant_folding=False)
    return f.getvalue()


def torch_gradients(module, example):
    """Output and d sum(y * w) / d every parameter, with a fixed weight w."""
    module.zero_grad()
    y = module(example)
    w = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y * w).sum().backward()
    return y.detach().numpy(), w.numpy(), {n: p.grad.numpy().copy()
                                           for n, p in module.named_parameters()}


# --- exported models against PyTorch ---------------------------------------------------------

@pytest.mark.parametrize("name, exporter", [
    ("lenet5", "torchscript"), ("resnet", "torchscript"), ("encoder", "torchscript"),
    ("lenet5", "dynamo"), ("resnet", "dynamo"), ("encoder", "dynamo"),
    ("encoder", "dynamo-optimized")])
def test_exported_model_values_and_gradients_match_pytorch(client, name, exporter):
    module, example = make(name)
    data = export(module, example, dynamo=exporter != "torchscript",
                  optimize=exporter == "dynamo-optimized")
    imported = from_onnx(data, parameters="inputs")
    assert imported.inputs == ["x"] and imported.outputs == ["y"]
    assert imported.input_shapes["x"][0] == -1  # the batch dimension stays dynamic
    want, w, grads = torch_gradients(module, example)
    x = example.numpy()
    trainable = [n for n in grads if n in imported.parameters]
    # every PyTorch parameter is an imported parameter, under its own name (but the
    # optimizer's pre-transposed weights: attention's in_proj and the two feed-forward ones)
    missing = 3 if exporter == "dynamo-optimized" else 0
    assert len(trainable) == len(grads) - missing, (sorted(grads), sorted(imported.parameters))
    values = {"x": x, **imported.parameters}
    out, cot = client.vjp(imported.graph, values, {"y": w.astype(np.float32)}, wrt=trainable)
    assert_allclose(out["y"], want, rtol=2e-4, atol=2e-5)
    for n in trainable:
        scale = float(np.max(np.abs(grads[n]))) or 1.0
        assert_allclose(cot[n], grads[n], rtol=1e-3, atol=2e-4 * scale, err_msg=n)
    # another batch size through the same graph
    smaller = example[:3]
    assert_allclose(client.evaluate(imported.graph, {**values, "x": smaller.numpy()})["y"],
                    module(smaller).detach().numpy(), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", COMMON)
def test_common_exports_match_pytorch(client, name, exporter):
    make_module, make_input = COMMON[name]
    torch.manual_seed(0)
    module = perturb(randomize_batch_norm(make_module())).eval()
    example = make_input()
    imported = from_onnx(export(module, example, dynamo=exporter == "dynamo"),
                         parameters="inputs")
    assert imported.input_shapes["x"][0] == -1
    want, w, grads = torch_gradients(module, example)
    out, cot = client.vjp(imported.graph, {"x": example.numpy(), **imported.parameters},
                          {"y": w}, wrt=list(grads))
    assert_allclose(out["y"], want, rtol=2e-4, atol=2e-5)
    for n, g in grads.items():
        assert_allclose(cot[n], g, rtol=1e-3, atol=2e-4 * (float(np.max(np.abs(g))) or 1.0),
                        err_msg=n)


def test_constants_mode_sends_only_the_data(client):
    module, example = make("lenet5")
    imported = from_onnx(export(module, example))
    assert imported.parameters == {}
    proto = imported.graph.build()
    assert [i.name for i in proto.inputs] == ["x"]
    assert sum(int(np.prod(t.shape)) for t in proto.constants.values()) == 61706
    x = example.numpy()
    assert_allclose(client.evaluate(imported.graph, {"x": x})["y"],
                    module(example).detach().numpy(), rtol=2e-4, atol=2e-5)


def test_gradient_with_respect_to_the_input_matches_pytorch(client):
    module, example = make("resnet")
    imported = from_onnx(export(module, example))
    x = example.clone().requires_grad_(True)
    y = module(x)
    w = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y * w).sum().backward()
    _, cot = client.vjp(imported.graph, {"x": example.numpy()}, {"y": w.numpy()})
    assert_allclose(cot["x"], x.grad.numpy(), rtol=1e-3, atol=1e-5)


# --- training an exported model --------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the digits data set needs the train extra")
    from gradserve.client.datasets import load_dataset
    return load_dataset("digits", test_fraction=0.2, seed=1)


@pytest.fixture(scope="module")
def digits_cnn(tmp_path_factory):
    module, example = make("digits_cnn")
    path = tmp_path_factory.mktemp("onnx") / "digits_cnn.onnx"
    path.write_bytes(export(module, example))
    return path


def train_onnx(path, data, config, addresses, resume=False, on_step=None):
    from gradserve.client.gradients import remote_gradient
    from gradserve.client.models import OnnxModelSpec
    from gradserve.client.training import Trainer

    spec = OnnxModelSpec(path, data.num_features, data.num_classes)
    gradient = remote_gradient(addresses, spec.build_graph(), spec.param_names)
    try:
        trainer = Trainer(spec, data, gradient, config)
        return spec, trainer.run(trainer.start(resume), on_step)
    finally:
        gradient.close()


def test_digits_cnn_from_pytorch_reaches_95_percent(address, digits, digits_cnn):
    from gradserve.client.training import TrainConfig

    config = TrainConfig(epochs=12, lr=0.1, momentum=0.9, seed=1)
    spec, state = train_onnx(digits_cnn, digits, config, [address])
    assert state.history[-1].test_accuracy >= 0.95, state.history
    assert spec.param_names == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    assert spec.num_params == 8 * 9 + 8 + 128 * 10 + 10
    assert all(a.dtype == np.float32 for a in state.params.values())
    assert state.step == 12 * math.ceil(len(digits.y_train) / 64)


def test_onnx_model_interrupt_and_resume_equals_the_uninterrupted_run(address, digits,
                                                                      digits_cnn, tmp_path):
    from gradserve.client.training import TrainConfig, load_checkpoint

    class Stop(Exception):
        pass

    def stop_at(step):
        def on_step(state, gradient):
            if state.step == step:
                raise Stop
        return on_step

    checkpoint = str(tmp_path / "cnn.ckpt")
    config = TrainConfig(epochs=3, lr=0.1, momentum=0.9, seed=2, checkpoint=checkpoint,
                         checkpoint_every=5)
    _, full = train_onnx(digits_cnn, digits, TrainConfig(epochs=3, lr=0.1, momentum=0.9, seed=2),
                         [address])
    with pytest.raises(Stop):
        train_onnx(digits_cnn, digits, config, [address], on_step=stop_at(27))
    assert load_checkpoint(checkpoint).step == 25
    _, resumed = train_onnx(digits_cnn, digits, config, [address], resume=True)
    assert resumed.step == full.step
    for name in full.params:
        assert_allclose(resumed.params[name], full.params[name], rtol=1e-5, atol=1e-6,
                        err_msg=name)


def test_data_parallel_gradient_of_an_onnx_model_equals_one_servers(address, start_server,
                                                                   digits, digits_cnn):
    from gradserve.client.gradients import remote_gradient
    from gradserve.client.models import OnnxModelSpec, one_hot

    spec = OnnxModelSpec(digits_cnn, digits.num_features, digits.num_classes)
    other = f"127.0.0.1:{start_server().port}"
    params = spec.init_params(np.random.default_rng(0))
    X, Y = digits.X_train[:50], one_hot(digits.y_train[:50], digits.num_classes)
    one = remote_gradient([address], spec.build_graph(), spec.param_names)
    two = remote_gradient([address, other], spec.build_graph(), spec.param_names)
    try:
        a, b = one(params, X, Y), two(params, X, Y)
    finally:
        one.close()
        two.close()
    assert_allclose(a.loss, b.loss, rtol=1e-5)
    for name in spec.param_names:
        assert_allclose(a.grads[name], b.grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
