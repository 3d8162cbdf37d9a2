"""The instruction templates of the MedDr paper and the retrieval-context sentences.

Wording sources (kept word for word; unit tests pin them):
- Bootstrapping: the paper, section 3.1.
- VQA (A.1), report generation (A.2) and diagnosis (A.3): the prompts the MedDr authors publish with their demo
  (``examples/instruction_prompt.txt`` of the MedDr repository), with the modality / question / options filled in.
- Diagnosis-guided report without the diagnosis (A.4): the section 3.1 sentence with the diagnosis clause removed,
  which is how the paper turns a bootstrapped sample into an instruction that does not leak the label.
- OpenI-style description (A.4) and the retrieval-context sentences (section 3.3): this project's wording, written
  to match the authors' style; the retrieved text is inserted before the task sentence.
"""

from __future__ import annotations

from typing import Optional, Sequence

SYSTEM = "You are a helpful medical assistant."

BOOTSTRAP = (
    "You are a helpful medical assistant, and your task is report generation. "
    "You are given {modality} image and the diagnosis is {disease}. "
    "You need to provide a medical report consisting of findings and impressions."
)

VQA = (
    "You are a helpful medical assistant. You are required to answer the following question based on the images "
    "about {modality}. Your answer should be concise. {question}"
)

REPORT = (
    "You are a helpful medical assistant. Your task is report generation. You are given a {modality} image. "
    "You need to provide a medical report consisting of findings and impressions. "
    "Findings list the observations in detail, and impressions outline the final diagnosis."
)

REPORT_NO_MODALITY = (
    "You are a helpful medical assistant. Your task is report generation. "
    "You need to provide a medical report consisting of findings and impressions. "
    "Findings list the observations, and impressions outline the final diagnosis."
)

DIAGNOSIS = (
    "You are a helpful medical assistant. Your task is disease diagnosis. You are given a {modality} image. "
    "The possible option are:{options}. The response should only contain one or more options."
)

DIAGNOSIS_NO_FINDING = " Only if no other options are available, you can choose 'No finding'."

GUIDED_REPORT = (
    "You are a helpful medical assistant, and your task is report generation. "
    "You are given {modality} image. "
    "You need to provide a medical report consisting of findings and impressions."
)

DESCRIPTION = (
    "You are a helpful medical assistant. Your task is image description. You are given a {modality} image. "
    "You need to describe the image in detail."
)

# Retrieval context (section 3.3): top-5 labels for diagnosis, the top-1 item's text for VQA and reports.
RAG_DIAGNOSIS = "The diagnoses of the most similar cases are: {labels}."
RAG_VQA = "A similar case answered a question as follows: {text}"
RAG_REPORT = "The report of the most similar case is: {text}"


def _article(modality: str) -> str:
    """'a chest X-ray' / 'an ultrasound' for the section 3.1 template, which has no article of its own."""
    word = modality.split()[0] if modality.split() else modality
    # letters said with a vowel sound open acronyms and "X-ray": an MRI, an X-ray, an OCT
    spelled = len(word) > 1 and (word[1].isupper() or word[1] == "-")
    vowel = word[:1].lower() in "aeiou" or (spelled and word[:1] in "AEFHILMNORSX")
    return ("an " if vowel else "a ") + modality


def bootstrap_prompt(modality: str, labels: Sequence[str]) -> str:
    """Section 3.1: the teacher sees the diagnosis (every label of a multi-label sample)."""
    return BOOTSTRAP.format(modality=_article(modality), disease=", ".join(labels))


def guided_report_prompt(modality: str) -> str:
    """A.4: instruction for a bootstrapped report; the diagnosis is NOT in it, the student must infer it."""
    return GUIDED_REPORT.format(modality=_article(modality))


def vqa_prompt(question: str, modality: Optional[str] = None, context: Optional[str] = None) -> str:
    """A.1, optionally with the retrieved answer of the nearest case before the question."""
    base = VQA.format(modality=modality or "medicine", question="").rstrip()
    ctx = f" {RAG_VQA.format(text=context.strip())}" if context else ""
    return f"{base}{ctx} {question.strip()}"


def report_prompt(modality: Optional[str] = None, context: Optional[str] = None) -> str:
    """A.2 (with or without the modality), optionally with the nearest case's report."""
    base = REPORT.format(modality=modality) if modality else REPORT_NO_MODALITY
    return base + (f" {RAG_REPORT.format(text=context.strip())}" if context else "")


def diagnosis_prompt(modality: str, options: Sequence[str], retrieved_labels: Optional[Sequence[str]] = None) -> str:
    """A.3 with the dataset's label set, optionally with the labels of the top-k retrieved cases."""
    text = DIAGNOSIS.format(modality=modality, options=",".join(options))
    if any(o.lower() == "no finding" for o in options):
        text += DIAGNOSIS_NO_FINDING
    if retrieved_labels:
        text += " " + RAG_DIAGNOSIS.format(labels=", ".join(retrieved_labels))
    return text


def description_prompt(modality: str) -> str:
    """A.4, OpenI-style image description."""
    return DESCRIPTION.format(modality=modality)
