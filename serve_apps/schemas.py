"""Request and response bodies of the task endpoints (``/v1/diagnose``, ``/v1/vqa``, ``/v1/report``), as pydantic
models: FastAPI validates every request against them before any handler runs.

Requests are strict (a number sent as a string, or a field the model does not name, is refused) and bounded
(label sets, question length, ``top_k``): these bounds are part of the API, the same on every deployment. Byte and
pixel limits on images are deployment settings (``serve.max_image_bytes`` ...), checked by :mod:`serve_apps.images`.
"""

from __future__ import annotations

from typing import Annotated, List, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

MAX_LABELS = 100
"""Most labels a diagnosis request may offer."""
MAX_TOP_K = 50
"""Most neighbours a diagnosis request may retrieve."""
MAX_QUESTION_CHARS = 4000
"""Longest VQA question (characters)."""
MAX_RAG_DATASETS = 50
"""Most datasets a request may scope its retrieval to."""

Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Modality = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Question = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUESTION_CHARS)]
ImageData = Annotated[str, StringConstraints(min_length=1)]
DatasetName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image: ImageData = Field(
        description="The image: base64, or a data URL (data:image/png;base64,...). PNG, JPEG or DICOM."
    )
    modality: Optional[Modality] = Field(
        None, description="Imaging modality for the prompt ('breast ultrasound'); a DICOM's Modality tag otherwise."
    )
    rag: Optional[bool] = Field(None, description="Retrieval on or off for this request (default: serve.rag).")
    rag_datasets: Optional[List[DatasetName]] = Field(
        None,
        min_length=1,
        max_length=MAX_RAG_DATASETS,
        description="Retrieve only images of these datasets (the index's source names, e.g. ['breastmnist']); "
        "default: the config's rag.datasets, else the whole index. A name the index does not hold is refused.",
    )


class DiagnoseRequest(_Request):
    labels: List[Label] = Field(
        min_length=2, max_length=MAX_LABELS, description="The possible diagnoses; the answer is one of them."
    )
    top_k: Optional[int] = Field(
        None, ge=1, le=MAX_TOP_K, description="Neighbours retrieved, quoted and voted over (rag.top_k_diagnosis)."
    )

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: List[str]) -> List[str]:
        seen = set()
        for label in labels:
            if label.lower() in seen:
                raise ValueError(f"label {label!r} is given twice")
            seen.add(label.lower())
        return labels


class VQARequest(_Request):
    question: Question = Field(description="The question about the image.")


class ReportRequest(_Request):
    pass


class QAPair(BaseModel):
    question: str
    answer: str


class Evidence(BaseModel):
    """A retrieved image and its annotations, which a clinician can check: why the answer says what it says."""

    id: str = Field(description="The case: one image of one dataset in the index.")
    score: float = Field(description="Cosine similarity of its image to the query image, in [-1, 1].")
    dataset: Optional[str]
    label: Optional[str] = Field(description="Its diagnosis label(s), if it has one.")
    report: Optional[str] = Field(description="Its report, if it has one.")
    qa: List[QAPair] = Field(description="Its question-answer pairs (VQA data), if any.")


class DiagnoseResponse(BaseModel):
    diagnosis: str = Field(description="The model's answer mapped to one of the given labels.")
    text: str = Field(description="The model's answer as it wrote it.")
    vote: Optional[str] = Field(
        description="Majority label of the retrieved cases (the voting baseline); null without retrieval."
    )
    evidence: List[Evidence]


class VQAResponse(BaseModel):
    answer: str
    evidence: List[Evidence]


class ReportResponse(BaseModel):
    report: str
    evidence: List[Evidence]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "meddr-ray"


class ModelList(BaseModel):
    object: str = "list"
    data: List[ModelCard]
