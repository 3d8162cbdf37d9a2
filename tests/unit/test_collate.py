"""The fine-tuning collate: chat-templated prompt as at inference, loss on the answer + end-of-turn only."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from meddr_ray import prompts
from meddr_ray.config import load_config
from meddr_ray.data.errors import DataError
from meddr_ray.model import load_model
from meddr_ray.model.collate import IGNORE_INDEX, InstructionCollator, completion_text

LABELS = ["malignant", "normal, benign"]


def _png(seed: int, size: int = 28) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vlm():
    return load_model(load_config("tiny").student)


@pytest.fixture(scope="module")
def collate(vlm):
    return InstructionCollator(vlm.processor, max_length=128)


def _batch(answers, prompt_texts=None):
    n = len(answers)
    prompt_texts = prompt_texts or [prompts.diagnosis_prompt("breast ultrasound", LABELS)] * n
    return {
        "id": np.array([f"row{i}" for i in range(n)], dtype=object),
        "image": np.array([_png(i) for i in range(n)], dtype=object),
        "prompt": np.array(prompt_texts, dtype=object),
        "answer": np.array(answers, dtype=object),
    }


def test_prompt_tokens_are_exactly_what_the_model_sees_at_inference(vlm, collate):
    batch = _batch(["malignant"])
    out = collate(batch)
    image = Image.open(io.BytesIO(batch["image"][0])).convert("RGB")
    seen = vlm.processor(images=[image], text=[vlm.chat_prompt(batch["prompt"][0])])["input_ids"][0]
    ids = out["input_ids"][0].tolist()
    assert ids[: len(seen)] == list(seen)
    # the prompt, its image tokens included, is masked; the first label is the first answer token
    labels = out["labels"][0].tolist()
    assert labels[: len(seen)] == [IGNORE_INDEX] * len(seen)
    assert labels[len(seen)] == ids[len(seen)] != IGNORE_INDEX


def test_labels_are_the_answer_and_end_of_turn_and_nothing_else(vlm, collate):
    tok = vlm.processor.tokenizer
    out = collate(_batch(["normal, benign"]))
    labels = out["labels"][0]
    kept = labels[labels != IGNORE_INDEX].tolist()
    assert kept == tok("normal, benign" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert tok.decode(kept) == "normal, benign<|im_end|>"
    # the kept tokens are one contiguous run at the end of the sequence
    positions = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert positions == list(range(positions[0], len(labels)))
    # image tokens are never labels
    image_id = tok.convert_tokens_to_ids("<image>")
    assert (out["input_ids"][0] == image_id).sum() == 16  # (32 / 8)^2 patches of the tiny tower
    assert not (labels == image_id).any()
    assert torch.all(labels[out["input_ids"][0] == image_id] == IGNORE_INDEX)


def test_completion_is_cut_after_the_end_of_turn_token(vlm):
    # the template writes "<|im_end|>\n" after a turn: the newline is not trained on
    assert completion_text(vlm.processor, "q", "  yes ") == "yes<|im_end|>"


def test_padding_is_masked_and_unattended(vlm, collate):
    batch = _batch(["malignant", "normal, benign"], ["short?", prompts.diagnosis_prompt("breast ultrasound", LABELS)])
    out = collate(batch)
    pad = vlm.processor.tokenizer.pad_token_id
    lengths = out["attention_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] == out["input_ids"].shape[1]
    short = lengths[0]
    assert out["attention_mask"][0, :short].all() and not out["attention_mask"][0, short:].any()
    assert (out["input_ids"][0, short:] == pad).all()
    assert (out["labels"][0, short:] == IGNORE_INDEX).all()
    # right padding: the padded row's real tokens match the row collated alone
    alone = collate(_batch(["malignant"], ["short?"]))
    assert out["input_ids"][0, :short].tolist() == alone["input_ids"][0].tolist()
    assert out["labels"][0, :short].tolist() == alone["labels"][0].tolist()
    assert out["pixel_values"].shape == (2, 3, 32, 32)


def test_model_loss_is_the_cross_entropy_of_the_answer_tokens_only(vlm, collate):
    out = collate(_batch(["malignant", "normal, benign"]))
    model = vlm.model
    with torch.no_grad():
        result = model(**out)
    logits = result.logits[:, :-1].float()
    target = out["labels"][:, 1:]
    mask = target != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[mask], target[mask])
    assert result.loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # every label survives the shift (position 0 is the prompt's first token, never a label)
    assert mask.sum().item() == (out["labels"] != IGNORE_INDEX).sum().item() > 0


def test_long_answers_are_truncated_to_max_length(vlm):
    short = InstructionCollator(vlm.processor, max_length=80)
    out = short(_batch(["benign " * 200]))
    assert out["input_ids"].shape[1] == 80
    assert (out["labels"][0] != IGNORE_INDEX).sum() > 0  # some answer tokens survive


def test_a_prompt_longer_than_max_length_names_the_row(vlm):
    with pytest.raises(ValueError, match="row id row0.*train.max_length=20"):
        InstructionCollator(vlm.processor, max_length=20)(_batch(["malignant"]))


def test_bad_and_missing_images_name_the_row(collate):
    batch = _batch(["a", "b"])
    batch["image"][1] = b"not an image"
    with pytest.raises(DataError, match="row1"):
        collate(batch)
    batch["image"][1] = None
    with pytest.raises(DataError, match="row1.*no image"):
        collate(batch)


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    """The tiny native InternVL (``build_options.architecture: internvl``), the paper preset's format."""
    cfg = load_config("tiny", [f"student.path={tmp_path_factory.mktemp('m') / 'internvl'}",
                               "student.build_options.architecture=internvl"]).student
    return load_model(cfg)


def test_internvl_image_tokens_are_expanded_per_tile_and_masked(internvl):
    """InternVL's placeholder becomes <img> + 4 context tokens per tile + </img>: the collate trains on none of them,
    and a wide image's tiles (3 + a thumbnail) reach the model in order with its 4 x 4 context tokens."""
    tok = internvl.processor.tokenizer
    collate = InstructionCollator(internvl.processor, max_length=128)
    wide = io.BytesIO()
    Image.fromarray(np.zeros((28, 90), dtype=np.uint8)).save(wide, format="PNG")
    batch = _batch(["malignant", "normal, benign"])
    batch["image"][1] = wide.getvalue()
    out = collate(batch)
    context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    start, end = tok.convert_tokens_to_ids("<img>"), tok.convert_tokens_to_ids("</img>")
    ids, labels = out["input_ids"], out["labels"]
    assert (ids[0] == context).sum() == 4 and (ids[1] == context).sum() == 16
    assert out["pixel_values"].shape[0] == 1 + 4
    for special in (context, start, end):
        assert torch.all(labels[ids == special] == IGNORE_INDEX)
    kept = labels[0][labels[0] != IGNORE_INDEX].tolist()
    assert tok.decode(kept) == "malignant<|im_end|>"
    # the prompt is what the model sees at inference, and the batch trains: a finite loss with gradients
    image = Image.open(io.BytesIO(batch["image"][0])).convert("RGB")
    seen = internvl.processor(images=[image], text=[internvl.chat_prompt(batch["prompt"][0])])["input_ids"][0]
    assert ids[0][: len(seen)].tolist() == list(seen)
    loss = internvl.model(**out).loss
    assert torch.isfinite(loss)
