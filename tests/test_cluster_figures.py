"""The clusters' contact sheet (lib.analysis.cluster_figures): a row per cluster, wrong members framed red."""
import matplotlib
import numpy as np
from conftest import write_image

from lib.analysis.cluster_figures import cluster_rows, plot_cluster_sheets, plot_threshold_curve
from lib.analysis.figures import RIGHT, WRONG

matplotlib.use("Agg")


def test_rows_largest_first_with_the_majority_as_right_and_wrong_members_red(tmp_path):
    labels = np.array(["a", "a", "b", "a", "c", "c", "d"])
    clusters = np.array([0, 0, 0, 0, 1, 1, -1])  # -1: not clustered, never shown
    rows = cluster_rows(labels, clusters)
    assert [(r["cluster"], r["majority"], r["wrong"], sorted(r["rows"])) for r in rows] == [
        (0, "a", 1, [0, 1, 2, 3]), (1, "c", 0, [4, 5])]
    paths = [write_image(tmp_path / f"{i}.jpg", size=(40, 40), seed=i) for i in range(len(labels))]
    fig = plot_cluster_sheets(paths, labels, clusters, max_per_row=3)
    first = fig.axes[0]
    assert first.spines["top"].get_edgecolor() == matplotlib.colors.to_rgba(WRONG), "the mistake is shown first"
    assert [ax.spines["top"].get_edgecolor() for ax in fig.axes[1:3]] == [matplotlib.colors.to_rgba(RIGHT)] * 2
    assert "4 photos, 1 wrong" in first.get_ylabel() and "+1 not shown" in first.get_ylabel()
    curve = [{"threshold": t, "ari": 1 - t, "ami": 1 - t, "pair_f1": 1 - t, "n_clusters": 3} for t in (0.1, 0.2)]
    assert plot_threshold_curve(curve, 0.1).axes
