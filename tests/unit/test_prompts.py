"""The paper's templates, pinned word for word."""

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


def test_guided_report_hides_the_diagnosis():
    text = prompts.guided_report_prompt("breast ultrasound")
    assert "diagnosis is" not in text
    assert text == (
        "You are a helpful medical assistant, and your task is report generation. You are given a breast ultrasound "
        "image. You need to provide a medical report consisting of findings and impressions."
    )


def test_vqa_template_a1():
    assert prompts.vqa_prompt("What is the poorly cohesive tumor in the retina seen abutting?", "pathology") == (
        "You are a helpful medical assistant. You are required to answer the following question based on the images "
        "about pathology. Your answer should be concise. What is the poorly cohesive tumor in the retina seen abutting?"
    )


def test_report_templates_a2():
    assert prompts.report_prompt("retinography") == (
        "You are a helpful medical assistant. Your task is report generation. You are given a retinography image. "
        "You need to provide a medical report consisting of findings and impressions. Findings list the observations "
        "in detail, and impressions outline the final diagnosis."
    )
    assert prompts.report_prompt(None) == (
        "You are a helpful medical assistant. Your task is report generation. You need to provide a medical report "
        "consisting of findings and impressions. Findings list the observations, and impressions outline the final "
        "diagnosis."
    )


def test_diagnosis_template_a3():
    options = ["No finding", "Osteophytes", "Disc space narrowing"]
    assert prompts.diagnosis_prompt("spine x-ray", options) == (
        "You are a helpful medical assistant. Your task is disease diagnosis. You are given a spine x-ray image. "
        "The possible option are:No finding,Osteophytes,Disc space narrowing. The response should only contain one "
        "or more options. Only if no other options are available, you can choose 'No finding'."
    )
    assert "No finding" not in prompts.diagnosis_prompt("breast ultrasound", ["malignant", "normal, benign"])


def test_rag_context_goes_into_each_task():
    diag = prompts.diagnosis_prompt("chest X-ray", ["normal", "pneumonia"], ["pneumonia"] * 4 + ["normal"])
    assert diag.endswith("The diagnoses of the most similar cases are: pneumonia, pneumonia, pneumonia, pneumonia, normal.")
    vqa = prompts.vqa_prompt("Is this a CT?", "radiology", context="Yes")
    assert vqa.endswith("A similar case answered a question as follows: Yes Is this a CT?")
    rep = prompts.report_prompt("chest X-ray", context="No acute disease.")
    assert rep.endswith("The report of the most similar case is: No acute disease.")


def test_description_template():
    assert prompts.description_prompt("chest X-ray").startswith("You are a helpful medical assistant. Your task is image description.")
