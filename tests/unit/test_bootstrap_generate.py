"""The teacher's two-step generation (findings, then the impression) on the offline tiny model; no Ray."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from meddr_ray import prompts
from meddr_ray.stages.bootstrap import continuation_prefix, teacher_generate, trim_continuation
from meddr_ray.config import GenerationConfig, load_config
from meddr_ray.model import load_model


def test_continuation_prefix_cuts_after_the_last_full_sentence():
    assert continuation_prefix("Findings: a mass. It is oval. The margin", "Impression:") == (
        "Findings: a mass. It is oval.\nImpression:"
    )
    assert continuation_prefix("Findings: a mass with", "Impression:") == "Findings: a mass with\nImpression:"


def test_trim_continuation_stops_at_a_blank_line_and_a_sentence_end():
    assert trim_continuation(" Likely benign. Follow up in 6 months. Medical\n\nReport: x") == (
        " Likely benign. Follow up in 6 months."
    )
    assert trim_continuation(" likely benign") == " likely benign"


@pytest.fixture(scope="module")
def teacher():
    return load_model(load_config("tiny").teacher)  # built offline into the test cache on first use


def _batch(n=3):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).convert("RGB") for _ in range(n)]
    texts = [prompts.bootstrap_prompt("breast ultrasound", [lab]) for lab in ("malignant", "normal, benign", "x")[:n]]
    return images, texts


def test_per_sample_prefixes_match_the_model_generate(teacher):
    images, texts = _batch()
    gen = GenerationConfig(max_new_tokens=6, response_prefix="Findings:")
    same = teacher.generate(images, texts, gen)
    mine = teacher.generate(images, texts, dataclasses.replace(gen, response_prefix=""), prefixes=["Findings:"] * 3)
    assert mine == same  # one code path per prefix: the same tokens as VisionLanguageModel.generate


def test_a_report_without_impression_is_continued_with_the_header(teacher):
    images, texts = _batch()
    gen = GenerationConfig(max_new_tokens=6, response_prefix="Findings:")
    first = teacher.generate(images, texts, gen)
    assert all("Impression:" not in o["text"] for o in first)  # the random tiny model never writes one
    both = teacher_generate(teacher, images, texts, gen, impression_prefix="Impression:", impression_max_new_tokens=5)
    for one, two in zip(first, both):
        assert two["text"].startswith("Findings:") and "\nImpression:" in two["text"]
        assert one["tokens"] < two["tokens"] <= one["tokens"] + 5
    assert teacher_generate(teacher, images, texts, gen) == first  # without the option: one generate only


def test_sampling_is_reproducible_per_batch_seed(teacher):
    from meddr_ray.stages.parts import batch_seed

    images, texts = _batch()
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.0, response_prefix="Findings:")
    seed = batch_seed(0, ["b", "a"])
    assert seed == batch_seed(0, ["a", "b"]) != batch_seed(1, ["a", "b"])
    one = teacher_generate(teacher, images, texts, gen, seed=seed)
    assert teacher_generate(teacher, images, texts, gen, seed=seed) == one
    assert teacher_generate(teacher, images, texts, gen, seed=seed + 1) != one


def test_drop_cut_sentence_keeps_every_section():
    from meddr_ray.stages.bootstrap import drop_cut_sentence

    text = "Findings: a mass. Impression: benign. This can be confirmed as"
    assert drop_cut_sentence(text) == "Findings: a mass. Impression: benign."
    assert drop_cut_sentence("Findings: a mass. Impression: likely benign and") == (
        "Findings: a mass. Impression: likely benign and"  # cutting would empty the impression
    )
    assert drop_cut_sentence("Findings: done.") == "Findings: done."
