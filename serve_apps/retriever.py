"""The ``Retriever`` deployment: the run's FAISS index (paper section 3.3) behind ``search(keys, k)``.

It serves the version ``<index dir>/CURRENT`` names and follows it: a background thread looks every
``serve.index_poll_s`` seconds and loads a new version (``meddr-ray index --add``) next to the old one, then swaps
it in with one assignment (:meth:`meddr_ray.retrieval.rag.Retriever.switch_to`), so no search is dropped or answered from
half of each. A ``user_config`` ``{"index_version": "v0003"}`` pins a version instead; ``null`` follows
``CURRENT`` again. A version built with another encoder is refused and the loaded one kept.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import ray
from ray import serve

from meddr_ray.config import Config
from meddr_ray.retrieval import rag
from meddr_ray.retrieval.format import IndexArtifactError
from meddr_ray.retrieval.store import current_version
from serve_apps import metrics
from serve_apps.errors import replica_id

log = logging.getLogger("ray.serve.meddr")  # under "ray.serve": Serve writes it to the replica logs

USER_CONFIG_KEYS = ("index_version",)


@serve.deployment(name="Retriever")
class Retriever:
    def __init__(self, cfg: Config):
        self._pinned: Optional[str] = cfg.serve.index_version
        self._index = rag.Retriever.from_config(cfg, version=self._pinned)
        self._poll_s = cfg.serve.index_poll_s
        self._refused: Optional[str] = None  # the last CURRENT we could not load, so it is logged once
        # A pin (reconfigure) and the follower's look at CURRENT are each one step under this lock: otherwise the
        # follower, waking while a pinned version loads, could switch back to CURRENT after the pin took effect.
        self._versions_lock = threading.Lock()
        self._stop = threading.Event()
        self._follower = threading.Thread(target=self._follow_current, name="index-follower", daemon=True)
        self._follower.start()
        self._report()

    # ------------------------------------------------------------------------------------------- requests

    def search(
        self, keys: np.ndarray, k: int, encoder_fingerprint: str, datasets: Optional[List[str]] = None
    ) -> Tuple[str, List[List[rag.Neighbor]]]:
        """The index version searched and the top-``k`` neighbours of each key (unit rows of the generator's
        vision encoder, whose fingerprint must be the index's: keys of another encoder are not comparable), among
        the images of ``datasets`` when given (ValueError naming the index's datasets for an unknown one)."""
        built_with = self._index.manifest["encoder_fingerprint"]
        if encoder_fingerprint != built_with:
            raise IndexArtifactError(
                f"the index was built with encoder {built_with}, the generator's is {encoder_fingerprint}: "
                "rebuild the index with `meddr-ray index` for this model"
            )
        return self._index.search_versioned(keys, k, datasets)

    def describe(self) -> Dict[str, Any]:
        """What this replica has loaded: version, vector count and dimension, the encoder fingerprint it was built
        with, the pinned version (None: following CURRENT), and its Serve replica id and actor."""
        manifest = self._index.manifest
        return {
            "version": manifest["version"],
            "count": int(manifest["count"]),
            "dim": int(manifest["dim"]),
            "encoder_fingerprint": manifest["encoder_fingerprint"],
            "pinned": self._pinned,
            "replica": replica_id(),
            "actor_id": ray.get_runtime_context().get_actor_id(),
        }

    # ---------------------------------------------------------------------------------------- versions

    def reconfigure(self, user_config: Dict[str, Any]) -> None:
        """``{"index_version": "v0003"}``: serve that version (loaded before the swap); ``null``: follow CURRENT."""
        unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"Retriever user_config: unknown keys {unknown}; known: {list(USER_CONFIG_KEYS)}")
        version = user_config.get("index_version") or None
        with self._versions_lock:
            if version:
                self._index.switch_to(version)  # raises (the old version and pin stay) if it cannot be loaded
            else:
                self._index.reload_if_changed()
            self._pinned = version
        self._report()

    def _follow_current(self) -> None:
        while not self._stop.wait(self._poll_s):
            with self._versions_lock:
                if not self._pinned:
                    self._follow_once()

    def _follow_once(self) -> None:
        try:
            if self._index.reload_if_changed():
                self._report()
        except (IndexArtifactError, OSError, ValueError) as exc:
            # keep answering from the loaded version; say once why the new one is not taken
            latest = current_version(self._index.index_dir)
            if latest != self._refused:
                log.error("retriever: not switching to index version %s: %s", latest, exc)
                self._refused = latest

    def _report(self) -> None:
        log.info("retriever: serving index version %s (%d vectors)", self._index.version, self._index.count)
        number = self._index.version.lstrip("v")
        metrics.index_version().set(float(number) if number.isdigit() else -1.0)

    # ------------------------------------------------------------------------------------------ health

    def check_health(self) -> None:
        if not self._follower.is_alive():
            raise RuntimeError("the thread that follows the index's CURRENT version has stopped")

    def __del__(self):
        self._stop.set()
