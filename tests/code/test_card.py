"""The model card: one record from normalize to serving, refused whenever it is not exactly one."""

import json

import pytest

from imgclf.card import InputSpec, ModelCard, Normalization
from tests.conftest import make_card


def test_input_spec_json_round_trip_and_derived_shape():
    spec = InputSpec("RGB", [32, 48], "crop")
    assert spec.size == (32, 48) and spec.channels == 3 and spec.shape == (3, 32, 48)
    data = json.loads(json.dumps(spec.to_json()))
    assert data["shape"] == ["batch", 3, 32, 48] and data["dtype"] == "uint8" and data["layout"] == "NCHW"
    assert InputSpec.from_json(data) == spec


def test_input_spec_that_contradicts_itself_or_lacks_a_field_is_refused():
    data = InputSpec("L", (8, 8), "stretch").to_json()
    with pytest.raises(ValueError, match="inconsistent"):
        InputSpec.from_json({**data, "mode": "RGB"})  # the shape says 1 channel
    with pytest.raises(KeyError, match="resize"):
        InputSpec.from_json({k: v for k, v in data.items() if k != "resize"})  # no silent default
    with pytest.raises(ValueError, match="mode='CMYK'"):
        InputSpec("CMYK", (8, 8), "crop")
    with pytest.raises(ValueError, match="size"):
        InputSpec("L", (8, 0), "crop")
    with pytest.raises(ValueError, match="resize='fit'"):
        InputSpec("L", (8, 8), "fit")


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB")])
def test_channels_map_to_a_mode_in_one_place(channels, mode):
    assert InputSpec.for_shape((channels, 5, 7), "stretch") == InputSpec(mode, (5, 7), "stretch")
    with pytest.raises(ValueError, match="4 channels"):
        InputSpec.for_shape((4, 5, 7), "stretch")


def test_model_card_json_round_trip_ignores_the_sidecars_other_keys():
    card = make_card((3, 4, 6), n_classes=3, resize="crop")
    data = json.loads(json.dumps(card.to_json()))
    assert ModelCard.from_json(data) == card
    sidecar = {"name": "x", **data, "lineage": {"mlflow_run_id": "abc"}}  # as models/model.json holds it
    assert ModelCard.from_json(sidecar) == card


def test_model_card_refuses_what_no_model_can_be():
    card = make_card()
    with pytest.raises(ValueError, match="repeat"):
        ModelCard(("a", "a"), card.input, card.normalization)
    with pytest.raises(ValueError, match="at least two"):
        ModelCard(("only",), card.input, card.normalization)
    with pytest.raises(ValueError, match=r"mode .L. has 1"):
        ModelCard(card.classes, card.input, Normalization([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="positive"):
        Normalization([1.0], [0.0])
    with pytest.raises(TypeError, match="list of names"):
        ModelCard.from_json({**card.to_json(), "classes": "0123456789"})
