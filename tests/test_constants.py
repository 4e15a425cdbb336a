"""Each constant once: the canonical tables and that their users share them."""

from __future__ import annotations

import pytest
from tiny import FAMILIES, make_model

from langneurons import anatomy, compare, evaluate, neurons
from langneurons.align import lora_target_modules
from langneurons.arch import lora_targets


def test_shared_constants_are_one_object():
    assert evaluate.DEFAULT_SETS is neurons.DEFAULT_SETS
    assert anatomy.CLASSES is neurons.COUNTED_CLASSES and compare.COUNT_CLASSES is neurons.COUNTED_CLASSES
    assert set(neurons.COUNTED_CLASSES) == set(neurons.CLASS_NAMES) - {"none"}
    for spec in neurons.DEFAULT_SETS:
        assert neurons.parse_classes(spec)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_name_linear_layers_of_every_family(family):
    model = make_model(family, vocab_size=64)
    targets = lora_targets(model)
    assert targets and lora_target_modules(model) == targets
    leaves = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
              if type(mod).__name__ in ("Linear", "Conv1D") and not name.endswith("lm_head")}
    assert set(targets) <= leaves, (family, set(targets) - leaves)


def test_unknown_family_gets_all_linear():
    import torch

    class Custom(torch.nn.Module):
        config = type("C", (), {"model_type": "made-up"})()

    assert lora_targets(Custom()) is None and lora_target_modules(Custom()) == "all-linear"
