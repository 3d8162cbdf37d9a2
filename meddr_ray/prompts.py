"""The MedDr paper's instruction templates, word for word, and this project's retrieval-context sentences.

Sources (unit tests pin every template to the paper's words, ``tests/unit/test_prompts.py``):
- bootstrapping: the paper, section 3.1;
- VQA: Appendix A.1; report generation: A.2; diagnosis: A.3; the diagnosis-guided report: A.4 ("Diagnosis-Guided
  Dataset"); image description: A.4 ("OpenI-Based Dataset").

The paper prints each sentence of a template on its own line; here the sentences are joined by one space, as the
section 3.1 prompt always was in this project (a choice the paper leaves open). The paper's answers read
"{Answer}.", "{Label}.", "{Medical Report}."; the training answer is the dataset's text as it is, without a full
stop added (a choice made here: MultiMedEval's scoring strips punctuation either way).

The paper does not give the words that put retrieved annotations into a prompt (section 3.3 says only that they
are "incorporated into the instruction as additional textual clues"): the ``RAG_*`` sentences are this project's,
placed after the task sentences and before the question.
"""

from __future__ import annotations

from typing import Optional, Sequence

SYSTEM = "You are a helpful medical assistant."

# The modality a template names for a sample whose source gives none: "a medical image" (the word the paper's
# templates use when they name no modality). Bootstrap, instruct and evaluate word their prompts with it.
DEFAULT_MODALITY = "medical"

# Section 3.1. The paper's "{Modality} image" has no article; one is added ("a breast ultrasound image", "an X-ray
# image") so that the sentence reads as the paper's other templates do.
BOOTSTRAP = (
    "You are a helpful medical assistant, and your task is report generation. "
    "You are given {modality} image and the diagnosis is {disease}. "
    "You need to provide a medical report consisting of findings and impressions."
)

# A.1. The paper's template names no modality.
VQA = (
    "You are a helpful medical assistant. "
    "You are required to answer the question based on the medical image. "
    "The question is {question}"
)

# A.2. The paper's report data (MIMIC-CXR, IU-Xray) are chest X-rays, so its template names "a chest x-ray image".
REPORT = (
    "You are a helpful medical assistant. "
    "Your task is report generation. "
    "You are given {modality} image, and you are required to generate a summary report about the image."
)
REPORT_DEFAULT_MODALITY = "a chest x-ray"

# A.3. "are:{Label Set}" has no space after the colon in the paper.
DIAGNOSIS = (
    "You are a helpful medical assistant. "
    "Your task is disease diagnosis. "
    "You are given a {modality} image. "
    "The possible diagnoses are:{label_set}."
)
# How the label set is joined is left open by the paper: "; " here, because a label may itself hold a comma
# (BreastMNIST's "normal, benign"), and a multi-label sample's labels are ", "-joined (the sample schema's
# ``label`` column): "effusion, nodule; mass" stays readable as two answers. The retrieved labels are joined the
# same way, one entry per retrieved image.
LABEL_SEPARATOR = ", "
LABEL_SET_SEPARATOR = "; "

# A.4, diagnosis-guided dataset: the instruction names the modality, never the diagnosis.
GUIDED_REPORT = (
    "You are a helpful medical assistant. "
    "Your task is report generation. "
    "You are given a {modality} image. "
    "You need to provide a medical report consisting of findings and impressions. "
    "Findings lists the observations and impression outlines the final diagnosis."
)

# A.4, OpenI-based dataset (no modality in the paper's template).
DESCRIPTION = (
    "You are a helpful medical assistant. "
    "You are given a medical image. "
    "You are required to generate a detailed description and analysis from a medical perspective based on the image."
)

# Retrieval context (this project's wording; see the module docstring).
RAG_DIAGNOSIS = "The diagnoses of the most similar images are: {labels}."
RAG_VQA = "Questions and answers about the most similar image: {text}"
RAG_REPORT = "The report of the most similar image is: {text}"


def _article(modality: str) -> str:
    """'a chest X-ray' / 'an ultrasound' for the section 3.1 template, which has no article of its own."""
    word = modality.split()[0] if modality.split() else modality
    # letters said with a vowel sound open acronyms and "X-ray": an MRI, an X-ray, an OCT
    spelled = len(word) > 1 and (word[1].isupper() or word[1] == "-")
    vowel = word[:1].lower() in "aeiou" or (spelled and word[:1] in "AEFHILMNORSX")
    return ("an " if vowel else "a ") + modality


def _sentence(text: str) -> str:
    """A question or context ending without punctuation gets the full stop the template puts after it."""
    text = text.strip()
    return text if text[-1:] in ".?!" else text + "."


def bootstrap_prompt(modality: str, labels: Sequence[str]) -> str:
    """Section 3.1: the teacher sees the diagnosis (every label of a multi-label sample)."""
    return BOOTSTRAP.format(modality=_article(modality), disease=LABEL_SEPARATOR.join(labels))


def guided_report_prompt(modality: str) -> str:
    """A.4: the instruction for a bootstrapped report; the diagnosis is NOT in it, the student must infer it."""
    return GUIDED_REPORT.format(modality=modality)


def vqa_prompt(question: str, context: Optional[str] = None) -> str:
    """A.1 ("The question is {Question}."), optionally with the most similar image's QA pairs before the question.
    A question that ends in "?" keeps it instead of the template's full stop."""
    base = VQA.format(question=_sentence(question))
    if not context:
        return base
    head, _, tail = base.rpartition("The question is ")
    return f"{head}{RAG_VQA.format(text=_sentence(context))} The question is {tail}"


def report_prompt(modality: Optional[str] = None, context: Optional[str] = None) -> str:
    """A.2, optionally with the most similar image's report. The paper's template says "a chest x-ray image";
    another modality, when a caller names one, takes its place (the paper has no report data of other kinds)."""
    named = modality and modality.strip().lower() != "chest x-ray"
    text = REPORT.format(modality=f"a {modality.strip()}" if named else REPORT_DEFAULT_MODALITY)
    return text + (f" {RAG_REPORT.format(text=_sentence(context))}" if context else "")


def diagnosis_prompt(modality: str, options: Sequence[str], retrieved_labels: Optional[Sequence[str]] = None) -> str:
    """A.3 with the dataset's label set, optionally with the labels of the top-k retrieved images."""
    return with_retrieved_labels(DIAGNOSIS.format(modality=modality, label_set=LABEL_SET_SEPARATOR.join(options)),
                                 retrieved_labels)  # fmt: skip


def with_retrieved_labels(prompt: str, retrieved_labels: Optional[Sequence[str]]) -> str:
    """A diagnosis prompt with the retrieved images' labels after it (unchanged without labels)."""
    if not retrieved_labels:
        return prompt
    return f"{prompt} {RAG_DIAGNOSIS.format(labels=LABEL_SET_SEPARATOR.join(retrieved_labels))}"


def description_prompt() -> str:
    """A.4, OpenI-based image description."""
    return DESCRIPTION
