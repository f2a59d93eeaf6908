"""`--set` overrides as people type them: any number notation, booleans, null, lists, dicts, and errors
that say what to type instead (no processes)."""

import pytest

from trainer.config import apply_overrides, parse_value
from trainer.recipes import get_recipe


@pytest.mark.parametrize("raw,value", [
    ("1e-4", 1e-4), ("1E-4", 1e-4), ("5E3", 5000.0), (".5", 0.5), ("-2", -2), ("+3", 3), ("1e6", 1e6),
    ("0.05", 0.05), ("true", True), ("False", False), ("null", None), ("~", None), ("abc", "abc"),
    ("[8, 1e-3, .5]", [8, 1e-3, 0.5]), ("{lr: 1e-3, widths: [4, 8]}", {"lr": 1e-3, "widths": [4, 8]}),
    ("", ""), ("a: b: c", "a: b: c"),
])
def test_parse_value(raw, value):
    got = parse_value(raw)
    assert got == value and type(got) is type(value)


def test_numbers_in_any_notation_reach_typed_fields():
    cfg = get_recipe("digits_tiny")
    apply_overrides(cfg, ["optim.weight_decay=1e-4", "optim.lr=.5", "optim.max_steps=1e6", "optim.epochs=5E1",
                          "model.kwargs.dropout=1e-1", "model.kwargs.widths=[4, 8]", "engine.sync_bn=False",
                          "mlflow.experiment=null", "mlflow.tracking_uri=None", "checkpoint.resume=~",
                          "run_name=007", "data.path=1e3"])
    assert cfg.optim.weight_decay == 1e-4 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.optim.lr == 0.5
    assert cfg.optim.max_steps == 1_000_000 and type(cfg.optim.max_steps) is int
    assert cfg.optim.epochs == 50 and type(cfg.optim.epochs) is int
    assert cfg.model.kwargs == {**get_recipe("digits_tiny").model.kwargs, "dropout": 0.1, "widths": [4, 8]}
    assert cfg.engine.sync_bn is False and cfg.mlflow.experiment is None
    assert cfg.mlflow.tracking_uri is None and cfg.checkpoint.resume is None
    # a string field keeps the text as typed
    assert cfg.run_name == "007" and cfg.data.path == "1e3"


@pytest.mark.parametrize("bad,message", [
    ("optim.max_steps=many", r"optim.max_steps: expected an integer, got 'many' \(e.g. --set optim.max_steps=1000\)"),
    ("optim.epochs=1.5", r"optim.epochs: expected an integer, got 1.5"),
    ("optim.lr=fast", r"optim.lr: expected a number, got 'fast' \(e.g. --set optim.lr=1e-4\)"),
    ("engine.sync_bn=1", r"engine.sync_bn: expected true/false, got 1 \(e.g. --set engine.sync_bn=true\)"),
    ("optim.lr=true", r"optim.lr: expected a number, got True"),
])
def test_a_wrong_type_names_field_type_and_example(bad, message):
    with pytest.raises(TypeError, match=message):
        apply_overrides(get_recipe("digits_tiny"), [bad])


@pytest.mark.parametrize("bad,suggestion", [
    ("optim.weigth_decay=1e-4", "optim.weight_decay"), ("optimizer.lr=0.1", "optim.lr"),
    ("weight_decay=1e-4", "optim.weight_decay"), ("engine.presicion=fp32", "engine.precision"),
])
def test_an_unknown_key_suggests_the_closest(bad, suggestion):
    with pytest.raises(KeyError, match=f"did you mean '{suggestion}'"):
        apply_overrides(get_recipe("digits_tiny"), [bad])


def test_a_section_is_not_a_value():
    with pytest.raises(KeyError, match="names a section.*e.g. optim.global_batch=..."):
        apply_overrides(get_recipe("digits_tiny"), ["optim=3"])
