"""User errors raised inside Ray workers still end as one CLI line (no Ray cluster: the wrappers are built here)."""

from __future__ import annotations

from ray.exceptions import RayError, RayTaskError

from meddr_ray.cli import _error_message
from meddr_ray.retrieval.format import IndexArtifactError


class _ActorDied(RayError):
    """Like ActorDiedError for a failed actor constructor: the original error exists only as remote text."""

    def __str__(self):
        return ("The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker.__init__()"
                "\x1b[39m\n  File \"meddr_ray/retrieval/store.py\", line 548, in _check_file\n"
                "    raise IndexArtifactError(\n"
                "meddr_ray.retrieval.format.IndexArtifactError: /r/index/v1/index.faiss is truncated or corrupt: 100 bytes")


def test_an_index_error_from_an_actor_constructor_is_one_line():
    assert _error_message(_ActorDied()) == "/r/index/v1/index.faiss is truncated or corrupt: 100 bytes"


def test_an_index_error_from_a_task_is_its_own_message():
    error = IndexArtifactError("/r/index/v1/manifest.json: the index was built with encoder a")
    wrapped = RayTaskError("load", "Traceback ...\nIndexArtifactError: ...", error).as_instanceof_cause()
    assert isinstance(wrapped, IndexArtifactError)  # Ray's dual class: its own text is the remote traceback
    assert _error_message(wrapped) == "/r/index/v1/manifest.json: the index was built with encoder a"


def test_a_bug_inside_ray_stays_a_traceback():
    class _Crashed(RayError):
        def __str__(self):
            return "Traceback ...\nKeyError: 'x'"

    assert _error_message(_Crashed()) is None
