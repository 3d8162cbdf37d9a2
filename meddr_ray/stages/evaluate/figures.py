"""The evaluation's PNG plots (matplotlib, Agg backend), drawn in one Ray task by :func:`draw_all`:

- ``confusion_<dataset>.png``: the confusion matrix of each diagnosis dataset, one panel per mode;
- ``modes.png``: no-RAG / RAG / voting side by side for every dataset and Table 4 metric;
- ``retrieval_examples.png``: a few query images with their top-3 retrieved cases and labels (the paper's
  Figure 5). The index holds no images, only where each case's image lives (``source_file``, ``source_index``
  in its values); :class:`CaseImages` reads just those few images back from their sources.
"""

from __future__ import annotations

import io
import os
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from meddr_ray import storage
from meddr_ray.config import Config, DataConfig, SourceConfig
from meddr_ray.data import DataError, decode_image, load_image, sample_id
from meddr_ray.data.common import find_image, image_root, read_records
from meddr_ray.data.errors import where
from meddr_ray.retrieval.format import VALUES_FILE
from meddr_ray.stages.evaluate.schema import MODE_ORDER, MODE_TITLES, TABLE4_ROWS
from meddr_ray.storage import join_path

MODE_COLOURS = {"voting": "#9e9e9e", "no_rag": "#4c72b0", "rag": "#dd8452"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display in Ray workers
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: str, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    storage.write_bytes(join_path(out_dir, name), buf.getvalue())
    return name


def _short(text: Optional[str], width: int = 18, lines: int = 2) -> str:
    wrapped = textwrap.wrap(str(text or "-"), width) or ["-"]
    return "\n".join(wrapped[:lines]) + ("…" if len(wrapped) > lines else "")


def _file_name(dataset: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)


# ---------------------------------------------------------------------------------------------- plots


def confusion_plot(name: str, labels: Sequence[str], modes: Dict[str, Dict[str, Any]], out_dir: str) -> str:
    """One panel per mode: rows are the reference label, columns the predicted one."""
    plt = _plt()
    present = [m for m in MODE_ORDER if m in modes and modes[m].get("confusion") is not None]
    fig, axes = plt.subplots(1, len(present), figsize=(3.9 * len(present) + 0.8, 3.8), squeeze=False)
    ticks = [_short(x, 14, 2) for x in labels]
    for ax, mode in zip(axes[0], present):
        matrix = np.asarray(modes[mode]["confusion"], dtype=float)
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, f"{int(v)}", ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(ticks)), ticks, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_xlabel("predicted")
        acc = modes[mode].get("accuracy")
        ax.set_title(f"{MODE_TITLES[mode]}" + (f" (acc {acc:.3f})" if acc is not None else ""), fontsize=9)
    axes[0][0].set_ylabel("reference")
    fig.suptitle(f"{name}: confusion matrices (n={modes[present[0]].get('n')})", fontsize=10)
    return _save(fig, out_dir, f"confusion_{_file_name(name)}.png")


def modes_plot(datasets: Dict[str, Dict[str, Any]], rows: Dict[str, List[str]], out_dir: str) -> Optional[str]:
    """For each dataset, the Table 4 metrics it has, with one bar per mode (voting, w/o RAG, w/ RAG)."""
    plt = _plt()
    panels = []
    for name, d in datasets.items():
        numeric = lambda k: any(isinstance(s.get(k), (int, float)) for s in d["modes"].values())  # noqa: E731
        keys = [k for k in rows.get(d.get("task"), []) if numeric(k)]
        if keys:
            panels.append((name, d, keys))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 1.3 * sum(len(k) for _, _, k in panels) + 1.5), 3.4),
                             squeeze=False)  # fmt: skip
    for ax, (name, d, keys) in zip(axes[0], panels):
        modes = [m for m in MODE_ORDER if m in d["modes"]]
        width = 0.8 / max(1, len(modes))
        for j, mode in enumerate(modes):
            values = [d["modes"][mode].get(k) for k in keys]
            values = [v if isinstance(v, (int, float)) else 0.0 for v in values]
            ax.bar(np.arange(len(keys)) + (j - (len(modes) - 1) / 2) * width, values, width,
                   label=MODE_TITLES[mode], color=MODE_COLOURS[mode])  # fmt: skip
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name} ({d.get('task')}, n={d.get('n')})", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Retrieval-augmented diagnosis: voting / without / with retrieval", fontsize=10)
    return _save(fig, out_dir, "modes.png")


def retrieval_plot(cases: List[Dict[str, Any]], images: "CaseImages", manifest: dict, top_k: int,
                   out_dir: str) -> Tuple[Optional[str], List[str]]:  # fmt: skip
    """The paper's Figure 5: each query image (its reference and the student's answer with retrieval) next to
    its top-k retrieved cases (label, dataset, cosine similarity)."""
    plt = _plt()
    notes: List[str] = []
    wanted = sorted({i for c in cases for i in (c.get("neighbour_ids") or [])[:top_k]})
    located = neighbour_locations(manifest, wanted)
    fig, axes = plt.subplots(len(cases), top_k + 1, figsize=(2.1 * (top_k + 1), 2.5 * len(cases)), squeeze=False)
    for r, case in enumerate(cases):
        image, why = images.load(case["dataset"], case["id"], case.get("source_file"), case.get("source_index"))
        answer = case.get("pred_label") or case.get("output")
        _panel(axes[r][0], image, f"query ({case['dataset']})\nref: {_short(case.get('reference'), 22, 1)}\n"
                                  f"answer: {_short(answer, 22, 1)}", why, notes)  # fmt: skip
        ids = (case.get("neighbour_ids") or [])[:top_k]
        scores = case.get("neighbour_scores") or []
        for c in range(top_k):
            ax = axes[r][c + 1]
            if c >= len(ids):
                ax.axis("off")
                continue
            neighbour = located.get(ids[c]) or {}
            image, why = (None, f"case {ids[c]} is not in the index values") if not neighbour else images.load(
                neighbour.get("dataset"), ids[c], neighbour.get("source_file"), neighbour.get("source_index"),
                split=neighbour.get("split"))  # fmt: skip
            title = f"top-{c + 1}: {_short(neighbour.get('label') or neighbour.get('report'), 22, 1)}\n" \
                    f"{neighbour.get('dataset', '?')}, sim {scores[c]:.3f}"  # fmt: skip
            _panel(ax, image, title, why, notes)
    fig.suptitle(f"Top-{top_k} retrieved cases (index version {manifest['version']})", fontsize=10)
    return _save(fig, out_dir, "retrieval_examples.png"), sorted(set(notes))


def _panel(ax, image, title: str, why: Optional[str], notes: List[str]) -> None:
    if image is not None:
        ax.imshow(image)
    else:
        ax.text(0.5, 0.5, "image not\navailable", ha="center", va="center", fontsize=8, color="grey")
        notes.append(f"retrieval figure: {why}")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------------ case images


def neighbour_locations(manifest: dict, ids: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``id -> {dataset, split, label, report, source_file, source_index}`` for a few cases of the index version, read
    with a filter from its values file (only those columns; never the whole index into memory)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    if not ids:
        return {}
    fs, path = storage.resolve(join_path(manifest["path"], VALUES_FILE))
    ds = pads.dataset(path, format="parquet", filesystem=fs)
    wanted = ("id", "dataset", "split", "label", "report", "source_file", "source_index")
    columns = [c for c in wanted if c in ds.schema.names]
    out: Dict[str, Dict[str, Any]] = {}
    for row in ds.to_table(columns=columns, filter=pc.field("id").isin(list(ids))).to_pylist():
        out.setdefault(row["id"], row)
    return out


class CaseImages:
    """Reads a few cases' images back from their sources by ``(dataset, id, source_file, source_index)``.

    MedMNIST: the ``.npz`` array row (the split is the one whose sample id matches); DICOM: the file itself;
    image folder / VQA JSON / report files: the metadata record ``source_index`` names the image, resolved as the
    readers do (:mod:`meddr_ray.data`). The source's settings (image root, columns) come from the config entry
    with the same name.
    """

    def __init__(self, sources: Sequence[SourceConfig], data_cfg: DataConfig):
        self.sources = list(sources)
        self.limits = dict(max_bytes=data_cfg.max_image_bytes, max_pixels=data_cfg.max_image_pixels)
        self._arrays: Dict[Tuple[str, str], np.ndarray] = {}
        self._records: Dict[str, List[Dict[str, Any]]] = {}
        self._splits: Dict[str, List[str]] = {}

    def _source(self, dataset: Optional[str], source_file: str) -> Optional[SourceConfig]:
        named = [s for s in self.sources if s.name == dataset]
        return next((s for s in named if s.path == source_file), named[0] if named else None)

    def load(self, dataset: Optional[str], case_id: str, source_file: Optional[str], source_index: Optional[int],
             split: Optional[str] = None):  # fmt: skip
        """``(RGB image, None)`` or ``(None, why not)``. ``split``: the MedMNIST split the row is in (an indexed
        case records it; a test query is found by its sample id)."""
        if not source_file or source_index is None:
            return None, "the index does not record where its images live (built before it did: rebuild it)"
        src = self._source(dataset, source_file)
        lower = source_file.lower()
        fmt = "medmnist" if lower.endswith(".npz") else "dicom" if lower.endswith(".dcm") else (src and src.format)
        try:
            if fmt == "medmnist":
                return self._npz(dataset, case_id, source_file, int(source_index), split), None
            if fmt == "dicom":
                return self._decode(storage.read_bytes(source_file), source_file, dicom=True), None
            if src is None:
                return None, f"no source named {dataset!r} in the config to find {os.path.basename(source_file)} images"
            return self._from_record(src, int(source_index)), None
        except (DataError, OSError, KeyError, IndexError, ValueError) as exc:
            return None, f"{dataset} {where(source_file, source_index)}: {exc}"

    def _decode(self, data: bytes, place: str, dicom: Optional[bool] = None):
        png, _ = load_image(data, where=place, dicom=dicom, **self.limits)
        return decode_image(png, where=place, **self.limits)

    def _npz(self, dataset: Optional[str], case_id: str, path: str, index: int, split: Optional[str] = None):
        from PIL import Image

        if path not in self._splits:  # the npz's image arrays, by split, from its member names
            with np.load(io.BytesIO(storage.read_bytes(path)) if "://" in path else path) as npz:
                self._splits[path] = [k[: -len("_images")] for k in npz.files if k.endswith("_images")]
        for name in self._splits[path]:
            if name == split or (split is None and sample_id(str(dataset), name, index) == case_id):
                split = name
                if (path, split) not in self._arrays:
                    with np.load(io.BytesIO(storage.read_bytes(path)) if "://" in path else path) as npz:
                        self._arrays[(path, split)] = npz[f"{split}_images"]
                pixels = np.asarray(self._arrays[(path, split)][index])
                if pixels.ndim == 3 and pixels.shape[-1] == 1:
                    pixels = pixels[..., 0]
                return Image.fromarray(pixels).convert("RGB")
        raise KeyError(f"no split of {os.path.basename(path)} has case {case_id} at row {index}")

    def _from_record(self, src: SourceConfig, index: int):
        if src.path not in self._records:
            self._records[src.path] = read_records(src.path)
        rec = self._records[src.path][index]
        place = where(src.path, index)
        # the image field each reader reads (meddr_ray/data/image_folder.py, vqa_json.py, report_files.py)
        fields = [src.image_column] + (["img_name", "image_name", "image"] if src.format == "vqa_json" else [])
        ref = next((rec.get(f) for f in fields if rec.get(f) not in (None, "", [])), None)
        ref = ref[0] if isinstance(ref, list) else ref
        if not ref:
            raise KeyError(f"the record names no image (looked for {fields})")
        path = find_image(image_root(src), str(ref), place, True)
        return self._decode(storage.read_bytes(path), place, dicom=True if src.format == "dicom" else None)


def config_sources(cfg: Config) -> List[SourceConfig]:
    """Every source the config names: where queries (evaluate) and indexed cases (index, instruct) come from."""
    return [*cfg.evaluate.sources, *cfg.index.sources, *cfg.index.add_sources, *cfg.instruct.sources,
            *cfg.bootstrap.sources]  # fmt: skip


# ----------------------------------------------------------------------------------------------- the task


def draw_all(metrics: Dict[str, Any], cases: List[Dict[str, Any]], cfg: Config, out_dir: str,
             manifest: Optional[dict]) -> Dict[str, Any]:  # fmt: skip
    """Ray task: every plot of an evaluation; returns ``{"files": [...], "notes": [...]}``."""
    files: List[str] = []
    notes: List[str] = []
    for name, d in metrics["datasets"].items():
        if d.get("task") == "diagnosis" and any(s.get("confusion") is not None for s in d["modes"].values()):
            files.append(confusion_plot(name, d.get("labels") or [], d["modes"], out_dir))
    bars = modes_plot(metrics["datasets"], TABLE4_ROWS, out_dir)
    if bars:
        files.append(bars)
    if cases and manifest is not None:
        grid, more = retrieval_plot(cases, CaseImages(config_sources(cfg), cfg.data), manifest,
                                    cfg.evaluate.figure_top_k, out_dir)  # fmt: skip
        files.append(grid)
        notes += more
    elif manifest is None:
        notes.append("no retrieval figure: this evaluation ran without the index")
    return {"files": files, "notes": notes}
