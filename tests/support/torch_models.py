"""Compact definitions of torchvision's resnet18, mobilenet_v3_small and efficientnet_b0,
a small ViT, a Swin-like block and a BERT-like encoder, for the ONNX tests.

torchvision itself is not installed here (its wheels pin their own torch); these follow
its model code layer for layer, with the same module names (conv1, layer1.0.bn2,
features.3.block.1.0...), so that the exported graphs have what the real models' have:
batch norms after convolutions, depthwise convolutions, hardswish, squeeze-excitation,
SiLU, residuals, attention with layer norms and GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# --- resnet18 (torchvision.models.resnet) -------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, inplanes = (64, 128, 256, 512), 64
        for i, planes in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(inplanes, planes, stride),
                                                     BasicBlock(planes, planes)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- mobilenet_v3_small and efficientnet_b0 (torchvision.models.mobilenetv3, efficientnet) ------

def _divisible(v, divisor=8):
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvNormActivation(nn.Sequential):
    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, activation=nn.ReLU, eps=1e-5):
        layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups,
                            bias=False), nn.BatchNorm2d(cout, eps=eps)]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze, activation=nn.ReLU, scale=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale()

    def forward(self, x):
        s = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(s)


class InvertedResidual(nn.Module):
    def __init__(self, cin, kernel, expanded, cout, se, hardswish, stride):
        super().__init__()
        act = nn.Hardswish if hardswish else nn.ReLU
        layers = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, activation=act, eps=1e-3))
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded,
                                         activation=act, eps=1e-3))
        if se:
            layers.append(SqueezeExcitation(expanded, _divisible(expanded // 4),
                                            scale=nn.Hardsigmoid))
        layers.append(ConvNormActivation(expanded, cout, 1, activation=None, eps=1e-3))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return y + x if self.use_res_connect else y


MOBILENET_V3_SMALL = [  # input, kernel, expanded, output, SE, hardswish, stride
    (16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1), (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2), (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1)]


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        layers = [ConvNormActivation(3, 16, 3, 2, activation=nn.Hardswish, eps=1e-3)]
        layers += [InvertedResidual(*row) for row in MOBILENET_V3_SMALL]
        layers.append(ConvNormActivation(96, 576, 1, activation=nn.Hardswish, eps=1e-3))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(1024, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MBConv(nn.Module):
    def __init__(self, expand_ratio, kernel, stride, cin, cout):
        super().__init__()
        expanded = _divisible(cin * expand_ratio)
        layers = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, activation=nn.SiLU))
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded,
                                         activation=nn.SiLU))
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4), activation=nn.SiLU))
        layers.append(ConvNormActivation(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return y + x if self.use_res_connect else y  # stochastic depth: identity in eval


EFFICIENTNET_B0 = [  # expand ratio, kernel, stride, input, output, layers
    (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        layers = [ConvNormActivation(3, 32, 3, 2, activation=nn.SiLU)]
        for ratio, kernel, stride, cin, cout, n in EFFICIENTNET_B0:
            layers.append(nn.Sequential(*[MBConv(ratio, kernel, stride if i == 0 else 1,
                                                 cin if i == 0 else cout, cout)
                                          for i in range(n)]))
        layers.append(ConvNormActivation(320, 1280, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- a small ViT (torchvision.models.vision_transformer) ------------------------------------------

class EncoderBlock(nn.Module):
    def __init__(self, heads, dim, mlp_dim):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class SmallViT(nn.Module):
    def __init__(self, image=16, patch=4, layers=2, heads=4, dim=32, mlp_dim=64,
                 num_classes=10):
        super().__init__()
        self.patch = patch
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        seq = (image // patch) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, dim).normal_(std=0.02))
        self.layers = nn.Sequential(*[EncoderBlock(heads, dim, mlp_dim) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.conv_proj.out_channels, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


# --- a Swin-like block (torchvision.models.swin_transformer) and a BERT-like encoder -----------

class ShiftedWindowBlock(nn.Module):
    """Swin's block: window attention with a relative-position bias (a table indexed by a
    relative-position index buffer), a cyclic shift and the shifted-window attention mask
    built by slice assignment, then an MLP; and patch merging."""

    def __init__(self, dim=16, heads=2, window=4, shift=2, size=8):
        super().__init__()
        self.heads, self.window, self.shift, self.size = heads, window, shift, size
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                            indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index",
                             (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten())
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.merge_norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def attention(self, x):
        b, h, w, c = x.shape
        ws, s = self.window, self.shift
        x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, ws * ws, c)
        qkv = self.qkv(x).reshape(x.size(0), ws * ws, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index]
        attn = attn + bias.view(ws * ws, ws * ws, -1).permute(2, 0, 1).unsqueeze(0)
        mask = x.new_zeros((h, w))  # the shifted-window mask, by slice assignment
        count = 0
        for hs in ((0, -ws), (-ws, -s), (-s, None)):
            for wsl in ((0, -ws), (-ws, -s), (-s, None)):
                mask[hs[0]:hs[1], wsl[0]:wsl[1]] = count
                count += 1
        mask = mask.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        mask = (mask.unsqueeze(1) - mask.unsqueeze(2)) != 0
        mask = mask.float().masked_fill(mask, -100.0)
        attn = attn.view(-1, mask.size(0), self.heads, ws * ws, ws * ws) + \
            mask.unsqueeze(1).unsqueeze(0)
        attn = F.softmax(attn.view(-1, self.heads, ws * ws, ws * ws), dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(-1, ws * ws, c)
        x = self.proj(x).view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        return torch.roll(x.reshape(b, h, w, c), shifts=(s, s), dims=(1, 2))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      -1)
        return self.reduction(self.merge_norm(x))


class BertLikeEncoder(nn.Module):
    """Word, position and token-type embeddings, an attention mask from the padding, two
    post-norm encoder layers (GELU), a pooler: what a Hugging Face BERT has."""

    def __init__(self, vocab=50, dim=32, heads=4, layers=2, max_len=16):
        super().__init__()
        self.heads = heads
        self.word_embeddings = nn.Embedding(vocab, dim, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.token_type_embeddings = nn.Embedding(2, dim)
        self.embeddings_norm = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            self.layers.append(nn.ModuleDict({
                "query": nn.Linear(dim, dim), "key": nn.Linear(dim, dim),
                "value": nn.Linear(dim, dim), "output": nn.Linear(dim, dim),
                "attention_norm": nn.LayerNorm(dim, eps=1e-12),
                "intermediate": nn.Linear(dim, 2 * dim), "ffn_output": nn.Linear(2 * dim, dim),
                "output_norm": nn.LayerNorm(dim, eps=1e-12)}))
        self.pooler = nn.Linear(dim, dim)

    def forward(self, input_ids, token_type_ids):
        n, t = input_ids.shape
        positions = torch.arange(t).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + \
            self.token_type_embeddings(token_type_ids)
        x = self.embeddings_norm(x)
        mask = (1.0 - (input_ids != 0).float())[:, None, None, :] * torch.finfo(x.dtype).min
        d = x.shape[-1] // self.heads
        for layer in self.layers:
            def heads(v):
                return v.view(n, t, self.heads, d).transpose(1, 2)
            q, k, v = (heads(layer[name](x)) for name in ("query", "key", "value"))
            scores = q @ k.transpose(-1, -2) / d ** 0.5 + mask
            context = (F.softmax(scores, -1) @ v).transpose(1, 2).reshape(n, t, -1)
            x = layer["attention_norm"](x + layer["output"](context))
            x = layer["output_norm"](x + layer["ffn_output"](F.gelu(layer["intermediate"](x))))
        return x, torch.tanh(self.pooler(x[:, 0]))


def randomize(module, seed=0):
    """Random weights and batch-norm statistics away from their initial values (so that
    nothing is equal by accident and every gradient is seen)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return module.eval()
