"""benchmarks/pretrain_ssl.py: SimCLR's loss, and a few steps on real tiny slides writing loadable weights."""

from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def ssl():
    return load_benchmark("pretrain_ssl")


def test_nt_xent_is_low_for_matching_pairs_and_chance_for_equal_projections(ssl):
    z = torch.eye(8) * 10  # orthogonal projections, each view equal to its partner: cosine 1 vs 0 to the 14 others
    torch.testing.assert_close(ssl.nt_xent(z, z), torch.log(1 + 14 * torch.exp(torch.tensor(-1 / 0.2))))
    assert float(ssl.nt_xent(z, z.roll(1, 0))) > 5.0  # partners swapped: each view prefers a wrong candidate
    same = torch.ones(8, 4)
    torch.testing.assert_close(ssl.nt_xent(same, same), torch.log(torch.tensor(15.0)))  # 2B - 1 equal candidates


def test_pretraining_writes_weights_the_encoder_loads(ssl, tmp_path):
    from monai_fbta.networks.registry import build_encoder
    from monai_fbta.synthetic import generate_dataset

    slides = tmp_path / "slides"
    generate_dataset(slides, num_slides=2, num_classes=2, size=512, seed=3)
    out = tmp_path / "w" / "ssl.pt"
    report = ssl.main(["--out", str(out), "--slides-dir", str(slides), "--patch-size", "32", "--steps", "3",
                       "--batch-size", "8", "--windows-per-slide", "8"])
    assert report["windows"] == 16 and out.is_file()
    encoder = build_encoder("tiny_cnn", weights=str(out))
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    written = out.read_bytes()
    with pytest.raises(SystemExit, match="exists"):  # an existing weights file is not replaced without --overwrite
        ssl.main(["--out", str(out), "--slides-dir", str(slides), "--steps", "1"])
    assert out.read_bytes() == written


def test_a_folder_without_slides_is_refused_and_nothing_is_written_into_it(ssl, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("a user's file")
    with pytest.raises(FileNotFoundError, match="no .tif/.tiff/.svs slide"):
        ssl.main(["--out", str(tmp_path / "w.pt"), "--slides-dir", str(folder), "--steps", "1"])
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and not (tmp_path / "w.pt").exists()
