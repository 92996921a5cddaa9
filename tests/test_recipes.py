"""`rnnd train`: every recipe reaches its stated level and exports a bundle that checks out."""

from __future__ import annotations

import onnx
import pytest

from rnnd.daemon.bundle import graph_hash
from rnnd.daemon.runtime import BundleModel
from rnnd.export.recipes import RECIPES


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_reaches_its_level(rnnd, recipe_training, tmp_path, name):
    """`rnnd train NAME` (run once per session: the other tests serve the models it wrote)."""
    res, folder = recipe_training(name)
    assert res.code == 0, res.out + res.err
    assert res.err == ""  # --quiet: only the result line
    recipe = RECIPES[name]
    assert f"target {recipe.target_text}: ok" in res.out
    value = float(res.out.split(f"held-out {recipe.metric} = ")[1].split()[0])
    assert recipe.passes(value)
    bundle = BundleModel(folder / f"{name}.onnx")
    assert bundle.spec.model.name == name and bundle.spec.warmup_steps == recipe.warmup_steps
    assert bundle.spec.mode == recipe.mode
    assert bundle.self_check() <= 1e-4
    # The checkpoint re-exports through the plain CLI path (factory and spec come from it).
    res = rnnd("export", "--checkpoint", folder / f"{name}.pt", "--out", tmp_path / "again.onnx", "--quiet")
    assert res.code == 0, res.err
    # The same computation (graph hash); the content hash differs, as it also covers the provenance.
    again = BundleModel(tmp_path / "again.onnx")
    assert again.spec.content_hash != bundle.spec.content_hash
    assert graph_hash(onnx.load(str(tmp_path / "again.onnx"))) == graph_hash(onnx.load(str(folder / f"{name}.onnx")))


def test_list_and_unknown(rnnd):
    res = rnnd("train", "--list")
    assert res.code == 0 and all(name in res.out for name in RECIPES)
    res = rnnd("train", "nope")
    assert res.code == 1 and "choose one of" in res.err
