"""Adapter folders: exact round trip for every intervention, complete metadata, clear errors, atomic writes."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

import loreft
from loreft import ReftConfig, attach, load_adapter, read_adapter_config, save_adapter
from loreft.demo import build_tiny_model

KINDS = ["loreft", "noreft", "direft", "nodireft", "consreft", "lobireft"]
PYREFT_CLASS = {k: k.capitalize() + "Intervention" for k in KINDS}  # LoreftIntervention, ...


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-models")
    small = dict(num_heads=2, intermediate_size=64)
    return {
        "base": build_tiny_model(root / "base", hidden_size=32, num_layers=3, **small),
        "wider": build_tiny_model(root / "wider", hidden_size=48, num_layers=3, **small),
        "deeper": build_tiny_model(root / "deeper", hidden_size=32, num_layers=4, **small),
    }


def fresh(folders, name="base"):
    return load(str(folders[name]))[0]


def trained(model, cfg: ReftConfig, seed: int = 0):
    """Attach and move every parameter away from its seeded init, as training would."""
    reft = attach(model, cfg)
    rng = np.random.default_rng(seed)
    reft.load_parameters({k: v + mx.array(rng.normal(0, 0.2, v.shape).astype(np.float32)) for k, v in reft.parameters().items()})
    return reft


X = mx.array(np.random.default_rng(0).integers(10, 200, (2, 9)))
PROMPTS = [7, 5]


def edited_logits(model, reft) -> np.ndarray:
    reft.set_locations(reft.locations(PROMPTS))
    return np.array(model(X))


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_identical(folders, tmp_path, kind):
    act = "linear" if kind in ("consreft", "lobireft") else "gelu"
    dropout = 0.0 if kind == "consreft" else 0.1  # consreft has none
    cfg = ReftConfig(layers="0;2", rank=3, positions="f2+l3", intervention=kind, act_fn=act, dropout=dropout, seed=5)
    model = fresh(folders)
    reft = trained(model, cfg)
    want = edited_logits(model, reft)
    save_adapter(reft, tmp_path / "adapter", base_model="tiny-llama")

    model2 = fresh(folders)
    untrained = attach(fresh(folders), cfg)
    back = load_adapter(model2, tmp_path / "adapter")
    got = edited_logits(model2, back)
    assert np.array_equal(got, want)
    assert not np.array_equal(edited_logits(untrained.model, untrained), want)  # the weights, not the seed, did it
    assert back.config == cfg
    for k, v in reft.parameters().items():
        assert np.array_equal(np.array(back.parameters()[k]), np.array(v))


def test_round_trip_tied_weights(folders, tmp_path):
    cfg = ReftConfig(layers="all", rank=2, positions="f1+l1", share_weights=True)
    model = fresh(folders)
    reft = trained(model, cfg)
    save_adapter(reft, tmp_path / "a")
    model2 = fresh(folders)
    back = load_adapter(model2, tmp_path / "a")
    assert back.groups == ["shared"]
    assert np.array_equal(edited_logits(model2, back), edited_logits(model, reft))


def test_config_file_holds_everything_to_rebuild(folders, tmp_path):
    cfg = ReftConfig(layers="1", rank=4, positions="l2", intervention="direft", act_fn="silu", dropout=0.05)
    reft = trained(fresh(folders), cfg)
    save_adapter(reft, tmp_path / "a", base_model="org/tiny")
    meta = json.loads((tmp_path / "a" / "reft_config.json").read_text())
    assert meta == read_adapter_config(tmp_path / "a")
    assert ReftConfig.from_dict(meta["config"]) == cfg
    assert meta["intervention_class"] == "DireftIntervention"
    assert (meta["hidden_size"], meta["num_layers"], meta["rank"], meta["layers"]) == (32, 3, 4, [1])
    assert meta["weights_dtype"] == "float32"
    assert meta["act_fn"] == "silu" and meta["dropout"] == 0.05
    assert meta["base_model"] == "org/tiny"
    assert meta["library_version"] == loreft.__version__
    weights = mx.load(str(tmp_path / "a" / "adapter.safetensors"))
    assert set(weights) == set(reft.parameters()) and all(v.dtype == mx.float32 for v in weights.values())


def test_version_1_adapters_still_load(folders, tmp_path):
    """Adapters written before the ReftConfig key was renamed ("reft_config" -> "config") load the same."""
    reft = trained(fresh(folders), ReftConfig(layers="1", rank=2, positions="f1+l1", act_fn="silu"))
    save_adapter(reft, tmp_path / "a")
    file = tmp_path / "a" / "reft_config.json"
    meta = json.loads(file.read_text())
    meta["reft_config"] = meta.pop("config")
    meta["format_version"] = 1
    file.write_text(json.dumps(meta))
    model2 = fresh(folders)
    back = load_adapter(model2, tmp_path / "a")
    assert back.config == reft.config
    for k, v in reft.parameters().items():
        assert np.array_equal(np.array(back.parameters()[k]), np.array(v)), k


@pytest.mark.parametrize("kind", KINDS)
def test_class_name_recorded(folders, tmp_path, kind):
    reft = attach(fresh(folders), ReftConfig(layers="0", rank=2, positions="l1", intervention=kind))
    save_adapter(reft, tmp_path / kind)
    assert read_adapter_config(tmp_path / kind)["intervention_class"] == PYREFT_CLASS[kind]


@pytest.mark.parametrize("other,what", [("wider", "hidden size 48"), ("deeper", "4 layers")])
def test_loading_onto_another_shape_fails_clearly(folders, tmp_path, other, what):
    save_adapter(attach(fresh(folders), ReftConfig(layers="all", rank=2, positions="l1")), tmp_path / "a")
    model = fresh(folders, other)
    blocks = list(model.layers)
    with pytest.raises(ValueError, match=what) as e:
        load_adapter(model, tmp_path / "a")
    assert "hidden size 32" in str(e.value) and "3 layers" in str(e.value)
    assert all(a is b for a, b in zip(model.layers, blocks))  # nothing attached


def test_missing_config_file_is_a_clear_error(folders, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="reft_config.json"):
        load_adapter(fresh(folders), tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a ReFT adapter"):
        read_adapter_config(tmp_path / "nowhere")


def test_foreign_or_newer_config_is_refused(folders, tmp_path):
    save_adapter(attach(fresh(folders), ReftConfig(layers="0", rank=2, positions="l1")), tmp_path / "a")
    file = tmp_path / "a" / "reft_config.json"
    meta = json.loads(file.read_text())
    file.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        read_adapter_config(tmp_path / "a")
    file.write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="format"):
        read_adapter_config(tmp_path / "a")


def test_mismatched_weights_file_is_refused(folders, tmp_path):
    reft = attach(fresh(folders), ReftConfig(layers="0", rank=2, positions="l1"))
    save_adapter(reft, tmp_path / "a")
    weights = mx.load(str(tmp_path / "a" / "adapter.safetensors"))
    key = sorted(weights)[0]
    mx.save_safetensors(str(tmp_path / "a" / "adapter.safetensors"), {**weights, key: mx.zeros((5,))})
    with pytest.raises(ValueError, match="shape"):
        load_adapter(fresh(folders), tmp_path / "a")


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_save_leaves_previous_adapter_intact(folders, tmp_path):
    path = tmp_path / "adapter"
    first = trained(fresh(folders), ReftConfig(layers="0", rank=2, positions="l1"), seed=1)
    save_adapter(first, path, write_extras=lambda folder: (folder / "metrics.json").write_text("{}"))
    before = _snapshot(path)
    assert set(before) == {"adapter.safetensors", "reft_config.json", "metrics.json"}

    second = trained(fresh(folders), ReftConfig(layers="all", rank=3, positions="f1+l1"), seed=2)

    def crash(folder):
        (folder / "half_written.bin").write_bytes(b"x" * 100)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(second, path, write_extras=crash)
    assert _snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp or backup folder left behind

    # And the folder still loads as the first adapter.
    model = fresh(folders)
    back = load_adapter(model, path)
    assert np.array_equal(edited_logits(model, back), edited_logits(first.model, first))


def test_failed_first_save_leaves_nothing(folders, tmp_path):
    reft = attach(fresh(folders), ReftConfig(layers="0", rank=2, positions="l1"))

    def crash(folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_adapter(reft, tmp_path / "adapter", write_extras=crash)
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_an_existing_adapter(folders, tmp_path):
    path = tmp_path / "adapter"
    save_adapter(attach(fresh(folders), ReftConfig(layers="0", rank=2, positions="l1")), path)
    second = trained(fresh(folders), ReftConfig(layers="1", rank=3, positions="f1+l1", intervention="noreft"), seed=3)
    save_adapter(second, path)
    assert read_adapter_config(path)["config"]["intervention"] == "noreft"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    model = fresh(folders)
    assert np.array_equal(edited_logits(model, load_adapter(model, path)), edited_logits(second.model, second))


def test_consreft_adapter_recording_a_dropout_still_loads(folders, tmp_path):
    """Adapters written before dropout was refused for consreft (it has none) record one: they load, without it."""
    reft = trained(fresh(folders), ReftConfig(layers="0", rank=2, positions="l1", intervention="consreft"))
    save_adapter(reft, tmp_path / "a")
    file = tmp_path / "a" / "reft_config.json"
    meta = json.loads(file.read_text())
    meta["config"]["dropout"] = meta["dropout"] = 0.1
    file.write_text(json.dumps(meta))
    model = fresh(folders)
    back = load_adapter(model, tmp_path / "a")
    assert back.config.dropout == 0.0
    assert np.array_equal(edited_logits(model, back), edited_logits(reft.model, reft))
