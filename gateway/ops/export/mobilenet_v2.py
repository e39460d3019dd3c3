"""MobileNetV2 in plain torch with torchvision's exact module layout and state_dict keys.

torchvision cannot be imported beside the CPU torch wheel on these machines, but its
weight file loads into this module with ``strict=True`` (the tests prove it offline).
"""
from __future__ import annotations

import torch
from torch import nn

from gateway.ops.export.weights import TORCHVISION_URL as TORCHVISION_WEIGHTS_URL

SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: keys .0 (conv), .1 (bn), .2 (ReLU6)."""
    return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(inp * expand))
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = [conv_bn_relu6(inp, hidden, kernel=1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        features: list[nn.Module] = [conv_bn_relu6(3, 32, stride=2)]
        channels = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        features.append(conv_bn_relu6(channels, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(1280, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def load_torchvision_weights(model: nn.Module, url: str = TORCHVISION_WEIGHTS_URL) -> None:
    """The usual torchvision download (torch.hub cache, sha256 prefix in the file name
    checked, as torchvision does); raises when there is no network."""
    state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)
    model.load_state_dict(state, strict=True)


def recalibrate_batchnorm(model: MobileNetV2, seed: int = 0, logit_std: float = 3.0) -> None:
    """Give random weights usable statistics: one train-mode pass with momentum 1.0, then
    scale the classifier so logits spread (std ~3) instead of scoring every class ~0.001.

    Without it every image gets the same flat answer (useless for parity tests).
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 224, 224, generator=gen))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    model.eval()
    with torch.no_grad():
        logits = model(torch.rand(16, 3, 224, 224, generator=gen) * 4 - 2)
        head = model.classifier[1]
        assert isinstance(head, nn.Linear)
        head.weight.mul_(logit_std / float(logits.std()))


def build(weights: str, log=print) -> tuple[MobileNetV2, str]:
    """The model and the weights it actually got ("imagenet" or "random")."""
    torch.manual_seed(0)
    model = MobileNetV2().eval()
    if weights == "imagenet":
        try:
            load_torchvision_weights(model)
            return model.eval(), "imagenet"
        except Exception as exc:  # offline: URLError, timeouts, ...
            log(f"  mobilenet_v2: torchvision ImageNet weights unavailable ({type(exc).__name__}: "
                f"{str(exc)[:120]}); using seeded random weights")
    recalibrate_batchnorm(model)
    return model, "random"
