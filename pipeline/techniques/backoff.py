"""A technique that checks its own result: run it, measure the model on the validation split, and
when it fell below the budget, run it again with more conservative settings (lower sparsity, more
clusters, a wider student, more recovery epochs), a bounded number of times. Every attempt is
recorded; the best one is kept, fitting the budget or not (the quality gates decide on it later,
on the test split).

Each technique module provides what the loop needs:

    settings(model, dataset, config) -> dict   the settings it will use on this model and data
                                                (config fields, plus figures for the record)
    relax(settings) -> dict | None              config fields for the next, more conservative
                                                attempt; None when there is nothing left to give

`fit_within_budget` knows nothing of techniques: it takes an attempt function, first settings,
a relax function and a score, so a search over settings (issue 21's accuracy-aware `auto-*`
variants) can drive it with its own.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

# "Far below the budget": more than this many times max_accuracy_drop_pts under the base model's
# validation accuracy. Not the gate itself (1x, on the test split): a variant just outside it is
# the gate's to judge; one far outside it was broken by its settings.
BUDGET_FACTOR = 3.0


@dataclass
class Outcome:
    """What the attempts gave: the best model, every attempt's settings and validation accuracy
    (in order), which one is kept, and whether it reached the budget."""
    model: Any
    attempts: list[dict[str, Any]] = field(default_factory=list)
    best: int = 0
    fits: bool = True

    @property
    def settings(self) -> dict[str, Any]:
        return self.attempts[self.best]["settings"]


def accuracy_budget(base_accuracy: float, config, num_classes: int | None) -> float:
    """The lowest validation accuracy an attempt may reach without backing off: the absolute floor
    (`config.accuracy_floor`), or BUDGET_FACTOR budgets under the base model's."""
    from pipeline.config import accuracy_floor

    floor = accuracy_floor(config, num_classes)
    if math.isnan(base_accuracy):
        return floor
    return max(floor, base_accuracy - BUDGET_FACTOR * config.max_accuracy_drop_pts / 100)


def fit_within_budget(attempt: Callable[[dict], Any], first: dict[str, Any],
                      relax: Callable[[dict], dict | None], *, score: Callable[[Any], float],
                      budget: float, retries: int,
                      settle: Callable[[dict], dict] = lambda settings: settings) -> Outcome:
    """Run `attempt(settings)` with `first`, then with `settle(settings | relax(settings))` while
    the model's `score` is under `budget`, at most `retries` times more. A NaN score (nothing to
    measure on) counts as fitting. Returns the best attempt's model."""
    outcome: Outcome | None = None
    settings: dict[str, Any] | None = first
    for number in range(retries + 1):
        assert settings is not None
        model = attempt(settings)
        accuracy = score(model)
        record = {"attempt": number + 1, "settings": settings, "val_accuracy": accuracy}
        if outcome is None:
            outcome = Outcome(model, [record])
        else:
            outcome.attempts.append(record)
            if accuracy > outcome.attempts[outcome.best]["val_accuracy"]:
                outcome.model, outcome.best = model, number
        fits = not accuracy < budget
        if fits:
            outcome.model, outcome.best = model, number
            break
        changes = relax(settings)
        if changes is None:
            break
        settings = settle({**settings, **changes})
    assert outcome is not None
    outcome.fits = not outcome.attempts[outcome.best]["val_accuracy"] < budget
    return outcome


def configured(config, settings: dict[str, Any]):
    """`config` with the settings that are config fields replaced (the others are figures for
    the record, e.g. pruning's per-layer plan)."""
    names = {f.name for f in dataclasses.fields(config)}
    changes = {name: value for name, value in settings.items()
               if name in names and getattr(config, name) != value}
    return dataclasses.replace(config, **changes) if changes else config
