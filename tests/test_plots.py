"""Plots and the Markdown writer: numbers in, valid PNGs and links out."""

import pytest
import torch

plots = pytest.importorskip("intruder_ext.plots")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    import matplotlib.image
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100


def test_similarity_matrix_of_a_weight_with_itself_is_the_identity():
    W = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    sim = plots.similarity_matrix(W, W, k=8)
    assert sim.shape == (8, 8)
    torch.testing.assert_close(sim, torch.eye(8), atol=1e-5, rtol=0)


def test_similarity_matrix_sees_an_intruder():
    g = torch.Generator().manual_seed(1)
    U0, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    V0, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    W0 = U0 @ torch.diag(torch.arange(16, 0, -1.0)) @ V0.T
    # add 100 * y z^T with y, z in the span of W0's two weakest singular pairs: the top singular
    # vector of W is y, orthogonal to every top-8 singular vector of W0
    y = (U0[:, 14] + U0[:, 15]) / 2 ** 0.5
    z = (V0[:, 14] + V0[:, 15]) / 2 ** 0.5
    sim = plots.similarity_matrix(W0, W0 + 100 * torch.outer(y, z), k=8)
    assert sim.shape == (8, 8)
    assert sim[0].max() < 1e-4
    torch.testing.assert_close(sim[1:, :7], torch.eye(8)[:7, :7], atol=1e-4, rtol=0)


def test_similarity_matrix_rejects_different_shapes():
    with pytest.raises(ValueError, match=r"similarity_matrix: W0 and W must have the same shape "
                                         r"\(got \(4, 3\) and \(3, 4\)\)"):
        plots.similarity_matrix(torch.zeros(4, 3), torch.zeros(3, 4))


def test_count_vs_epsilon():
    assert plots.count_vs_epsilon([[0.1, 0.6], [0.3, 0.9, 0.05]], [0.2, 0.5, 1.0]) == [2, 3, 5]


def test_every_plot_writes_a_png(tmp_path):
    g = torch.Generator().manual_seed(2)
    W0, W = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    files = [
        plots.plot_similarity(plots.similarity_matrix(W0, W, 10), "sim", tmp_path / "a.png", [0, 3]),
        plots.plot_counts_per_layer(["l0.q", "l0.v", "l1.q"], [2, 0, 1], "per layer",
                                    tmp_path / "b.png"),
        plots.plot_count_vs_epsilon({"r=1": [0, 1, 3], "full": [0, 0, 1]}, [0.2, 0.5, 0.8],
                                    "eps", tmp_path / "c.png"),
        plots.plot_spectrum(plots.singular_values(W0), plots.singular_values(W), [1], "spec",
                            tmp_path / "d.png"),
        plots.plot_bars(["a", "b"], [3, 0], "n", "bars", tmp_path / "e.png"),
        plots.plot_grouped_bars(["a", "b"], {"tuned": [0.9, 0.8], "mitigated": [0.85, None]},
                                "acc", "grouped", tmp_path / "f.png"),
    ]
    for f in files:
        assert_png(f)


def test_markdown_report_links_images_relative_to_itself(tmp_path):
    (tmp_path / "img").mkdir()
    png = plots.plot_bars(["a"], [1], "n", "t", tmp_path / "img" / "x.png")
    table = plots.markdown_table(["name", "value"], [["a", 0.123456], ["b", 2]])
    assert table.splitlines() == ["| name | value |", "|---|---|", "| a | 0.1235 |", "| b | 2 |"]
    path = plots.write_markdown(tmp_path / "r.md", "Title", [("Summary", table)], [("X", png)])
    text = open(path, encoding="utf-8").read()
    assert text.startswith("# Title\n")
    assert "## Summary" in text and "| a | 0.1235 |" in text
    assert "![X](img/x.png)" in text
