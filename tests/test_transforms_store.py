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
