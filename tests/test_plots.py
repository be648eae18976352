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


def test_layer_view_shows_an_intruder_from_the_fast_path():
    """The heatmap and spectra of a layer come from the base spectrum and the structured top-k:
    a strong update along a mix of W0's two weakest directions is row 0, matching no base
    vector; the others are W0's own top vectors (the identity)."""
    from intruder_ext.detection import layer_view
    from intruder_ext.layers import Layer
    from intruder_ext.detection import spectrum_source

    g = torch.Generator().manual_seed(1)
    U0, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    V0, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    W0 = U0 @ torch.diag(torch.arange(16, 0, -1.0)) @ V0.T
    y = (U0[:, 14] + U0[:, 15]) / 2 ** 0.5
    z = (V0[:, 14] + V0[:, 15]) / 2 ** 0.5
    layer = Layer("l", "linear", (16, 16), rank=1, scale=1.0, read_base=lambda: W0,
                  read_factors=lambda: (100 * y[:, None], z[None, :]))
    view = layer_view(layer, spectrum_source(False), [0], k=8)
    assert view.similarity.shape == (8, 8) and view.intruders == [0]
    assert view.similarity[0].max() < 1e-4
    torch.testing.assert_close(view.similarity[1:, :7], torch.eye(8)[:7, :7], atol=1e-4, rtol=0)
    torch.testing.assert_close(view.sigma_base, torch.arange(16, 8, -1.0), rtol=1e-5, atol=0)
    assert view.sigma_tuned[0] == pytest.approx(100 + (1 + 2) / 2, rel=1e-4)  # + y^T W0 z


def test_count_vs_epsilon():
    assert plots.count_vs_epsilon([[0.1, 0.6], [0.3, 0.9, 0.05]], [0.2, 0.5, 1.0]) == [2, 3, 5]


def test_every_plot_writes_a_png(tmp_path):
    g = torch.Generator().manual_seed(2)
    S0, S = torch.linspace(5, 1, 16), torch.linspace(9, 1, 16)
    files = [
        plots.plot_similarity(torch.rand(10, 10, generator=g), "sim", tmp_path / "a.png", [0, 3]),
        plots.plot_counts_per_layer(["l0.q", "l0.v", "l1.q"], [2, 0, 1], "per layer",
                                    tmp_path / "b.png"),
        plots.plot_count_vs_epsilon({"r=1": [0, 1, 3], "full": [0, 0, 1]}, [0.2, 0.5, 0.8],
                                    "eps", tmp_path / "c.png", null=(0.16, 0.21)),
        plots.plot_spectrum(S0, S, [1], "spec", tmp_path / "d.png"),
        plots.plot_bars(["a", "b"], [3, 0], "n", "bars", tmp_path / "e.png"),
        plots.plot_grouped_bars(["a", "b"], {"tuned": [0.9, 0.8], "mitigated": [0.85, None]},
                                "acc", "grouped", tmp_path / "f.png"),
        plots.plot_series({"LoRA": ([1, 2, 4], [0, 0, 0]), "rsLoRA": ([1, 4], [1, 3])}, "rank",
                          "intruders", "series", tmp_path / "g.png", logx=True,
                          hlines={"full": 0}, counts=True),
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
