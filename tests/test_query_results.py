"""What the query browser shows for a query or an uploaded photo (lib.analysis.query_results), on a constructed run."""
import numpy as np
import pytest
from PIL import Image
from test_analysis import E, constructed_evaluation

from lib.analysis.query_results import ALL, photo_result, query_result, select_queries
from lib.retrieval.decide import Thresholds


@pytest.fixture
def ev(tmp_path):
    return constructed_evaluation(tmp_path / "data")


def test_photo_result_votes_like_the_recorded_decision(ev):
    """An uploaded photo whose embedding equals query 3's gets query 3's neighbours, vote and margin."""
    image = Image.new("RGB", (50, 40), "white")
    res = photo_result(ev, image, lambda im: ev.query_emb[3])
    recorded = query_result(ev, 3)
    assert res.label is None and res.pred == ev.queries["pred"].iat[3] == recorded.pred
    assert res.neighbours["path"].tolist() == recorded.neighbours["path"].tolist()
    np.testing.assert_allclose(res.neighbours["distance"], ev.distances[3], atol=1e-5)
    assert res.margin == pytest.approx(ev.queries["margin"].iat[3], abs=1e-6)
    strict = photo_result(ev, image, lambda im: ev.query_emb[3], Thresholds(min_margin=1.01))
    assert strict.verdict == "reshoot"
    far = photo_result(ev, image, lambda im: E[5], Thresholds(max_distance=1.0))
    assert far.verdict == "unclassifiable", "nothing in the gallery lies along axis 5"


def test_select_queries(ev):
    q = ev.queries
    assert select_queries(q).tolist() == list(range(8))
    assert select_queries(q, "a").tolist() == [0, 1]
    assert select_queries(q, errors_only=True).tolist() == [1, 3, 5, 6]
    assert select_queries(q, "b", errors_only=True).tolist() == [3]
    assert select_queries(q, ALL, errors_only=True).tolist() == [1, 3, 5, 6]


def test_padding_of_a_context_restricted_row_is_not_shown(ev):
    """A query whose context held only 2 photos has padding after them (index -1, distance inf): 2 neighbours, not
    the gallery's last row twice."""
    ev.neighbours[1, 2:], ev.distances[1, 2:] = -1, np.inf
    assert len(query_result(ev, 1).neighbours) == 2
