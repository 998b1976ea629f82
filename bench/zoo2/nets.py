"""Hand-written torch networks for bench/export_zoo2.py: small, random-weight stand-ins for
architectures whose real code lives in other toolchains. Only torch (and torchvision for the FPN)."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), act())


class UNet(nn.Module):
    """Three-level U-Net: double convs, max-pool down, transposed-conv up, skip concatenations."""

    def __init__(self, cin: int = 3, classes: int = 2, width: int = 16):
        super().__init__()
        w = [width, width * 2, width * 4, width * 8]

        def double(a, b):
            return nn.Sequential(conv_bn(a, b), conv_bn(b, b))

        self.enc = nn.ModuleList([double(cin, w[0]), double(w[0], w[1]), double(w[1], w[2])])
        self.bottom = double(w[2], w[3])
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, 2) for i in (2, 1, 0)])
        self.dec = nn.ModuleList([double(w[i] * 2, w[i]) for i in (2, 1, 0)])
        self.head = nn.Conv2d(w[0], classes, 1)

    def forward(self, x):
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class FPNDetector(nn.Module):
    """ResNet-18 body + torchvision FeaturePyramidNetwork (P2..P5 + max-pooled P6) + one RetinaNet-style
    conv head shared by every level; returns the per-level class logits and box regressions (no decoding, no NMS)."""

    def __init__(self, classes: int = 5, anchors: int = 3, fpn_channels: int = 64):
        super().__init__()
        from torchvision.models import resnet18
        from torchvision.models.detection.backbone_utils import BackboneWithFPN
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = BackboneWithFPN(resnet18(), return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                                    in_channels_list=[64, 128, 256, 512], out_channels=fpn_channels,
                                    extra_blocks=LastLevelMaxPool())
        self.tower = nn.Sequential(nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(fpn_channels, anchors * classes, 3, padding=1)
        self.box = nn.Conv2d(fpn_channels, anchors * 4, 3, padding=1)

    def forward(self, x):
        outs = []
        for feat in self.body(x).values():
            t = self.tower(feat)
            outs += [self.cls(t), self.box(t)]
        return tuple(outs)


class CSPBlock(nn.Module):
    """C2f-like: split, a chain of residual bottlenecks on one half, concatenate every stage, fuse."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c = cout // 2
        self.stem = conv_bn(cin, 2 * self.c, 1, act=nn.SiLU)
        self.blocks = nn.ModuleList(nn.Sequential(conv_bn(self.c, self.c, act=nn.SiLU), conv_bn(self.c, self.c, act=nn.SiLU))
                                    for _ in range(n))
        self.shortcut = shortcut
        self.fuse = conv_bn((2 + n) * self.c, cout, 1, act=nn.SiLU)

    def forward(self, x):
        ys = list(self.stem(x).chunk(2, dim=1))
        for b in self.blocks:
            y = b(ys[-1])
            ys.append(ys[-1] + y if self.shortcut else y)
        return self.fuse(torch.cat(ys, dim=1))


class SPPF(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a = conv_bn(c, c // 2, 1, act=nn.SiLU)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.b = conv_bn(c * 2, c, 1, act=nn.SiLU)

    def forward(self, x):
        x = self.a(x)
        p1 = self.pool(x)
        p2 = self.pool(p1)
        return self.b(torch.cat([x, p1, p2, self.pool(p2)], dim=1))


class CSPPANTiny(nn.Module):
    """YOLO-shaped detector without ultralytics: CSP backbone, SPPF, PAN neck (upsample + concat, then
    strided conv + concat), decoupled box/class heads per stride, outputs concatenated to [B, 4+C, N]."""

    def __init__(self, classes: int = 8, w: int = 16):
        super().__init__()
        c = [w, w * 2, w * 4, w * 8, w * 16]

        def s(a, b):
            return conv_bn(a, b, 3, 2, act=nn.SiLU)

        self.stem = nn.Sequential(s(3, c[0]), s(c[0], c[1]), CSPBlock(c[1], c[1]))
        self.p3 = nn.Sequential(s(c[1], c[2]), CSPBlock(c[2], c[2], 2))
        self.p4 = nn.Sequential(s(c[2], c[3]), CSPBlock(c[3], c[3], 2))
        self.p5 = nn.Sequential(s(c[3], c[4]), CSPBlock(c[4], c[4]), SPPF(c[4]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = CSPBlock(c[4] + c[3], c[3], shortcut=False)
        self.td3 = CSPBlock(c[3] + c[2], c[2], shortcut=False)
        self.down3 = s(c[2], c[2])
        self.bu4 = CSPBlock(c[2] + c[3], c[3], shortcut=False)
        self.down4 = s(c[3], c[3])
        self.bu5 = CSPBlock(c[3] + c[4], c[4], shortcut=False)
        self.box = nn.ModuleList(nn.Sequential(conv_bn(ch, c[2], act=nn.SiLU), nn.Conv2d(c[2], 4, 1)) for ch in (c[2], c[3], c[4]))
        self.cls = nn.ModuleList(nn.Sequential(conv_bn(ch, c[2], act=nn.SiLU), nn.Conv2d(c[2], classes, 1)) for ch in (c[2], c[3], c[4]))

    def forward(self, x):
        x3 = self.p3(self.stem(x))
        x4 = self.p4(x3)
        x5 = self.p5(x4)
        t4 = self.td4(torch.cat([self.up(x5), x4], 1))
        n3 = self.td3(torch.cat([self.up(t4), x3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), x5], 1))
        outs = [torch.cat([b(f), c(f).sigmoid()], 1).flatten(2) for f, b, c in zip((n3, n4, n5), self.box, self.cls)]
        return torch.cat(outs, 2)


class LSTMClassifier(nn.Module):
    """Embedding -> 2-layer LSTM -> last time step -> Linear."""

    def __init__(self, vocab: int = 1000, emb: int = 64, hidden: int = 128, classes: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, ids):
        y, _ = self.rnn(self.emb(ids))
        return self.fc(y[:, -1])


class BiGRUTagger(nn.Module):
    """Embedding -> bidirectional GRU -> per-token Linear (sequence tagging, e.g. NER)."""

    def __init__(self, vocab: int = 1000, emb: int = 64, hidden: int = 96, tags: int = 9):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.GRU(emb, hidden, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, tags)

    def forward(self, ids):
        y, _ = self.rnn(self.emb(ids))
        return self.fc(y)


class CRNN(nn.Module):
    """OCR recogniser: VGG-ish conv stack over a 32-pixel-high grey line -> width becomes time ->
    2-layer bidirectional LSTM -> per-step Linear over the alphabet (+ CTC blank). Output [T, B, classes]."""

    def __init__(self, classes: int = 37, hidden: int = 96):
        super().__init__()
        self.cnn = nn.Sequential(
            conv_bn(1, 32), nn.MaxPool2d(2, 2),                    # 16 x W/2
            conv_bn(32, 64), nn.MaxPool2d(2, 2),                   # 8 x W/4
            conv_bn(64, 128), conv_bn(128, 128), nn.MaxPool2d((2, 1), (2, 1)),  # 4 x W/4
            conv_bn(128, 128), nn.MaxPool2d((2, 1), (2, 1)),       # 2 x W/4
            nn.Conv2d(128, 128, (2, 1)), nn.ReLU())                # 1 x W/4
        self.rnn = nn.LSTM(128, hidden, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        f = self.cnn(x).squeeze(2).permute(2, 0, 1)  # [T, B, C]
        y, _ = self.rnn(f)
        return self.fc(y)
