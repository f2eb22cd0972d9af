"""One layer map for init and router distillation (issue 16 item 9): the teacher layers a student
layer is initialised from and the teacher MoE layer its router is distilled from come from
pipeline/layer_map.py, checked against positions worked out by hand."""

from __future__ import annotations

import pytest

from pipeline.layer_map import LayerSource, layer_map, nearest_layer_map
from pipeline.router import uniform_layer_map

# (L_S, L_T) → (init sources by hand from p = s·(L_T−1)/(L_S−1), router layer per student layer)
CASES = {
    (1, 2): ([LayerSource(0, 1, 0.5)], [1]),  # one layer: the middle, p = 0.5
    (1, 4): ([LayerSource(1, 2, 0.5)], [2]),  # p = 1.5
    (1, 9): ([LayerSource(4, 5, 0.0)], [4]),  # p = 4, one teacher layer (the router used to take 8)
    (2, 4): ([LayerSource(0, 1, 0.0), LayerSource(3, 3, 0.0)], [0, 3]),
    (3, 6): ([LayerSource(0, 1, 0.0), LayerSource(2, 3, 0.5), LayerSource(5, 5, 0.0)], [0, 3, 5]),
    (5, 12): ([LayerSource(0, 1, 0.0), LayerSource(2, 3, 0.75), LayerSource(5, 6, 0.5),
               LayerSource(8, 9, 0.25), LayerSource(11, 11, 0.0)], [0, 3, 6, 8, 11]),
    (4, 4): ([LayerSource(s, min(s + 1, 3), 0.0) for s in range(4)], [0, 1, 2, 3]),
    (3, 2): ([LayerSource(0, 1, 0.0), LayerSource(0, 1, 0.5), LayerSource(1, 1, 0.0)], [0, 1, 1]),
}


@pytest.mark.parametrize("shape", list(CASES))
def test_init_and_router_maps_match_hand_positions(shape):
    sources, router = CASES[shape]
    assert layer_map(*shape) == sources
    assert nearest_layer_map(*shape) == router
    assert uniform_layer_map(*shape) == router, "router distillation must use the init stage's map"


@pytest.mark.parametrize("shape", list(CASES))
def test_router_layer_is_one_of_the_blended_layers_with_the_larger_weight(shape):
    for src, layer in zip(layer_map(*shape), uniform_layer_map(*shape)):
        weights = dict(src.weights())
        assert layer in weights and weights[layer] == max(weights.values())


def test_bad_layer_counts_are_a_value_error():
    with pytest.raises(ValueError, match="layer counts must be positive"):
        layer_map(0, 4)
