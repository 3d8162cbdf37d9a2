import pytest

from meddr_ray.config import Config, ConfigError, available_presets, load_config


def test_presets_exist():
    assert {"tiny", "demo", "paper"} <= set(available_presets())


@pytest.mark.parametrize("preset", ["tiny", "demo", "paper"])
def test_every_preset_resolves(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.preset == preset
    assert "${" not in cfg.to_yaml()  # every interpolation resolved


def test_paper_preset_pins_its_training_values():
    cfg = load_config("paper")
    t = cfg.train
    assert (t.lora.r, t.lora.alpha, t.lora.dropout) == (16, 32, 0.05)
    assert set(t.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not t.lora.train_vision_tower and not t.lora.train_projector
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.weight_decay) == (1e-5, "cosine", 0.03, 0.05)
    assert (t.epochs, t.global_batch_size, t.precision, t.zero_stage, t.num_workers) == (2, 128, "bf16", 3, 16)
    # a native-format InternVL (InternVL3-38B-hf): no checkpoint code, its processor loads
    assert not cfg.student.trust_remote_code and cfg.student.build is None
    assert cfg.student.path.endswith("InternVL3-38B-hf") and cfg.bootstrap.pool.num_gpus == 2


def test_overrides_apply_with_types_and_list_indices():
    cfg = load_config("tiny", ["train.num_workers=1", "bootstrap.sources.0.limit=8", "index.sources.0.splits=[test]"])
    assert cfg.train.num_workers == 1
    assert cfg.bootstrap.sources[0].limit == 8
    assert cfg.index.sources[0].splits == ["test"]


def test_run_dir_defaults_per_preset_and_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["run_dir=runs/try1"])
    assert cfg.run_dir == str(tmp_path / "runs" / "try1")
    assert cfg.layout.bootstrap_dir == str(tmp_path / "runs" / "try1" / "bootstrap")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.nope=1", "train.nope"),
        ("nope=1", "nope"),
        ("train.num_workers=abc", "train.num_workers"),
        ("bootstrap.sources.0.bogus=1", "bootstrap.sources[0].bogus"),
        ("data.on_error=ignore", "data.on_error"),
        ("bootstrap.sources.0.format=xls", "bootstrap.sources[0].format"),
    ],
)
def test_bad_key_or_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config("tiny", [override])


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  num_workerz: 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*num_workerz"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("nosuchpreset")


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["train.num_workers"])


def test_every_preset_key_has_a_comment():
    from meddr_ray.config import PRESET_DIR

    for path in PRESET_DIR.glob("*.yaml"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.endswith(":") and not stripped.startswith("- "):
                continue  # a section header: its keys carry the comments
            assert "#" in line, f"{path.name}:{n} has no comment: {line!r}"


def test_tiny_fingerprint_is_pinned(tmp_path, monkeypatch):
    """Artifacts record ``Config.fingerprint()`` and stages redo work when it changes: a change to how the config
    is declared (types, validation) must leave it as it was. Paths are pinned so that the value is the same on
    every machine: the cache, the package folder and the working directory."""
    import meddr_ray.config as config_module
    from pathlib import Path

    monkeypatch.setenv("MEDDR_RAY_CACHE", "/meddr-cache")
    monkeypatch.setattr(config_module, "PACKAGE_DIR", Path("/meddr-pkg"))
    monkeypatch.chdir("/")
    cfg = load_config("tiny")
    assert cfg.run_dir == "/runs/tiny" and cfg.bootstrap.sources[0].path == "/meddr-pkg/assets/breastmnist.npz"
    assert cfg.fingerprint() == "c4a73fcc7425ddb9"


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.on_error=ignore", "key 'data.on_error': 'ignore' is not one of ['raise', 'skip']"),
        ("train.zero_stage=5", "key 'train.zero_stage': 5 is not one of [0, 1, 2, 3]"),
        ("evaluate.modes=[rag,votes]", "key 'evaluate.modes[1]': 'votes' is not one of ['no_rag', 'rag', 'voting']"),
        ("bootstrap.sources.0.task=segment", "key 'bootstrap.sources[0].task': 'segment' is not one of"),
    ],
)
def test_a_value_outside_a_fields_choices_names_the_key_and_the_choices(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert message in str(err.value)


def test_a_bad_choice_inside_a_preset_list_names_the_item(tmp_path):
    from meddr_ray.config import PRESET_DIR

    text = (PRESET_DIR / "tiny.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("format: medmnist", "format: xls", 2).replace("format: xls", "format: medmnist", 1))
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'instruct.sources\[0\].format': 'xls' is not one of"):
        load_config(str(bad))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["instruct.val_fraction=1.0"], r"key 'instruct.val_fraction': 1.0 is not in \[0, 1\)"),
        (["evaluate.modes=[]"], r"key 'evaluate.modes': empty"),
        (["evaluate.task_max_new_tokens={caption: 9}"], r"key 'evaluate.task_max_new_tokens.caption': not a task"),
        (["evaluate.figure_top_k=0"], r"'evaluate.figure_top_k' \(>= 1\)"),
        (["bootstrap.sources=[{name: b, format: medmnist, path: a.npz}, {name: b, format: medmnist, path: c.npz}]"],
         r"key 'bootstrap.sources\[1\]': source 'b' split 'train' is already bootstrap.sources\[0\]"),
        (["evaluate.sources=[{name: s, format: medmnist, path: a.npz}, "
          "{name: s, format: vqa_json, path: b.json, splits: [test]}]"],
         r"key 'evaluate.sources\[1\]': source 's' is a vqa source, but evaluate.sources\[0\]"),
    ],
)
def test_values_a_type_cannot_check_are_checked_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)
