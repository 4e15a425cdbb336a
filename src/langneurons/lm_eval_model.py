"""The ``langneurons`` model type of lm-evaluation-harness: lm-eval's ``hf`` model with any
langneurons intervention on a run's neuron set.

    python -m langneurons.lm_eval_model --model langneurons \\
        --model_args pretrained=Qwen/Qwen2.5-0.5B,neurons=runs/qwen,deactivate=de,classes=specific \\
        --tasks mgsm_direct_de,belebele_deu_Latn

(``langneurons-lm-eval`` is the same command; lm-eval 0.4 has no plugin discovery, so the stock
``lm_eval`` command knows the model type only in a process that imported this module:
``import langneurons.lm_eval_model`` then ``lm_eval.simple_evaluate(model="langneurons", ...)``.)

Model arguments besides those of ``hf`` (lm-eval splits ``--model_args`` on commas, so lists
inside one argument are joined with ``+``):

* ``neurons`` -- a run directory or a neuron map file;
* ``deactivate`` -- languages whose neurons form the set (``de`` or ``de+fr``);
* ``classes`` -- ``specific`` (default), ``specific+related``, ... or ``selected``;
* ``mode`` -- ``zero`` (default), ``scale`` (with ``factor``) or ``set`` (to the neurons' mean
  activation in ``set_lang``, from the run's statistics);
* ``mlp_act_path`` -- where the activation lives, for a family langneurons does not know.

With no ``neurons``/``deactivate`` nothing is hooked, so the numbers are exactly those of
lm-eval's ``hf`` model (tested).  The intervention is active in every forward pass lm-eval makes
(log-likelihoods and generation, every position), via `intervene.deactivate`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .errors import LangNeuronsError

MODEL_NAME = "langneurons"


@dataclass
class Intervention:
    """A neuron set of a run and what is done to it (the empty intervention: ``mask`` None)."""

    mask: torch.Tensor | None = None  # bool [L, N]
    mode: str = "zero"
    factor: float = 0.0
    values: torch.Tensor | None = None  # [L, N] for mode "set"
    label: str = "none"

    @property
    def empty(self) -> bool:
        return self.mask is None or not bool(self.mask.any())


def _items(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [x.strip() for x in str(value).replace(";", "+").replace(",", "+").split("+") if x.strip()]


def build_intervention(neurons: str | Path | None, deactivate: Any = None, classes: Any = "specific",
                       mode: str = "zero", factor: float = 0.0, set_lang: str | None = None) -> Intervention:
    """The neuron set of ``deactivate``'s languages and ``classes`` in a run, as an `Intervention`."""
    from .export import neuron_set
    from .neurons import NeuronMap

    langs = _items(deactivate)
    if not langs:
        return Intervention()
    if neurons is None:
        raise LangNeuronsError("deactivate= needs neurons=RUN_DIR (or a neuron map file)")
    if mode not in ("zero", "scale", "set"):
        raise LangNeuronsError(f"mode must be zero, scale or set, got {mode!r}")
    nmap = NeuronMap.load(neurons)
    class_list = _items(classes) or ["specific"]
    mask = neuron_set(nmap, ",".join(class_list), langs)
    values = None
    if mode == "set":
        if not set_lang:
            raise LangNeuronsError("mode=set needs set_lang=LANG (the neurons are set to their mean activation in it)")
        from .stats import ActivationStats

        run_dir = Path(neurons) if Path(neurons).is_dir() else Path(neurons).parent
        stats = ActivationStats.load(run_dir)
        if set_lang not in stats.languages:
            raise LangNeuronsError(f"set_lang {set_lang!r} is not in the run's statistics ({','.join(stats.languages)})")
        values = stats.means()[stats.languages.index(set_lang)].to(torch.float32)
    label = f"{mode}:{'+'.join(langs)}:{'+'.join(class_list)}" + (f":{factor:g}" if mode == "scale" else "") + (
        f":{set_lang}" if mode == "set" else "")
    return Intervention(mask, mode, float(factor), values, label)


def _resolve_pretrained(pretrained: Any) -> Any:
    """langneurons aliases and GGUF files become their converted directory; hub ids pass through."""
    if not isinstance(pretrained, str):
        return pretrained
    from .models import MODEL_ALIASES, resolve_model

    if pretrained in MODEL_ALIASES or pretrained.lower().endswith(".gguf"):
        return str(resolve_model(pretrained))
    return pretrained


@register_model(MODEL_NAME)
class LangNeuronsLM(HFLM):
    """lm-eval's HFLM with a langneurons intervention around every model call."""

    def __init__(self, pretrained: Any = "gemma-3-270m", neurons: str | None = None, deactivate: Any = None,
                 classes: Any = "specific", mode: str = "zero", factor: float = 0.0, set_lang: str | None = None,
                 mlp_act_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(pretrained=_resolve_pretrained(pretrained), **kwargs)
        self.act_path = mlp_act_path
        self.intervention = build_intervention(neurons, deactivate, classes, mode, float(factor), set_lang)

    def set_intervention(self, intervention: Intervention) -> None:
        """Swap the intervention (one loaded model serves a whole grid)."""
        if not intervention.empty:
            from .arch import locate_activations

            sites = locate_activations(self.model, self.act_path)
            sites.check_mask_shape(*intervention.mask.shape, what="the neuron set")  # type: ignore[union-attr]
        self._intervention = intervention

    @property
    def intervention(self) -> Intervention:
        return self._intervention

    @intervention.setter
    def intervention(self, value: Intervention) -> None:
        self.set_intervention(value)

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        iv = self._intervention
        if iv.empty:  # nothing hooked: bit-identical to lm-eval's hf model
            yield
            return
        from .intervene import deactivate

        with deactivate(self.model, iv.mask, mode=iv.mode, factor=iv.factor, values=iv.values,  # type: ignore[arg-type]
                        act_path=self.act_path):
            yield

    def _model_call(self, *args: Any, **kwargs: Any) -> Any:
        with self._patched():
            return super()._model_call(*args, **kwargs)

    def _model_generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._patched():
            return super()._model_generate(*args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with the ``langneurons`` model type registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
