import pytest

from sak.metrics import LOWER_IS_BETTER, PUBLISHED, SINGLE_TASK, delta_m


def _delta(dataset: str, model: str) -> float:
    return delta_m(dict(PUBLISHED[dataset][model].scores), SINGLE_TASK[dataset], LOWER_IS_BETTER)


@pytest.mark.parametrize(
    "dataset, model",
    [
        ("pascal_context", "SAK ViT-L"),
        ("pascal_context", "RADIO"),
        ("pascal_context", "MT baseline"),
        ("pascal_context", "InvPT"),
        ("pascal_context", "TaskPrompter"),
        ("pascal_context", "MLoRE"),
        ("nyud", "SAK ViT-L"),
        ("nyud", "RADIO"),
    ],
)
def test_delta_m_reproduces_the_published_value(dataset, model):
    assert _delta(dataset, model) == pytest.approx(
        PUBLISHED[dataset][model].delta_m, abs=0.005
    )  # printed to 2 decimals


def test_nyud_delta_m_includes_boundaries():
    sak = dict(PUBLISHED["nyud"]["SAK ViT-L"].scores)
    assert _delta("nyud", "SAK ViT-L") == pytest.approx(14.05, abs=0.005)
    without_edges = {k: v for k, v in sak.items() if k != "edges"}
    assert delta_m(without_edges, SINGLE_TASK["nyud"], LOWER_IS_BETTER) == pytest.approx(18.16, abs=0.005)


def test_published_sak_numbers():
    assert dict(PUBLISHED["pascal_context"]["SAK ViT-L"].scores) == {
        "semseg": 84.01,
        "parts": 76.99,
        "saliency": 84.65,
        "normals": 13.82,
        "edges": 76.27,
    }
    assert SINGLE_TASK["nyud"] == {"semseg": 54.19, "depth": 0.5560, "normals": 19.22, "edges": 78.09}
    assert PUBLISHED["pascal_context"]["single-task"].params_m == 1573


def test_delta_m_signs_and_errors():
    reference = {"semseg": 50.0, "depth": 0.5}
    assert delta_m({"semseg": 55.0, "depth": 0.5}, reference, ["depth"]) == pytest.approx(5.0)  # (+10 + 0) / 2
    assert delta_m({"depth": 0.4}, reference, ["depth"]) == pytest.approx(20.0)  # lower is better
    with pytest.raises(ValueError, match=r"\['normals'\]"):
        delta_m({"normals": 14.0}, reference, ["normals"])
    with pytest.raises(ValueError, match="no task"):
        delta_m({}, reference, [])


def test_rows_whose_saliency_maxf_is_another_measure_say_so():
    """InvPT's and TaskPrompter's meters threshold sigmoid(p); MLoRE's code is built on InvPT's (likely alike)."""
    notes = {name: row.note or "" for name, row in PUBLISHED["pascal_context"].items()}
    assert "thresholds sigmoid(p)" in notes["InvPT"] and "thresholds sigmoid(p)" in notes["TaskPrompter"]
    assert "likely the same (not checked" in notes["MLoRE"]
    assert not any("sigmoid" in notes[name] for name in ("SAK ViT-L", "RADIO", "MT baseline"))
