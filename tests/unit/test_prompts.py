"""Every instruction template pinned to the paper's words (../shared/paper/meddr-paper.md: section 3.1 and
Appendix A). The expected strings below are copied from the paper; where the paper prints a template over several
lines, its sentences are joined by one space (the choice documented in meddr_ray/prompts.py)."""

import pytest

from meddr_ray import prompts


def test_bootstrap_template_is_section_3_1():
    assert prompts.bootstrap_prompt("breast ultrasound", ["malignant"]) == (
        "You are a helpful medical assistant, and your task is report generation. You are given a breast ultrasound "
        "image and the diagnosis is malignant. You need to provide a medical report consisting of findings and "
        "impressions."
    )


def test_bootstrap_multi_label_lists_every_label_and_picks_the_article():
    text = prompts.bootstrap_prompt("X-ray", ["effusion", "nodule"])
    assert "You are given an X-ray image and the diagnosis is effusion, nodule." in text


def test_vqa_template_is_appendix_a1():
    assert prompts.vqa_prompt("What modality is used to take this image") == (
        "You are a helpful medical assistant. "
        "You are required to answer the question based on the medical image. "
        "The question is What modality is used to take this image."
    )
    # a question mark stands in for the template's full stop
    assert prompts.vqa_prompt("Is the lung healthy?").endswith("The question is Is the lung healthy?")


def test_report_template_is_appendix_a2():
    expected = (
        "You are a helpful medical assistant. "
        "Your task is report generation. "
        "You are given a chest x-ray image, and you are required to generate a summary report about the image."
    )
    assert prompts.report_prompt() == expected
    assert prompts.report_prompt("chest X-ray") == expected  # the paper's own words for its chest X-ray data
    assert prompts.report_prompt("knee MRI") == expected.replace("chest x-ray", "knee MRI")


def test_diagnosis_template_is_appendix_a3():
    assert prompts.diagnosis_prompt("breast ultrasound", ["malignant", "normal, benign"]) == (
        "You are a helpful medical assistant. "
        "Your task is disease diagnosis. "
        "You are given a breast ultrasound image. "
        "The possible diagnoses are:malignant; normal, benign."
    )


def test_guided_report_template_is_appendix_a4_and_hides_the_diagnosis():
    text = prompts.guided_report_prompt("breast ultrasound")
    assert text == (
        "You are a helpful medical assistant. "
        "Your task is report generation. "
        "You are given a breast ultrasound image. "
        "You need to provide a medical report consisting of findings and impressions. "
        "Findings lists the observations and impression outlines the final diagnosis."
    )
    assert "diagnosis is" not in text


def test_description_template_is_appendix_a4_openi():
    assert prompts.description_prompt() == (
        "You are a helpful medical assistant. "
        "You are given a medical image. "
        "You are required to generate a detailed description and analysis from a medical perspective based on the "
        "image."
    )


@pytest.mark.parametrize(
    "template",
    [prompts.VQA, prompts.REPORT, prompts.DIAGNOSIS, prompts.GUIDED_REPORT, prompts.DESCRIPTION, prompts.BOOTSTRAP],
)
def test_every_template_opens_as_the_paper_does(template):
    assert template.startswith("You are a helpful medical assistant")


def test_retrieved_context_follows_the_task_sentences():
    diag = prompts.diagnosis_prompt("chest X-ray", ["normal", "pneumonia"], ["pneumonia"] * 4 + ["normal"])
    assert diag.startswith(prompts.diagnosis_prompt("chest X-ray", ["normal", "pneumonia"]))
    assert diag.endswith(
        "The diagnoses of the most similar images are: pneumonia; pneumonia; pneumonia; pneumonia; normal."
    )
    vqa = prompts.vqa_prompt("Is this a CT?", context="Q: Which organ? A: lung")
    assert vqa.endswith(
        "Questions and answers about the most similar image: Q: Which organ? A: lung. The question is Is this a CT?"
    )
    rep = prompts.report_prompt(context="No acute disease")
    assert rep == prompts.report_prompt() + " The report of the most similar image is: No acute disease."


def test_a_sample_without_modality_is_a_medical_image():
    from meddr_ray.prompts import DEFAULT_MODALITY

    assert "You are given a medical image." in prompts.guided_report_prompt(DEFAULT_MODALITY)
    assert "You are given a medical image and the diagnosis" in prompts.bootstrap_prompt(DEFAULT_MODALITY, ["x"])
