"""The index stage (paper section 3.3): the student's own vision encoder embeds every training image into a
versioned FAISS index; each image is one case whose value holds all of its annotations (diagnosis label, report,
question-answer pairs), so the top five neighbours are five different images, as the paper retrieves them.

``run_index(cfg)`` (:mod:`.stage`):

1. Inputs (:mod:`.inputs`): Ray Data reads ``index.sources`` (any source format) or, when empty, the training
   rows of the run's instruction Parquet (its validation rows are not part of the database). Each row is one
   annotation of an image; its case key is a hash of the dataset and the image bytes
   (:func:`meddr_ray.retrieval.format.case_key`), and a distributed ``groupby`` merges the annotations of each
   image into one case (:func:`.inputs.merge_case`).
2. Encoder (:mod:`.encoder`): an actor pool (``index.pool``; the model loaded once per actor) embeds the images
   and writes ``(values..., embedding)`` Parquet files to a work folder.
3. Shard plan (:mod:`.shard_plan`): the driver reads just the ``id``/``dataset``/``error``/``fingerprint``
   columns, sets failed rows aside, and cuts the good rows into ``index.num_shards`` contiguous shards.
4. Build tasks (:mod:`.build_tasks`, the steps themselves in :mod:`meddr_ray.retrieval.build_steps`): Ray tasks
   build one FAISS index per shard in parallel, row group by row group (IVF / IVF-PQ: each a copy of one template
   trained on a sample that is read row group by row group), and write it to a file; a last task merges the shard
   files -- IVF on disk, one shard at a time (:func:`meddr_ray.retrieval.build.merge_ivf_on_disk`) -- and
   publishes a new version (:func:`meddr_ray.retrieval.store.publish_staged`: temporary folder, rename, then
   ``CURRENT``, compare-and-swap on the version the build started from, idempotent per build id). HNSW cannot be
   merged, so it is built in that last task from the gathered vectors (refused above ``index.max_in_memory_gb``).
   The manifest counts the cases of each dataset, which retrieval can be scoped to (``rag.same_dataset``,
   ``rag.datasets``).

With ``index.add_sources`` (``meddr-ray index --add source.yaml``) the run appends the cases of those sources as a
new version: only images whose case key is not in the current version are embedded, and they are added to a copy
of the current index (IVF: with its trained quantizer, no retraining). The parent version stays as it was.

Resume: the embeddings of an interrupted run stay in ``<index_dir>/_work/<key>/`` (the key hashes the sources,
the model and adapter files, and the parent version); a re-run embeds only the rows not there yet.
"""

from meddr_ray.stages.index.stage import run_index

__all__ = ["run_index"]
