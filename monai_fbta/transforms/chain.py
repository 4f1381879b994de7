"""The FBTA training chain as one ``Compose`` (:func:`fbta_transforms`) and the dataset built on it (:class:`FBTADataset`).

The bundle's train.json declares the same chain by ``_target_``; this module is for Python users and tests.
It sits in ``transforms`` because it composes them: ``monai_fbta.data`` never imports ``monai_fbta.transforms``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monai_fbta._quiet import quiet_import

quiet_import("monai")

from monai.transforms import Compose, CopyItemsd  # noqa: E402

from monai_fbta.data.dataset import SlideDataset  # noqa: E402
from monai_fbta.data.store import SlideStore, StoreError  # noqa: E402
from monai_fbta.transforms.augment import make_e2e_augmentation  # noqa: E402
from monai_fbta.transforms.patches import ReadPatchesd  # noqa: E402
from monai_fbta.transforms.pseudobag import PseudoBagSampled  # noqa: E402
from monai_fbta.transforms.store import LoadStored  # noqa: E402

__all__ = ["fbta_transforms", "FBTADataset"]


def fbta_transforms(
    store_dir: str | os.PathLike,
    num_per_cluster: int = 1,
    num_clusters: int = 100,
    patch_size: int | None = None,
    augment: bool | Callable = True,
    load_patches: bool = True,
    load_full_bag: bool = True,
    cluster_seed: int = 0,
    cluster_method: str = "auto",
    backend: str = "auto",
) -> Compose:
    """The FBTA training chain: load the store, sample the pseudo-bag, read its patches, augment a copy.

    ``LoadStored -> PseudoBagSampled [-> LoadStored(pb_features only)] [-> ReadPatchesd -> CopyItemsd -> augment]``.
    ``augment``: ``True`` for :func:`make_e2e_augmentation` on ``pb_image``, ``False``, or a dictionary transform.
    ``patch_size``: output patch size (default: the store's ``patch_size``).
    """
    stored = ("coords", "features", "clusters") if load_full_bag else ("coords", "clusters")
    chain: list[Callable] = [
        LoadStored(store_dir, stored, num_clusters, cluster_seed, cluster_method),
        PseudoBagSampled(("features", "coords"), num_per_cluster=num_per_cluster, allow_missing_keys=True),
    ]
    if not load_full_bag:
        chain.append(LoadStored(store_dir, "features", index_key="pb_index", prefix="pb_"))
    if load_patches:
        chain += [ReadPatchesd("pb_coords", out_keys="pb_image_clean", out_size=patch_size, backend=backend),
                  CopyItemsd("pb_image_clean", names="pb_image")]
        augmentation = make_e2e_augmentation(keys="pb_image") if augment is True else (augment or None)
        if augmentation is not None:
            chain.append(augmentation)
    return Compose(chain)


def _open_checked(path: str, slide_id: str, row: Mapping[str, Any]) -> SlideStore:
    """The open store of ``row``, refused (:class:`StoreError`) unless complete (coords, features) with finite features."""
    missing = f"no complete feature store for slide {row.get('image')!r}; run extract_features first"
    try:
        store = SlideStore(path).open()
    except StoreError as err:
        raise StoreError(path, missing) from err
    try:
        complete = store.is_complete(required=("coords", "features"))
        finite = complete and store.is_complete(required=("features",), check_finite=True)
    except (OSError, KeyError) as err:
        store.close()
        raise StoreError(path, f"{missing} ({err})") from err
    if not finite:
        store.close()
        raise StoreError(path, missing if not complete else
                         f"features of slide {slide_id!r} contain NaN/inf: delete this store to re-extract it")
    return store


class FBTADataset(SlideDataset):
    """Slides of a datalist with their stores (from :func:`~monai_fbta.data.extraction.extract_features`) and the
    FBTA training transforms of :func:`fbta_transforms`; the stores are checked now (complete, finite).

    Args:
        rows: datalist rows: ``"image"`` (slide path), optional ``"slide_id"``, ``"label"``, ``"mpp"``.
        store_dir: folder of the ``<slide_id>.h5`` stores.
        seed: base seed of the per-item draws.
        cluster_on_init: cluster every slide now (main process), not lazily in the workers.
        transform_kwargs: :func:`fbta_transforms`' ``num_per_cluster`` (M), ``num_clusters`` (C), ``patch_size``,
            ``augment``, ``load_patches`` (``False``: vanilla MIL, no patches read), ``load_full_bag``,
            ``cluster_seed``, ``cluster_method``, ``backend``.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        store_dir: str | os.PathLike,
        seed: int = 0,
        cluster_on_init: bool = True,
        **transform_kwargs: Any,
    ) -> None:
        transform = fbta_transforms(store_dir, **transform_kwargs)
        super().__init__([dict(r) for r in rows], transform, seed)
        loader: LoadStored = transform.transforms[0]
        for row in self.data:
            slide_id, path = loader.locate(row)
            with _open_checked(path, slide_id, row) as store:  # one open per row: checks and clustering
                if cluster_on_init:
                    loader.clusters(store)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The datalist rows (``self.data``)."""
        return self.data
