"""Per-slide HDF5 store: round trip, lazy features, completeness checks, atomicity, TRIDENT/CLAM."""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from monai_fbta.data import store
from monai_fbta.data.store import (
    StoreError,
    add_arrays,
    open_features,
    read_array,
    read_coords,
    read_trident_coords,
    store_is_complete,
    store_path,
    write_coords,
)

N, D = 12, 8
ATTRS = {"patch_size": 256, "patch_level": 0, "target_mpp": 0.5, "mpp_source": "metadata"}
FP = {"encoder": "resnet18", "patch_size": 224}


@pytest.fixture()
def h5(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "slide.h5"
    coords = rng.integers(0, 10_000, (N, 2))
    write_coords(path, coords, ATTRS, fingerprint={"tiling": 1})
    feats = rng.standard_normal((N, D)).astype(np.float32)
    add_arrays(path, {"features": feats, "clusters": np.arange(N) % 3}, fingerprint=FP)
    return path, coords, feats


def test_round_trip(h5):
    path, coords, feats = h5
    got, attrs = read_coords(path)
    np.testing.assert_array_equal(got, coords)
    assert got.dtype == np.int64
    assert attrs == {**ATTRS, "fingerprint": {"tiling": 1}}
    f16 = read_array(path, "features")
    assert f16.dtype == np.float16
    np.testing.assert_allclose(f16, feats, atol=2e-3)
    np.testing.assert_array_equal(read_array(path, "clusters"), np.arange(N) % 3)
    assert sorted(os.listdir(path.parent)) == ["slide.h5"]  # no temp files left


def test_lazy_features(h5):
    path, _, feats = h5
    with open_features(path) as f:
        assert f.shape == (N, D) and len(f) == N and f.attrs["fingerprint"] == FP
        np.testing.assert_array_equal(f[[5, 1, 5, -1]], f[()][[5, 1, 5, N - 1]])
        np.testing.assert_allclose(f[2:4], feats[2:4], atol=2e-3)
        assert f[np.zeros(N, bool)].shape == (0, D)
        with pytest.raises(IndexError):
            f[[N]]
    with pytest.raises(StoreError, match="no dataset 'missing'"):
        open_features(path, "missing")


def test_store_is_complete(h5, tmp_path):
    path, _, _ = h5
    assert store_is_complete(path)
    assert store_is_complete(path, ("coords", "features", "clusters"), expect_attrs={**ATTRS, "fingerprint": {"tiling": 1}})
    assert not store_is_complete(path, expect_attrs={"patch_size": 224})
    assert not store_is_complete(path, expect_attrs={"fingerprint": {"tiling": 2}})
    assert store_is_complete(path, expect_dataset_attrs={"features": {"fingerprint": FP}}, check_finite=True)
    assert not store_is_complete(path, expect_dataset_attrs={"features": {"fingerprint": {**FP, "patch_size": 256}}})
    assert not store_is_complete(path, ("coords", "features", "attention"))
    assert not store_is_complete(tmp_path / "absent.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    assert not store_is_complete(tmp_path / "junk.h5")
    with h5py.File(path, "a") as f:  # inconsistent shapes / NaN written behind our back
        f["features"][0, 0] = np.nan
        del f["clusters"]
        f["clusters"] = np.arange(N - 1)
    assert store_is_complete(path)
    assert not store_is_complete(path, check_finite=True)
    assert not store_is_complete(path, ("coords", "clusters"))


def test_add_arrays_validates_and_is_atomic(h5, monkeypatch):
    path, coords, _ = h5
    before = path.read_bytes()
    with pytest.raises(StoreError, match="slide.h5.*'features' has shape"):
        add_arrays(path, {"features": np.zeros((N + 1, D))})
    real_set_attrs = store._set_attrs

    def fail_on_second(obj, attrs, fingerprint):
        if obj.name == "/attention":
            raise RuntimeError("disk on fire")
        real_set_attrs(obj, attrs, fingerprint)

    monkeypatch.setattr(store, "_set_attrs", fail_on_second)
    with pytest.raises(RuntimeError, match="disk on fire"):  # features rewritten, then a failure
        add_arrays(path, {"features": np.ones((N, D)), "attention": np.ones(N)})
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["slide.h5"]
    with pytest.raises(StoreError, match="store not found"):
        add_arrays(path.parent / "nope.h5", {"features": np.ones((N, D))})
    with pytest.raises(StoreError, match=r"\[N, 2\]"):
        write_coords(path, np.zeros((3, 3)), {})
    assert path.read_bytes() == before


def test_read_trident_and_clam(tmp_path):
    coords = np.array([[0, 0], [512, 0], [0, 512]], np.int64)
    trident = tmp_path / "trident.h5"
    with h5py.File(trident, "w") as f:  # as TRIDENT writes them
        ds = f.create_dataset("coords", data=coords)
        ds.attrs.update(patch_size=256, level0_magnification=40, target_magnification=20, overlap=0, name="s1")
    got, attrs = read_trident_coords(trident)
    np.testing.assert_array_equal(got, coords)
    assert attrs["format"] == "trident" and attrs["patch_size_level0"] == 512 and attrs["name"] == "s1"
    clam = tmp_path / "clam.h5"
    with h5py.File(clam, "w") as f:  # as CLAM's create_patches_fp writes them
        ds = f.create_dataset("coords", data=coords)
        ds.attrs.update(patch_level=1, patch_size=256, downsample=np.array([4.0, 4.0]), level_dim=np.array([2000, 1500]))
    _, attrs = read_trident_coords(clam)
    assert attrs["format"] == "clam" and attrs["patch_size_level0"] == 1024
    other = tmp_path / "other.h5"
    write_coords(other, coords, {"foo": 1})
    with pytest.raises(StoreError, match="other.h5.*neither TRIDENT nor CLAM"):
        read_trident_coords(other)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_store_files_get_umask_permissions_like_other_outputs(tmp_path, umask):
    from monai_fbta._io import atomic_open

    old = os.umask(umask)
    try:
        path = tmp_path / "perm.h5"
        write_coords(path, np.zeros((2, 2)), {})
        created = path.stat().st_mode & 0o777
        add_arrays(path, {"features": np.ones((2, 3))})
        rewritten = path.stat().st_mode & 0o777
        with atomic_open(tmp_path / "report.csv", "w") as f:
            f.write("x\n")
        other = (tmp_path / "report.csv").stat().st_mode & 0o777
    finally:
        os.umask(old)
    assert created == rewritten == other == 0o666 & ~umask  # was 0600 for stores (mkstemp)


def _clam_features(path, n: int = 5, d: int = 4):
    """An ``.h5`` laid out as CLAM/TRIDENT feature extraction writes it (float32 features)."""
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=np.arange(2 * n).reshape(n, 2) * 256)
        ds.attrs.update(patch_size=256, patch_level=0)
        f.create_dataset("features", data=np.random.default_rng(0).standard_normal((n, d)).astype(np.float32))
    return path


def test_files_we_did_not_write_are_never_overwritten(tmp_path):
    from monai_fbta.data.clustering import cluster_store

    clam = _clam_features(tmp_path / "s1.h5")
    junk = tmp_path / "s2.h5"
    junk.write_bytes(b"someone's notes")
    before = {p: p.read_bytes() for p in (clam, junk)}
    for path in (clam, junk):
        with pytest.raises(StoreError, match=f"{path.name}.*never overwrites files it did not write"):
            write_coords(path, np.zeros((5, 2)), {})
        with pytest.raises(StoreError, match=path.name):
            store.check_ours(path)
    with pytest.raises(StoreError, match="s1.h5: not a monai_fbta store"):
        add_arrays(clam, {"features": np.ones((5, 4))})
    with pytest.raises(StoreError, match="s1.h5: not a monai_fbta store"):
        cluster_store(clam, num_clusters=2)
    assert {p: p.read_bytes() for p in (clam, junk)} == before
    assert sorted(os.listdir(tmp_path)) == ["s1.h5", "s2.h5"]


def test_marker_and_stores_from_before_the_marker(tmp_path, h5):
    path, _, _ = h5
    with h5py.File(path, "r") as f:
        assert f.attrs[store.STORE_MARKER] == store.STORE_FORMAT
    legacy = tmp_path / "legacy.h5"  # as main wrote stores before the marker: fingerprint + patch_size_level
    with h5py.File(legacy, "w") as f:
        f.create_dataset("coords", data=np.zeros((3, 2), np.int64)).attrs.update(fingerprint="{}", patch_size_level=256)
    store.check_ours(legacy)
    add_arrays(legacy, {"features": np.ones((3, 2))})
    with h5py.File(legacy, "r") as f:
        assert f.attrs[store.STORE_MARKER] == store.STORE_FORMAT  # upgraded on its next write
    newer = tmp_path / "newer.h5"
    with h5py.File(newer, "w") as f:
        f.attrs[store.STORE_MARKER] = store.STORE_FORMAT + 1
    with pytest.raises(StoreError, match="newer.h5: written by a newer monai_fbta"):
        write_coords(newer, np.zeros((1, 2)))


def test_slide_id_and_store_path_live_with_the_store(tmp_path):
    from monai_fbta.data.store import slide_id_of, store_path

    assert slide_id_of({"image": "/x/TCGA-01.svs"}) == "TCGA-01" and slide_id_of({"image": "a.tif", "slide_id": "s"}) == "s"
    assert os.path.dirname(store_path(tmp_path, "../../evil")) == str(tmp_path)


def test_one_open_per_item(h5, monkeypatch):
    """SlideStore reads everything through one handle; LoadStored opens the store once per item (clusters cached)."""
    from monai_fbta.data.store import SlideStore
    from monai_fbta.transforms.store import LoadStored

    path, coords, feats = h5
    loader = LoadStored(os.path.dirname(path), num_clusters=3)
    row = {"image": "slide.tif", "slide_id": "slide", "label": 1}
    first = loader(row)  # computes and caches the clusters
    opened = []
    real = h5py.File
    monkeypatch.setattr(store.h5py, "File", lambda name, *a, **k: opened.append(os.fspath(name)) or real(name, *a, **k))
    item = loader(row)
    assert opened == [os.fspath(path)]
    np.testing.assert_array_equal(item["coords"].numpy(), coords)
    np.testing.assert_allclose(item["features"].numpy(), feats.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(item["clusters"].numpy(), first["clusters"].numpy())
    assert item["coords_meta_dict"]["patch_size"] == ATTRS["patch_size"]
    opened.clear()
    pb = LoadStored(os.path.dirname(path), "features", index_key="pb_index")({**row, "pb_index": np.array([5, 1, 1])})
    assert opened == [os.fspath(path)]
    np.testing.assert_allclose(pb["pb_features"].numpy(), feats[[5, 1, 1]].astype(np.float16).astype(np.float32))
    with SlideStore(path) as s:
        assert s.names() == ["clusters", "coords", "features"] and s.num_coords() == N
        np.testing.assert_array_equal(s.rows("coords", [-1, 0]), coords[[N - 1, 0]])
    with pytest.raises(StoreError, match="no dataset 'missing'"), SlideStore(path) as s:
        s.array("missing")


@pytest.mark.parametrize("slide_id", ["../../escape", "a/b", "/abs/x", ".."])
def test_store_path_never_leaves_the_cache_folder(tmp_path, slide_id):
    out = tmp_path / "cache"
    path = Path(store_path(out, slide_id))
    assert path.parent == out.resolve() and path.suffix == ".h5"


def test_only_temps_of_dead_writers_are_removed(tmp_path):
    """A temp of a live writer (another process rewriting the same store) is kept; a dead writer's is removed."""
    import subprocess
    import sys

    from monai_fbta._io import _HOST, atomic_path, remove_stale_temps

    target = tmp_path / "slide.h5"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "live": f".slide.h5.{_HOST}-{live.pid}.abc123_x.tmp",
            "dead": f".slide.h5.{_HOST}-{dead_pid}.abc123_y.tmp",
            "other_host_fresh": f".slide.h5.elsewhere-{dead_pid}.abc123_z.tmp",
            "other_host_old": f".slide.h5.elsewhere-{dead_pid}.abc123_w.tmp",
            "no_owner_old": ".slide.h5.abc123_v.tmp",
            "other_store": f".slide2.h5.{_HOST}-{dead_pid}.abc123_u.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"x")
        old = time.time() - 2 * 24 * 3600
        for key in ("other_host_old", "no_owner_old"):
            os.utime(tmp_path / names[key], (old, old))
        removed = {os.path.basename(p) for p in remove_stale_temps(target)}
        assert removed == {names["dead"], names["other_host_old"], names["no_owner_old"]}
        assert {p.name for p in tmp_path.iterdir()} == {names["live"], names["other_host_fresh"], names["other_store"]}
        with atomic_path(target) as tmp:  # our own temp names carry this host and pid, and survive a clean-up
            assert os.path.basename(tmp).startswith(f".slide.h5.{_HOST}-{os.getpid()}.")
            Path(tmp).write_bytes(b"y")
            assert tmp not in remove_stale_temps(target)
        assert target.read_bytes() == b"y"
    finally:
        live.kill()
        live.wait()


def test_exclusive_lock_refuses_a_second_holder_and_warns_where_the_file_system_cannot_lock(tmp_path, monkeypatch):
    import errno
    import fcntl

    from monai_fbta import _io

    lock = tmp_path / "run.lock"
    with _io.exclusive_lock(lock, "run A"):
        assert lock.read_text() == f"{_io._HOST} {os.getpid()}\n"
        with pytest.raises(_io.LockHeld, match=rf"run A is in use by another process \(host and pid: \S+ {os.getpid()}"):
            with _io.exclusive_lock(lock, "run A"):  # another open file description, as another process has
                pass
    with _io.exclusive_lock(lock, "run A"):  # released at the end of the block
        pass

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with pytest.warns(RuntimeWarning, match="cannot lock"), _io.exclusive_lock(lock, "run A"):
        ran.append(True)
    assert ran == [True]
