"""ReftConfig / TrainConfig: parsing, every bad-value case with a clear message, JSON round trips."""

import json

import pytest
from mlx.utils import tree_flatten

from loreft import ConfigError, ReftConfig, TrainConfig, attach
from loreft.config import parse_layers, parse_positions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer, hidden-32 model folder."""
    from loreft.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("cfg") / "m", hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64)


def load(path):
    from mlx_lm import load as mlx_load

    return mlx_load(str(path))[0]


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "spec,n,expected",
    [
        ("all", None, None),
        ("all", 5, [0, 1, 2, 3, 4]),
        ("ALL", 3, [0, 1, 2]),
        ("3;9;18;24", None, [3, 9, 18, 24]),
        ("0-11", None, list(range(12))),
        ("2,4", None, [2, 4]),
        ("0-2;5", None, [0, 1, 2, 5]),
        ([4, 2, 2], None, [2, 4]),
        ((1, 0), 2, [0, 1]),
        (3, None, [3]),
    ],
)
def test_parse_layers(spec, n, expected):
    assert parse_layers(spec, n) == expected


@pytest.mark.parametrize("spec", ["", "a", "3-1", "1;x", [], [1.5], [True], True, None, "-1", [-2]])
def test_parse_layers_rejects(spec):
    with pytest.raises(ConfigError) as e:
        parse_layers(spec)
    assert e.value.field == "layers" and "layers=" in str(e.value)


@pytest.mark.parametrize("spec,n", [("4", 4), ("0;4", 4), ([0, 9], 4), ("2-5", 4), ("-1", 4)])
def test_layer_out_of_range_names_field_value_and_range(spec, n):
    with pytest.raises(ConfigError) as e:
        parse_layers(spec, n)
    msg = str(e.value)
    assert "layers" in msg and repr(spec) in msg
    if spec != "-1":
        assert "0..3" in msg  # the model's valid range


@pytest.mark.parametrize("spec,expected", [("f7+l7", (7, 7)), ("l1", (0, 1)), ("f1", (1, 0)), ("f3+l12", (3, 12)), (" f2 + l2 ", (2, 2))])
def test_parse_positions(spec, expected):
    assert parse_positions(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["x3", "f", "l0", "f3l3", "", "f0", "f0+l2", "f2+l0", "+", "f-1", "l", "7", "l2+f2", None, 7,
     "f2+", "+l2"],
)
def test_parse_positions_rejects(spec):
    with pytest.raises(ConfigError) as e:
        parse_positions(spec)
    msg = str(e.value)
    assert e.value.field == "positions" and f"positions={spec!r}" in msg and "f7+l7" in msg


# ---------------------------------------------------------------- ReftConfig.validate


def test_defaults_are_valid():
    assert ReftConfig().validate(hidden_size=64, num_layers=4).first_last == (7, 7)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(rank=0), "rank"),
        (dict(rank=-3), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(rank=True), "rank"),
        (dict(rank=64), "rank"),  # == hidden size
        (dict(rank=100), "rank"),  # > hidden size
        (dict(positions="f3l3"), "positions"),
        (dict(intervention="lora"), "intervention"),
        (dict(intervention="LoReFT"), "intervention"),
        (dict(act_fn="swish"), "act_fn"),
        (dict(dropout=-0.1), "dropout"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout="0.1"), "dropout"),
        (dict(dropout=True), "dropout"),
        (dict(layers="4"), "layers"),
        (dict(share_weights="yes"), "share_weights"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_reft_config_rejects(kwargs, field):
    cfg = ReftConfig(**kwargs)
    with pytest.raises(ConfigError) as e:
        cfg.validate(hidden_size=64, num_layers=4)
    assert e.value.field == field
    value = kwargs[field]
    assert f"{field}={value!r}" in str(e.value)


def test_error_messages_say_what_is_allowed():
    with pytest.raises(ConfigError, match="loreft, noreft, direft, nodireft, consreft, lobireft"):
        ReftConfig(intervention="lora").validate()
    with pytest.raises(ConfigError, match="relu.*silu.*tanh"):
        ReftConfig(act_fn="swish").validate()
    with pytest.raises(ConfigError, match=r">= 0.0 and <= 0.99"):
        ReftConfig(dropout=1.5).validate()
    with pytest.raises(ConfigError, match="hidden size 64"):
        ReftConfig(rank=64).validate(hidden_size=64)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "kwargs", [dict(layers="7"), dict(layers="0;4"), dict(rank=32), dict(rank=0), dict(positions="x3"), dict(intervention="x"),
               dict(act_fn="x"), dict(dropout=2.0)]
)
def test_attach_validates_before_touching_the_model(tiny, kwargs):
    model = load(tiny)
    blocks = list(model.layers)
    trainable = len(tree_flatten(model.trainable_parameters()))
    with pytest.raises(ConfigError):
        attach(model, ReftConfig(**kwargs))
    assert all(a is b for a, b in zip(model.layers, blocks)) and len(model.layers) == len(blocks)
    assert len(tree_flatten(model.trainable_parameters())) == trainable  # not frozen either


def test_attach_error_names_layers_value_and_range(tiny):
    with pytest.raises(ConfigError, match=r"layers='7'.*0\.\.3"):
        attach(load(tiny), ReftConfig(layers="7"))


# ---------------------------------------------------------------- JSON


def test_reft_config_json_round_trip():
    cfg = ReftConfig(layers=[1, 3], rank=8, positions="f5+l5", intervention="nodireft", share_weights=True,
                     dropout=0.05, act_fn="gelu", seed=7)
    text = json.dumps(cfg.to_dict())
    assert ReftConfig.from_dict(json.loads(text)) == cfg
    assert json.loads(text)["act_fn"] == "gelu"
    assert ReftConfig.from_dict(json.loads(json.dumps(ReftConfig(layers="3;9").to_dict()))).layers == "3;9"


def test_train_config_json_round_trip():
    cfg = TrainConfig(learning_rate=9e-4, lr_schedule="cosine", warmup_ratio=0.2, batch_size=8, epochs=3,
                      iters=0, grad_clip=1.0, dtype="float32", seed=5, truncation="drop")
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.validate() is back


@pytest.mark.parametrize("cls", [ReftConfig, TrainConfig])
def test_unknown_keys_rejected(cls):
    d = cls().to_dict()
    d["learning_rat"] = 1e-3
    with pytest.raises(ConfigError) as e:
        cls.from_dict(d)
    assert e.value.field == "learning_rat" and "unknown" in str(e.value)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(learning_rate=0), "learning_rate"),
        (dict(lr_schedule="exp"), "lr_schedule"),
        (dict(warmup_ratio=1.5), "warmup_ratio"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=2.0), "batch_size"),
        (dict(epochs=0, iters=0), "epochs"),
        (dict(truncation="right"), "truncation"),
        (dict(dtype="float64"), "dtype"),
        (dict(valid_fraction=0.95), "valid_fraction"),
    ],
)
def test_train_config_rejects(kwargs, field):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kwargs).validate()
    assert e.value.field == field
