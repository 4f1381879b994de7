"""data/dataset.py: SlideDataset with the transform chain train.json declares gives FBTADataset's items
(FBTADataset itself: test_chain.py)."""

from __future__ import annotations

import torch

from monai_fbta.transforms.chain import FBTADataset

torch.set_num_threads(1)


def test_slide_dataset_with_the_declared_chain_gives_fbta_items(stores):
    """The chain train.json declares (LoadStored, PseudoBagSampled, ReadPatchesd, CopyItemsd, augmentations) in a
    SlideDataset gives FBTADataset's items, re-seeded per (seed, epoch, index)."""
    from monai.transforms import Compose, CopyItemsd

    from monai_fbta.data.dataset import SlideDataset
    from monai_fbta.transforms import LoadStored, PseudoBagSampled, RandContrastNoised, RandFlipRotate90d, RandHEDJitterd, ReadPatchesd

    rows, out = stores
    chain = Compose([
        LoadStored(out, num_clusters=5),
        PseudoBagSampled(num_per_cluster=2),
        ReadPatchesd("pb_coords", out_keys="pb_image_clean"),
        CopyItemsd("pb_image_clean", names="pb_image"),
        Compose([RandHEDJitterd("pb_image"), RandFlipRotate90d("pb_image"), RandContrastNoised("pb_image")]),
    ])
    declared, built = SlideDataset(rows, chain, seed=7), FBTADataset(rows, out, num_per_cluster=2, num_clusters=5, seed=7)
    for epoch in (0, 3):
        declared.set_epoch(epoch)
        built.set_epoch(epoch)
        for i in range(len(rows)):
            a, b = declared[i], built[i]
            assert a.keys() == b.keys() and a["slide_id"] == b["slide_id"] and a["label"] == b["label"] == i
            for key in ("features", "coords", "clusters", "pb_index", "pb_features", "pb_image_clean", "pb_image"):
                assert torch.equal(a[key], b[key]), (epoch, i, key)
            assert not torch.equal(a["pb_image"], a["pb_image_clean"])
    assert a["coords_meta_dict"]["patch_size"] == 64 and a["pb_coords_meta_dict"] == a["coords_meta_dict"]
