"""The index stage's encoder: an actor pool of the student's vision tower embeds one image per case and writes
``(values..., fingerprint, embedding)`` Parquet files (:mod:`meddr_ray.retrieval.embedding_files`); only
embeddings and text leave the actors, images never pass through the driver. The embedding is the tower's last
hidden state, mean-pooled and L2-normalised (the paper names no layer or pooling: this project's choice)."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from meddr_ray import storage
from meddr_ray.config import Config, DataConfig, ModelConfig
from meddr_ray.data.errors import where
from meddr_ray.stages.index.inputs import ROW_COLUMNS, one_case_per_image

log = logging.getLogger("meddr_ray.stages.index")


class Encoder:
    """Ray Data actor: loads the student's vision tower once (not the whole model: the key needs only the tower,
    :func:`meddr_ray.model.vision_encoder.load_vision_encoder`), embeds a batch of images, returns values +
    embedding rows."""

    def __init__(self, model_cfg: ModelConfig, adapter_dir: Optional[str], data_cfg: DataConfig):
        from meddr_ray.model.vision_encoder import load_vision_encoder

        self.model = load_vision_encoder(model_cfg, adapter_dir=adapter_dir)
        self.fingerprint = self.model.encoder_fingerprint()
        self.dim = self.model.embed_dim
        self.data_cfg = data_cfg
        from ray.util.metrics import Counter

        # the dashboard's embeddings/s (Prometheus ray_meddr_index_images_embedded_total; docs/operations.md)
        self.metric_tags = {"student": model_cfg.name}
        self.m_embedded = Counter("meddr_index_images_embedded", "Images the encoder embedded", tag_keys=("student",))
        self.m_failed = Counter("meddr_index_rows_failed", "Rows set aside as bad input", tag_keys=("student",))

    @staticmethod
    def _where(row: Dict[str, Any]) -> str:
        """Where a bad image came from, for its error: ``<file> row <n> (case <key>)``."""
        src = row.get("source_file") or row.get("dataset") or "?"
        idx = row.get("source_index")
        return f"{where(str(src), idx)} (case {row['id']})" if idx is not None else f"case {row['id']}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        from meddr_ray.data import DataError, decode_image

        rows = batch.select([c for c in ROW_COLUMNS]).to_pylist()
        images = batch.column("image").to_pylist()
        errors = [r["error"] for r in rows]
        decoded, positions = [], []
        for i, (row, data) in enumerate(zip(rows, images)):
            if errors[i] is not None:
                continue  # the reader already set this row aside (on_error=skip)
            try:
                if not data:
                    raise DataError(f"{self._where(row)}: no image to embed")
                decoded.append(
                    decode_image(
                        data,
                        max_bytes=self.data_cfg.max_image_bytes,
                        max_pixels=self.data_cfg.max_image_pixels,
                        where=self._where(row),
                    )
                )
                positions.append(i)
            except DataError as exc:
                if self.data_cfg.on_error == "raise":
                    raise
                errors[i] = str(exc)
        vectors = np.zeros((len(rows), self.dim), dtype=np.float32)
        if decoded:
            vectors[positions] = self.model.embed(decoded)
            self.m_embedded.inc(len(decoded), tags=self.metric_tags)
        failed = sum(e is not None for e in errors)  # by the reader or here: not embedded, written to failed/
        if failed:
            self.m_failed.inc(failed, tags=self.metric_tags)
        valid = np.zeros(len(rows), dtype=bool)
        valid[positions] = True
        embedding = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1)), self.dim, mask=pa.array(~valid)
        )
        out = {c: batch.column(c) for c in ROW_COLUMNS if c != "error"}
        out["error"] = pa.array(errors, pa.string())
        out["fingerprint"] = pa.array([self.fingerprint] * len(rows), pa.string())
        out["embedding"] = embedding
        return pa.table(out)


def weights_signature(paths: Sequence[Optional[str]]) -> List[Any]:
    """Names, sizes and times of the model and adapter files: part of the resume key, so embeddings made with
    other weights are never reused (they also carry the encoder fingerprint, checked before the build)."""
    sig: List[Any] = []
    for path in paths:
        if not path or not os.path.isdir(path):
            sig.append([path, None])
            continue
        for name in sorted(os.listdir(path)):
            st = os.stat(os.path.join(path, name))
            sig.append([name, st.st_size, st.st_mtime_ns])
    return sig


def valid_embedding_files(folder: str) -> List[str]:
    """Complete embedding files of an earlier attempt; a file cut short by a crash is deleted (its rows are
    embedded again)."""
    import pyarrow.parquet as pq

    good = []
    for path in storage.list_files(folder, ".parquet"):
        fs, p = storage.resolve(path)
        try:
            with fs.open_input_file(p) as f:
                pq.read_metadata(f)
            good.append(path)
        except Exception as exc:  # truncated footer, partial write
            log.warning("index: %s is incomplete (%s); its rows will be embedded again", path, exc)
            storage.remove(path)
    return good


_ID_FILTERS: Dict[str, Any] = {}  # this worker process's copy of the known case keys


def _drop_known_ids(batch: pa.Table, ids_ref) -> pa.Table:
    """Keep rows whose case key is not in the (object-store) array of known keys; cached per worker process."""
    import pyarrow.compute as pc
    import ray

    if isinstance(ids_ref, ray.ObjectRef):  # fetched once per worker process, not once per batch
        key = ids_ref.hex()
        if key not in _ID_FILTERS:
            _ID_FILTERS.clear()
            _ID_FILTERS[key] = ray.get(ids_ref)
        known = _ID_FILTERS[key]
    else:
        known = ids_ref
    return batch.filter(pc.invert(pc.is_in(batch.column("key"), value_set=known)))


def embed(cfg: Config, ds, out_dir: str, adapter: Optional[str], known_ids: pa.Array) -> int:
    """Run the encoder pool over the rows whose case key is not in ``known_ids``; returns how many were skipped."""
    import ray

    from meddr_ray.stages.runtime import map_with_actor_pool

    if len(known_ids):
        ds = ds.map_batches(_drop_known_ids, fn_args=(ray.put(known_ids),), batch_format="pyarrow")
    ds = one_case_per_image(ds)
    pool = cfg.index.pool
    cpus = ray.cluster_resources().get("CPU", 0)
    if pool.min_actors * pool.num_cpus + 1 > cpus:
        # Ray Data would wait forever: the read and write tasks need a CPU the actors never free
        log.warning(
            "index: the encoder pool reserves %s of the cluster's %s CPUs, leaving none for reading and writing; "
            "raise ray.num_cpus (logical CPUs) or lower index.pool.min_actors / num_cpus",
            pool.min_actors * pool.num_cpus, cpus,
        )  # fmt: skip
    embedded = map_with_actor_pool(ds, Encoder, pool, model_cfg=cfg.student, adapter_dir=adapter, data_cfg=cfg.data)
    embedded.write_parquet(out_dir)
    return len(known_ids)
