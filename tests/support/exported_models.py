"""PyTorch models exported by a real exporter (torch.onnx.export): LeNet-5, a small
ResNet with batch norm, a transformer encoder layer and others, for the ONNX import
tests (tests/client/test_onnx_torch.py) and the P9 benchmark (bench/bench_onnx.py).
Needs torch (import it only where torch is installed)."""

from __future__ import annotations

import io
import warnings

import torch

nn = torch.nn


# --- the models ------------------------------------------------

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
