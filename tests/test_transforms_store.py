"""transforms/store.py: LoadStored reads a slide's stored arrays (all rows or only the indexed ones)."""

from __future__ import annotations

import pytest
import torch

from monai_fbta.data.store import StoreError

torch.set_num_threads(1)


def test_load_stored_reads_only_the_indexed_rows(stores):
    from monai_fbta.transforms import LoadStored

    rows, out = stores
    full = LoadStored(out, keys=("features", "coords"))(rows[0])
    index = torch.tensor([0, 3, 5])
    part = LoadStored(out, keys="features", index_key="pb_index")({**rows[0], "pb_index": index})
    assert "features" not in part and torch.equal(part["pb_features"], full["features"][index])
    assert full["features"].dtype == torch.float32 and full["coords"].dtype == torch.int64
    assert LoadStored(out, keys=("features", "nothing"), allow_missing_keys=True)(rows[0]).keys() >= {"features", "slide_id"}
    with pytest.raises(StoreError, match="no dataset 'nothing'"):
        LoadStored(out, keys="nothing")(rows[0])


def test_load_stored_refuses_features_of_another_extractor(tmp_path):
    """Two runs with other extractors sharing a cache folder: the second rewrote the first one's stores, which then
    trained and reported on the other extractor's features with rc 0. With ``features_of`` the store says so."""
    from conftest import tiny_encoder
    from slide_factory import TILING, tissue_slide

    from monai_fbta.data.extraction import encoder_fingerprint, extract_features
    from monai_fbta.transforms import LoadStored

    rows = [{"slide_id": "s0", "image": tissue_slide(tmp_path / "s0.tif")}]
    ours, theirs = tiny_encoder(0), tiny_encoder(1)
    extract_features(rows, tmp_path / "cache", ours, tiling_kwargs=TILING, batch_size=8, device="cpu")
    load = LoadStored(tmp_path / "cache", keys=["coords", "features"], features_of=encoder_fingerprint(ours))
    assert load(rows[0])["features"].ndim == 2
    extract_features(rows, tmp_path / "cache", theirs, tiling_kwargs=TILING, batch_size=8, device="cpu")  # another run
    with pytest.raises(StoreError, match="features of slide s0 were made with other weights than this run's frozen"):
        load(rows[0])
    assert LoadStored(tmp_path / "cache", keys=["coords", "features"])(rows[0])["features"].ndim == 2  # unchecked
