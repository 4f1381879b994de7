"""The loss terms of an FBTA iteration, and the handlers that log them (MONAI ``StatsHandler``, optional
TensorBoard, progress bar) for Python users; the bundle declares each handler in ``train.json``."""

from __future__ import annotations

from collections.abc import Mapping

from monai_fbta._quiet import quiet_import

__all__ = ["LOSS_TERMS", "loss_terms", "training_log_handlers"]

LOSS_TERMS = ("loss", "cls", "cons", "dist")


def loss_terms(output: Mapping) -> dict[str, float]:
    """The scalar loss terms of an :class:`FBTATrainer` iteration output (:data:`LOSS_TERMS`, then each view's
    cross-entropy ``cls_<view>`` when the loss reports it), and ``e2e_scale`` (the e2e features' scale relative
    to the frozen ones: :func:`~monai_fbta.engines.trainer.e2e_scale`) when the e2e view ran."""
    terms = {k: float(output[k]) for k in LOSS_TERMS if k in output}
    terms.update({k: float(v) for k, v in output.items() if isinstance(k, str) and k.startswith("cls_")})
    if "e2e_scale" in output:
        terms["e2e_scale"] = float(output["e2e_scale"])
    return terms


def training_log_handlers(
    name: str = "fbta.train", log_dir: str | None = None, progress: bool = True, iteration_log: bool | int = True
) -> list:
    """Handlers logging every loss term each iteration (and epoch metrics).

    With ``log_dir``, an :class:`~monai_fbta.handlers.OptionalTensorBoard` (TensorBoard when installed, else
    a one-line note); with ``progress``, a :class:`~monai_fbta.handlers.LossProgressBar`.
    """
    from monai_fbta.handlers.progress import LossProgressBar
    from monai_fbta.handlers.tensorboard import OptionalTensorBoard

    handlers_mod = quiet_import("monai.handlers")
    handlers: list = [
        handlers_mod.StatsHandler(name=name, iteration_log=iteration_log, output_transform=loss_terms, tag_name="train")
    ]
    if log_dir is not None:
        handlers.append(OptionalTensorBoard(log_dir))
    if progress:
        handlers.append(LossProgressBar(persist=False))
    return handlers
