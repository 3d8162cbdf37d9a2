"""Which pipeline steps a re-run may reuse: each step's fingerprint covers its config and every step before it."""

from meddr_ray.config import load_config
from meddr_ray.pipeline import STEPS, step_fingerprints


def _changed(*overrides):
    base = step_fingerprints(load_config("tiny"))
    other = step_fingerprints(load_config("tiny", list(overrides)))
    return [s for s in STEPS if base[s] != other[s]]


def test_fingerprints_are_stable_for_the_same_config():
    assert step_fingerprints(load_config("tiny")) == step_fingerprints(load_config("tiny"))


def test_a_change_invalidates_its_step_and_every_later_one_only():
    assert _changed("bootstrap.generation.max_new_tokens=7") == STEPS
    assert _changed("teacher.dtype=bfloat16") == STEPS
    assert _changed("train.max_steps=3") == ["train", "index", "evaluate"]
    assert _changed("index.num_shards=3") == ["index", "evaluate"]
    assert _changed("rag.top_k_diagnosis=3") == ["evaluate"]


def test_settings_that_do_not_shape_artifacts_change_nothing():
    assert _changed("serve.port=9000") == []
    assert _changed("ray.num_cpus=2") == []
