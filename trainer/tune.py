"""Hyperparameter search (grid or random) over the autoencoder, selected by validation loss.

Each trial builds a fresh model with the *same* seed, so trials differ only by their
hyperparameters, and fits it on the training split with early stopping on the validation
split. The threshold-holdout split is never seen by the search. The trial with the lowest
best-epoch validation loss wins; its already-fitted model is kept (not re-trained).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from trainer.config import ModelConfig, TuneConfig
from trainer.errors import ConfigError
from trainer.model import FitHistory, build_autoencoder, fit_autoencoder, seed_everything

Progress = Callable[[str], None]
TUNED = ("code_size", "hidden", "learning_rate", "batch_size", "epochs")


@dataclass(frozen=True)
class Trial:
    """One fitted candidate.

    Attributes:
        index: 1-based trial number.
        params: the tuned hyperparameters (``TUNED`` keys).
        val_loss: best-epoch validation loss (scaled MSE).
        best_epoch: 1-based epoch of that loss; ``epochs_run`` epochs were run in all.
        seconds: wall time of the fit.
    """

    index: int
    params: dict[str, Any]
    val_loss: float
    best_epoch: int
    epochs_run: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"params": _plain(self.params)}


@dataclass(frozen=True, eq=False)
class SearchResult:
    """The search's trials, the winner's index into ``trials``, and the winner's fit."""

    trials: tuple[Trial, ...]
    best: int
    hp: ModelConfig
    model: Any
    history: FitHistory


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


def params_of(hp: ModelConfig) -> dict[str, Any]:
    """The tuned hyperparameters of a model config."""
    return {k: getattr(hp, k) for k in TUNED}


def valid_bottleneck(hp: ModelConfig) -> bool:
    """The code layer must be the narrowest, or it is no bottleneck (and not found as one)."""
    if hp.code_size is None or not hp.hidden:
        return hp.code_size is not None
    return hp.code_size < min(hp.hidden)


def candidates(base: ModelConfig, tune: TuneConfig) -> list[ModelConfig]:
    """The model configs a search will try, in trial order.

    Grid: every combination of the listed values (an empty list keeps ``base``'s value).
    Random: ``tune.trials`` distinct combinations drawn from that grid with ``base.seed``.
    Combinations whose code layer is not narrower than every hidden layer are skipped.

    Raises:
        ConfigError: no valid combination.
    """
    axes = [getattr(tune, k) or (getattr(base, k),) for k in TUNED]
    grid = [
        dataclasses.replace(base, **dict(zip(TUNED, combo, strict=True)))
        for combo in itertools.product(*axes)
    ]
    grid = [hp for hp in grid if valid_bottleneck(hp)]
    if not grid:
        raise ConfigError(
            "no tuning combination has a code size smaller than every hidden width",
            "list smaller tune.code_size values or wider tune.hidden layers",
        )
    if tune.method == "random" and tune.trials < len(grid):
        rng = np.random.default_rng(base.seed)
        picked = sorted(rng.choice(len(grid), size=tune.trials, replace=False).tolist())
        grid = [grid[i] for i in picked]
    return grid


def _describe(params: dict[str, Any]) -> str:
    return (
        f"code_size={params['code_size']} hidden={list(params['hidden'])} "
        f"lr={params['learning_rate']:g} batch={params['batch_size']} epochs={params['epochs']}"
    )


def search(
    x_train: npt.NDArray[np.float32],
    x_val: npt.NDArray[np.float32],
    base: ModelConfig,
    tune: TuneConfig,
    output_activation: str,
    progress: Progress | None = None,
    steps: int = 1,
    step_units: int = 0,
) -> SearchResult:
    """Run the search on scaled float32 splits; one progress line per trial (and per epoch)."""
    todo = candidates(base, tune)
    n = len(todo)
    if progress:
        progress(f"tuning: {tune.method} search, {n} trials, selected by validation loss")
    trials: list[Trial] = []
    best_i, best_model, best_hist = -1, None, None
    for i, hp in enumerate(todo, start=1):
        seed_everything(hp.seed, hp.deterministic)
        model = build_autoencoder(x_train.shape[1], hp, output_activation, steps, step_units)
        t0 = time.perf_counter()
        hist = fit_autoencoder(model, x_train, x_val, hp, progress, prefix=f"trial {i}/{n} ")
        params = params_of(hp)
        trial = Trial(
            index=i,
            params=params,
            val_loss=hist.best_val_loss,
            best_epoch=hist.best_epoch,
            epochs_run=len(hist.loss),
            seconds=time.perf_counter() - t0,
        )
        trials.append(trial)
        ok = math.isfinite(trial.val_loss)
        if ok and (best_i < 0 or trial.val_loss < trials[best_i].val_loss):
            best_i, best_model, best_hist = len(trials) - 1, model, hist
        if progress:
            best_txt = f"{trials[best_i].val_loss:.6f} (trial {best_i + 1})" if best_i >= 0 else "-"
            progress(
                f"trial {i}/{n}: {_describe(params)} -> val_loss {trial.val_loss:.6f} "
                f"in {trial.seconds:.1f} s; best {best_txt}"
            )
    if best_i < 0 or best_model is None or best_hist is None:
        raise ConfigError(
            "every tuning trial diverged (validation loss NaN or infinite)",
            "lower tune.learning_rate values",
        )
    return SearchResult(
        trials=tuple(trials), best=best_i, hp=todo[best_i], model=best_model, history=best_hist
    )
