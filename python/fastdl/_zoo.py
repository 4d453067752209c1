"""Well-known model definitions written against plain torch.nn / torch.nn.functional, for testing
and benchmarking fastdl.nn.convert, fastdl.patch and fastdl.check on models people already have
(tests/test_convert.py and fastdl-bench --suite models use these). Written here from the
architectures' descriptions, not copied:

- MnistNet: the network of PyTorch's MNIST example (conv 1->32 3x3, conv 32->64 3x3, F.max_pool2d
  2, dropout 0.25, fc 9216->128, dropout 0.5, fc 128->10, log_softmax; F.* in forward).
- resnet18: torchvision's ResNet-18 (7x7/2 stem, 3x3/2 max pool, BasicBlock x [2, 2, 2, 2],
  global average pool, fc), with torchvision's initialisation. (torchvision itself is not used:
  no CPU wheel for the pinned torch can be installed here.)
- vgg: a VGG-style stack (3x3 convs + ReLU(inplace) + 2x2 max pools, adaptive average pool,
  a three-layer classifier with dropout), widths configurable.
- WordLM: the word-level LSTM language model of PyTorch's examples (embedding -> dropout ->
  LSTM -> dropout -> linear decoder, optionally tied to the embedding, log_softmax).

>>> model = fastdl._zoo.resnet18(num_classes=10)
>>> model(torch.randn(2, 3, 32, 32)).shape         # torch.Size([2, 10])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MnistNet", "resnet18", "ResNet", "BasicBlock", "vgg", "WordLM"]


class MnistNet(nn.Module):
    """PyTorch's MNIST example network; input (N, 1, 28, 28), output log-probabilities (N, 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and a residual (1x1 conv + BN when the shape changes)."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks; input (N, 3, H, W), logits (N, num_classes)."""

    def __init__(self, layers=(2, 2, 2, 2), num_classes=1000, width=64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes=1000, width=64):
    """torchvision.models.resnet18's architecture (width=64); a smaller width for quick tests."""
    return ResNet((2, 2, 2, 2), num_classes, width)


def vgg(cfg=(16, "M", 32, "M", 64, 64, "M"), num_classes=10, hidden=128, pool=2):
    """A VGG-style network: cfg lists conv widths (3x3, padding 1, ReLU(inplace)) and 'M' (2x2 max
    pool); then AdaptiveAvgPool2d(pool) and Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear."""
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(
        nn.Sequential(*layers), nn.AdaptiveAvgPool2d((pool, pool)), nn.Flatten(),
        nn.Sequential(nn.Linear(c * pool * pool, hidden), nn.ReLU(True), nn.Dropout(),
                      nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
                      nn.Linear(hidden, num_classes)))


class WordLM(nn.Module):
    """The word-level LSTM language model of PyTorch's examples: forward(input (T, B) int64,
    hidden) -> (log-probabilities (T*B, ntoken), hidden)."""

    def __init__(self, ntoken, ninp=200, nhid=200, nlayers=2, dropout=0.2, tie_weights=False):
        super().__init__()
        self.ntoken, self.nhid, self.nlayers = ntoken, nhid, nlayers
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            if nhid != ninp:
                raise ValueError("WordLM: tie_weights needs nhid == ninp")
            self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        w = next(self.parameters())
        shape = (self.nlayers, bsz, self.nhid)
        return w.new_zeros(shape), w.new_zeros(shape)
