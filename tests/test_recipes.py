"""Configs, recipe strings and the registry."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import sparsify_fx as sfx


def test_recipe_string_roundtrip():
    (cfg,) = sfx.parse_recipe("dropit:keep=0.25,exclude=['layer4.*'],skip_first_last=False")
    assert cfg == sfx.DropIT(keep=0.25, exclude=("layer4.*",), skip_first_last=False)
    assert sfx.parse_recipe(cfg.describe()) == [cfg]


def test_recipe_forms_resolve_to_the_same_configs():
    a = sfx.resolve_recipe(sfx.DropIT(keep=0.5))
    b = sfx.resolve_recipe("dropit:keep=0.5")
    c = sfx.resolve_recipe(["dropit:keep=0.5"])
    assert a == b == c


@pytest.mark.parametrize(
    "recipe,match",
    [
        ("nosuchpass:x=1", "unknown pass 'nosuchpass'"),
        ("dropit:keep", "expected key=value"),
        ("dropit:kep=0.1", "unexpected keyword"),
        ("", "empty recipe"),
        ([], "empty recipe"),
        (42, "a recipe is a pass config"),
        ([sfx.DropIT(), 3], "not a pass config"),
    ],
)
def test_bad_recipes_name_the_problem(recipe, match):
    with pytest.raises(sfx.RecipeError, match=match):
        sfx.resolve_recipe(recipe)


def test_invalid_config_value_from_string_names_field():
    with pytest.raises(sfx.ConfigError, match=r"DropIT.keep must be in \(0.0, 1.0\], got 2"):
        sfx.parse_recipe("dropit:keep=2")


def test_selection_reason_include_exclude_filter():
    cfg = sfx.DropIT(include=["layer*"], exclude="layer4.*", filter_fn=lambda n, m: "conv" in n)
    assert cfg.selection_reason("layer1.0.conv1") is None
    assert "include" in cfg.selection_reason("fc")
    assert "layer4" in cfg.selection_reason("layer4.0.conv1")
    assert "filter_fn" in cfg.selection_reason("layer1.0.bn1")


def test_unregistered_config_is_rejected():
    @dataclass(frozen=True)
    class Orphan(sfx.PassConfig):
        pass

    with pytest.raises(sfx.RecipeError, match="no pass is registered for Orphan"):
        sfx.resolve_recipe(Orphan())


def test_unknown_attribute_of_package():
    with pytest.raises(AttributeError, match="NoSuchThing"):
        sfx.NoSuchThing  # noqa: B018
