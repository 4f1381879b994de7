"""The checkpoint files: ``last.pt`` (resume) and ``model.pt`` (the inference model), in one place.

A training checkpoint is ``{name: obj.state_dict()}`` for the objects of :func:`training_objects`
(trainer state incl. epoch, iteration, optimiser-step count and curriculum; student modules; EMA
teachers; optimiser; scheduler; GradScaler; torch RNG). ``model.pt`` is the state dict of
:class:`~monai_fbta.networks.TranslatedMIL` (MONAI's flat layout) plus the plain-Python ``metadata`` of
:func:`model_metadata`, from which :func:`load_inference_networks` / :func:`build_inference_network` rebuild
the network without a training config. Files are written to a temporary file in the target folder and moved
into place with ``os.replace``; everything loads with ``weights_only=True``. Both files may carry the run's
identity (:func:`run_identity`: datalist digest, class names, model settings), compared with
:func:`check_identity` before a checkpoint is resumed or evaluated. The handlers that write and read them:
:class:`~monai_fbta.handlers.TrainingCheckpoint`, :class:`~monai_fbta.handlers.BestModelSaver`,
:class:`~monai_fbta.handlers.ResumeTraining`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from ignite.handlers import Checkpoint

from monai_fbta._io import atomic_open, file_sha256
from monai_fbta.environment import software_environment
from monai_fbta.networks.encoder import _is_weights_file
from monai_fbta.networks.inference import LAYOUT_KEY, METADATA_KEY, state_layout

__all__ = [
    "RunMismatchError",
    "check_identity",
    "checkpoint_identity",
    "run_identity",
    "plain_value",
    "TorchRNGState",
    "training_objects",
    "save_checkpoint",
    "load_checkpoint",
    "save_inference_model",
    "load_inference_model",
    "resolve_class_names",
    "model_metadata",
    "load_inference_networks",
    "build_inference_network",
]


class RunMismatchError(ValueError):
    """A checkpoint or model belongs to another run (other data, classes or model settings)."""


# identity keys added after runs were saved without them, and the value those runs had
_ADDED_LATER: dict[str, Any] = {"mil_kwargs": {}}
# identity keys added after runs were saved without them, whose value those runs did not record (not compared then)
_UNRECORDED_BEFORE = frozenset({"training"})


def _identity_differences(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    if saved is None:
        return ["it holds no run identity (saved by an older version of monai-fbta or by another program)"]
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key not in saved and key in _UNRECORDED_BEFORE:
            continue
        old, new = saved.get(key, _ADDED_LATER.get(key)), current.get(key)
        if old == new or key == "num_slides":
            continue
        if key == "datalist_sha256":
            diffs.append(f"the datalist differs (saved: {saved.get('num_slides')} slides, sha256 {str(old)[:12]}; "
                         f"now: {current.get('num_slides')} slides, sha256 {str(new)[:12]})")
        elif key == "training" and isinstance(old, Mapping) and isinstance(new, Mapping):  # options: name each
            diffs += [f"{name} differs (saved: {old.get(name)!r}; now: {new.get(name)!r})"
                      for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        else:
            diffs.append(f"{key} differs (saved: {old!r}; now: {new!r})")
    return diffs


def check_identity(saved: Mapping[str, Any] | None, current: Mapping[str, Any], what: str, remedy: str) -> None:
    """Raise :class:`RunMismatchError` ``"<what>: <each difference>. <remedy>"`` when the identities differ."""
    diffs = _identity_differences(saved, current)
    if diffs:
        raise RunMismatchError(f"{what}: " + "; ".join(diffs) + f". To go on: {remedy}")


def checkpoint_identity(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run_identity`` saved in a training checkpoint or ``model.pt`` (``None`` when it has none)."""
    blob = _load(path)
    identity = blob.get("run_identity")
    if identity is None and isinstance(blob.get("metadata"), Mapping):
        identity = blob["metadata"].get("run_identity")
    return identity


class TorchRNGState:
    """The torch CPU (and CUDA) RNG state as a checkpointable object (dropout stays reproducible on resume)."""

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def training_objects(trainer: Any, scheduler: Any = None) -> dict[str, Any]:
    """Everything needed to resume an :class:`FBTATrainer` exactly (absent parts are left out)."""
    objects: dict[str, Any] = {
        "trainer": trainer,
        "optimizer": trainer.optimizer,
        "mil_head": trainer.mil_head,
        "translator": trainer.translator,
        "trainable_encoder": trainer.trainable_encoder,
        "ema_mil_head": None if trainer.teacher_head is None else trainer.teacher_head.ema_model,
        "ema_encoder": None if trainer.teacher_encoder is None else trainer.teacher_encoder.ema_model,
        "scheduler": scheduler,
        "scaler": getattr(trainer, "scaler", None),
        "rng": TorchRNGState(),
    }
    return {k: v for k, v in objects.items() if v is not None}


def _atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


DDP_PREFIX = "module."


def _load(path: str | os.PathLike) -> dict:
    """A checkpoint's contents; a module's state dict saved through its DDP wrapper (``module.`` before every key,
    as :func:`save_checkpoint` wrote under torchrun before 2026-11-27) is read as the module's own."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's message ends with advice to retry with weights_only=False (unsafe): cut it
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RuntimeError(f"checkpoint {path} could not be loaded ({first}): the file is damaged, cut short or "
                           "not a monai-fbta checkpoint") from err
    for name, state in blob.items():
        if isinstance(state, dict) and state and all(isinstance(k, str) and k.startswith(DDP_PREFIX) for k in state):
            blob[name] = {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return blob


def _unwrapped(obj: Any) -> Any:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, else ``obj``."""
    return obj.module if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else obj


def save_checkpoint(path: str | os.PathLike, objects: Mapping[str, Any], identity: Mapping[str, Any] | None = None) -> Path:
    """Save ``{name: obj.state_dict()}`` (and ``run_identity`` when given) atomically to ``path``; a DDP-wrapped
    module is saved as the module itself, so a checkpoint reads the same whatever the number of processes (ignite's
    ``Checkpoint.load_objects`` loads into the wrapped module on resume, and the translated-head stage reads f_T)."""
    blob = {k: _unwrapped(v).state_dict() for k, v in objects.items()}
    if identity is not None:
        blob["run_identity"] = dict(identity)
    return _atomic_torch_save(blob, path)


def load_checkpoint(path: str | os.PathLike, objects: Mapping[str, Any], strict: bool = True) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``objects`` (ignite ``Checkpoint.load_objects``).

    Load into a trainer before ``run()``: training then continues at the saved epoch with the saved
    curriculum, EMA weights, EMA warm-up step and RNG state.
    """
    state = _load(path)
    missing = [k for k in objects if k not in state]
    if missing:
        raise KeyError(f"checkpoint {path} has no entries for {missing} (it has {sorted(state)})")
    Checkpoint.load_objects(to_load=dict(objects), checkpoint={k: state[k] for k in objects}, strict=strict)
    return state


ENCODER_WEIGHTS_KEY = "encoder_weights"
"""Metadata entry naming the frozen encoder's weights file, stored relative to ``model.pt``'s folder."""


def _portable_metadata(metadata: Mapping[str, Any], model_dir: Path) -> dict[str, Any]:
    """``metadata`` with the encoder weights file written relative to ``model_dir`` when it lies inside it."""
    meta = dict(metadata)
    weights = meta.get(ENCODER_WEIGHTS_KEY)
    if weights and Path(weights).is_absolute():
        rel = os.path.relpath(Path(weights).resolve(), model_dir.resolve())
        if not rel.startswith(os.pardir):
            meta[ENCODER_WEIGHTS_KEY] = Path(rel).as_posix()
    return meta


def _resolve_encoder_weights(metadata: dict[str, Any], model_dir: Path) -> None:
    """Turn a stored encoder weights path into one that exists here (in place).

    A relative path is read against ``model_dir``. An absolute path (``model.pt`` of monai-fbta <= 0.1) that
    no longer exists, because the bundle was moved, is replaced by the file of the same name beside ``model.pt``.
    """
    weights = metadata.get(ENCODER_WEIGHTS_KEY)
    if not weights or not _is_weights_file(weights):
        return
    path = Path(weights)
    if not path.is_absolute():
        metadata[ENCODER_WEIGHTS_KEY] = str(model_dir / path)
    elif not path.is_file() and (model_dir / path.name).is_file():
        metadata[ENCODER_WEIGHTS_KEY] = str(model_dir / path.name)


def save_inference_model(
    path: str | os.PathLike,
    mil_head: nn.Module,
    translator: nn.Module | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.pt``: the state dict of ``TranslatedMIL(head, translator)`` plus a ``metadata`` entry.

    The tensors sit at the top level under :class:`~monai_fbta.networks.TranslatedMIL`'s keys (``mil_head.*``,
    ``translator.*``, ``layout``), MONAI's layout for a bundle's ``models/model.pt``: ``monai.bundle.load`` and
    ``ckpt_export`` load it into ``network_def`` without ``key_in_ckpt``. ``metadata`` must be plain Python
    (str, int, float, bool, lists/dicts of them) to stay weights_only-loadable; its encoder weights file is
    stored relative to ``path``'s folder, so the bundle can be moved.
    """
    blob: dict[str, Any] = {f"mil_head.{k}": v for k, v in mil_head.state_dict().items()}
    if translator is not None:
        blob.update({f"translator.{k}": v for k, v in translator.state_dict().items()})
    blob[LAYOUT_KEY] = state_layout(blob)
    blob[METADATA_KEY] = _portable_metadata(metadata or {}, Path(path).parent)
    return _atomic_torch_save(blob, path)


def _part(network: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in network.items() if k.startswith(prefix)}


def load_inference_model(
    path: str | os.PathLike, mil_head: nn.Module | None = None, translator: nn.Module | None = None
) -> dict[str, Any]:
    """Read ``model.pt``; load its weights into the given modules.

    Returns ``{"mil_head": state dict, "translator": state dict or None, "metadata": dict, "network": state
    dict of TranslatedMIL}``; the metadata's encoder weights file is resolved against ``path``'s folder. Also
    reads the layout of monai-fbta <= 0.1 (``{"network": ..., "has_translator": ..., "metadata": ...}``).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no trained model at {path}: run the bundle's training first")
    blob = _load(path)
    if "network" in blob:  # monai-fbta <= 0.1
        network = blob["network"]
    else:
        network = {k: v for k, v in blob.items() if isinstance(v, torch.Tensor)}
    if METADATA_KEY not in blob or not _part(network, "mil_head."):
        raise KeyError(f"{path} is not an inference model written by save_inference_model "
                       f"(it holds {sorted(blob)[:6]}...; expected 'mil_head.*' weights and '{METADATA_KEY}')")
    metadata = dict(blob[METADATA_KEY])
    _resolve_encoder_weights(metadata, Path(path).parent)
    translator_state = _part(network, "translator.") or None
    result = {"network": network, "mil_head": _part(network, "mil_head."), "translator": translator_state,
              "metadata": metadata}
    if mil_head is not None:
        mil_head.load_state_dict(result["mil_head"])
    if translator is not None:
        if translator_state is None:
            raise ValueError(f"{path} holds no translator (it was trained without one)")
        translator.load_state_dict(translator_state)
    return result


# ----------------------------------------------------------------------------- run identity


def plain_value(value: Any) -> Any:
    """JSON-like copy of ``value`` (tuples -> lists), storable in a ``weights_only`` checkpoint."""
    if isinstance(value, Mapping):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_identity(
    rows: Sequence[Mapping[str, Any]], class_names: Sequence[str] | None, num_classes: int, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """What makes two training runs the same run: the datalist's content (:func:`datalist_digest` of ``rows``,
    not a file time), the class names and ``settings`` (head, views, encoder, tiling, C, M, K, fold...).

    An ``encoder_weights`` setting that names a file counts by the file's content (``"sha256:<16 hex digits>"``),
    not by how its path was spelled: the same weights given from another working directory are the same run.
    """
    from monai_fbta.data.datalist import datalist_digest

    settings = plain_value(settings)
    weights = settings.get(ENCODER_WEIGHTS_KEY)
    if isinstance(weights, str) and os.path.isfile(weights):
        settings[ENCODER_WEIGHTS_KEY] = f"sha256:{file_sha256(weights)}"
    return {
        "datalist_sha256": datalist_digest(rows),
        "num_slides": len(rows),
        "class_names": resolve_class_names(class_names, num_classes),
        **settings,
    }


# ----------------------------------------------------------------------------- model.pt -> networks


def _described_differences(network_data_format: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    """How a bundle ``metadata.json``'s ``network_data_format`` differs from ``model.pt``'s metadata (empty: it
    describes the model, or describes nothing)."""
    pred = (network_data_format.get("outputs") or {}).get("pred") or {}
    image = (network_data_format.get("inputs") or {}).get("image") or {}
    diffs = []
    channel_def = pred.get("channel_def")
    if channel_def:
        names = [str(channel_def[k]) for k in sorted(channel_def, key=lambda k: int(k))]
        if names != [str(n) for n in meta["class_names"]]:
            diffs.append(f"outputs.pred.channel_def names {names}, the model predicts {list(meta['class_names'])}")
    if pred.get("num_channels") is not None and int(pred["num_channels"]) != int(meta["num_classes"]):
        diffs.append(f"outputs.pred.num_channels is {pred['num_channels']}, the model has {meta['num_classes']} classes")
    if image.get("num_channels") is not None and int(image["num_channels"]) != int(meta["feature_dim"]):
        diffs.append(f"inputs.image.num_channels is {image['num_channels']}, the model reads D={meta['feature_dim']} "
                     "features")
    return diffs


def resolve_class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """``class_names`` as a list, or ``class_0 ... class_<n-1>`` when none were given; one name per class."""
    names = list(class_names) if class_names else [f"class_{i}" for i in range(int(num_classes))]
    if len(names) != int(num_classes):
        raise ValueError(f"{len(names)} class names {names} for num_classes={num_classes}")
    return names


def model_metadata(
    mil_name: str,
    feature_dim: int,
    num_classes: int,
    class_names: Sequence[str] | None,
    views: Sequence[str],
    encoder_name: str,
    encoder_weights: str | None,
    tiling: Mapping[str, Any],
    mil_hidden: int = 512,
    translator_heads: int = 10,
    identity: Mapping[str, Any] | None = None,
    mil_kwargs: Mapping[str, Any] | None = None,
    encoder_digest: str | None = None,
) -> dict[str, Any]:
    """Plain-Python description of the inference network (stored in ``model.pt``), with the run's ``identity``;
    ``mil_kwargs``: the head's other constructor arguments (e.g. MambaMIL's ``num_layers``); ``encoder_digest``:
    the ``weights`` entry of :func:`~monai_fbta.data.extraction.encoder_fingerprint` of the frozen encoder whose
    features the head reads, checked when a model's encoder is loaded
    (:func:`~monai_fbta.pipeline.prepare.model_frozen_encoder`). ``environment``: the package versions it was
    trained with and on what CPU (:func:`~monai_fbta.environment.software_environment`), for the record only."""
    names = resolve_class_names(class_names, num_classes)
    return {
        "run_identity": None if identity is None else dict(identity),
        "mil_name": str(mil_name),
        "mil_hidden": int(mil_hidden),
        "mil_kwargs": plain_value(dict(mil_kwargs or {})),
        "feature_dim": int(feature_dim),
        "num_classes": int(num_classes),
        "class_names": names,
        "views": [str(v) for v in views],
        "translator_heads": int(translator_heads),
        "encoder_name": str(encoder_name),
        "encoder_weights": None if encoder_weights is None else str(encoder_weights),
        "encoder_digest": encoder_digest,
        "tiling": {str(k): v for k, v in dict(tiling).items()},
        "environment": software_environment(),
    }


def load_inference_networks(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(mil_head, translator, metadata)`` rebuilt from ``model.pt`` (``weights_only`` load), in eval mode."""
    from monai_fbta.networks import FeatureTranslator, build_mil_head

    blob = load_inference_model(path)
    meta = blob["metadata"]
    head = build_mil_head(meta["mil_name"], in_features=meta["feature_dim"], num_classes=meta["num_classes"],
                          hidden=meta["mil_hidden"], options=meta.get("mil_kwargs"))
    head.load_state_dict(blob["mil_head"])
    translator = None
    if blob["translator"] is not None:
        translator = FeatureTranslator.from_state_dict(blob["translator"]).to(device).eval()
    return head.to(device).eval(), translator, meta


def build_inference_network(
    model_path: str | os.PathLike, device: str | torch.device = "cpu", channels_first: bool = False,
    translator_dtype: torch.dtype | str | None = None, network_data_format: Mapping[str, Any] | None = None,
):
    """:class:`~monai_fbta.networks.TranslatedMIL` with the weights of ``model.pt``, in eval mode on ``device``,
    its ``metadata`` set from the file (the bundle's ``network_def``, with ``channels_first=True``: input
    ``[B, D, N]`` as ``metadata.json`` describes it; bundle inference, with ``[B, N, D]``). ``translator_dtype``:
    see :class:`~monai_fbta.networks.TranslatedMIL` (``None``: float32).

    ``network_data_format``: the bundle's ``metadata.json`` entry (the ``network_def`` of ``inference.json`` passes
    it when MONAI has read the metadata, e.g. for ``ckpt_export``, which embeds it in ``model.ts``). A model whose
    class names, class count or feature size D differ from it is refused (:class:`RunMismatchError`): the exported
    file would describe its outputs as other classes."""
    from monai_fbta.networks import TranslatedMIL

    head, translator, meta = load_inference_networks(model_path, device)
    described = _described_differences(network_data_format or {}, meta)
    if described:
        raise RunMismatchError(
            f"the bundle's metadata.json does not describe {os.fspath(model_path)}: " + "; ".join(described) + ". Set "
            "network_data_format (outputs.pred.channel_def and num_channels, inputs.image.num_channels) in "
            "configs/metadata.json to this model's, so that model.ts and a colleague's copy of the bundle name its "
            "outputs right")
    network = TranslatedMIL(head, translator, channels_first=channels_first, translator_dtype=translator_dtype)
    network = network.to(device).eval()
    network.metadata = dict(meta)
    return network
