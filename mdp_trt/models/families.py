"""Family plugins for the channel graph: the model classes each takes and where its blocks are.

Everything else (dims, which blocks have an identity shortcut, terms, surgery, importance)
comes from the graph and the module rules, so a family is a few lines.
"""

from __future__ import annotations

from timm.models.byobnet import ByobNet
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.regnet import RegNet
from timm.models.resnet import ResNet

from mdp_trt.models.generic import Family, Proto, family


@family
class ConvNeXtFamily(Family):
    """ConvNeXt v1 and v2 (GRN): depthwise conv, LayerNorm, MLP, layer scale."""

    name = "convnext"
    classes = (ConvNeXt,)
    block_parents = ("stages.*.blocks",)


@family
class EfficientNetFamily(Family):
    """EfficientNet (incl. V2 with fused MBConv), MobileNetV2 (EfficientNet class) and
    MobileNetV3: DepthwiseSeparableConv, InvertedResidual and EdgeResidual blocks."""

    name = "efficientnet"
    classes = (EfficientNet, MobileNetV3)
    block_parents = ("blocks.*",)


@family
class RegNetFamily(Family):
    """RegNetX / RegNetY: grouped bottlenecks, SE on Y."""

    name = "regnet"
    classes = (RegNet,)
    block_parents = ("s*",)


@family
class ResNetFamily(Family):
    """timm ResNets: BasicBlock and Bottleneck, plain and deep stems, avg-pool shortcuts,
    ResNeXt (grouped convs), SE and ECA attention.

    A stage's residual width is named ``layer3.res`` and the stem's output width ``stem``
    (when it is not layer1's residual width, as it is in resnet18), as the earlier ResNet
    adapter named them, so plans and space ids made for plain ResNets stay valid.
    """

    name = "resnet"
    classes = (ResNet,)
    block_parents = ("layer*",)

    def dim_names(self, p: Proto) -> dict[int, str]:
        stages = [n for n, _ in p.model.named_children() if n.startswith("layer")]
        out: dict[int, str] = {}
        for path, name in [*((s, f"{s}.res") for s in stages), ("act1", "stem")]:
            r = p.output_of(path)
            if r is not None and r not in out:
                out[r] = name
        return out


@family
class ByobNetFamily(Family):
    """timm's ByobNet ('bring your own blocks'), e.g. resnext26ts."""

    name = "byobnet"
    classes = (ByobNet,)
    block_parents = ("stages.*",)
