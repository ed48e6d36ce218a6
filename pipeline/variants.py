"""Variant recipes: optimizations + one quantization mode, named as ARCHITECTURE.md describes.

`prune+cluster-int8` = prune, then cluster, then full-integer int8 conversion;
`prune+cluster-int4` = prune, then cluster, then float32 conversion and int4 quantization.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import PipelineInputError

# Modes the TF converter produces from a Keras model or SavedModel (pipeline.runtime.quantize); LiteRT
# Quantizer (pipeline.runtime.litert_quantizer) produces them from a float32 .tflite as well.
CONVERTER_MODES = ("float32", "dynamic", "float16", "int8", "int16x8")
# Modes only LiteRT Quantizer produces, from the float32 .tflite: int4 weights (float
# activations), and int4 with the most sensitive layers kept at int8 within an accuracy budget.
QUANTIZER_MODES = ("int4", "mixed")
QUANTIZATION_MODES = CONVERTER_MODES + QUANTIZER_MODES
# The order in which optimizations are applied when combined (collaborative optimization).
OPTIMIZATION_ORDER = ("distill", "prune", "cluster", "qat", "qat4")
# A quantization-aware model is trained for one mode; converting it to anything else throws the
# training away: `qat` trains for the converter's int8 kernels, `qat4` for the int4 mode's weights.
QAT_MODES = {"qat": "int8", "qat4": "int4"}
# `auto-<mode>`: a search over the settings of this chain (pipeline.techniques.search) for the
# smallest model of that mode within the accuracy budget, on the validation split.
AUTO = "auto"
SEARCH_CHAINS = {"int4": ("prune", "cluster", "qat4"), "int8": ("prune", "cluster", "qat"),
                 "dynamic": ("prune", "cluster")}
SEARCH_ROUNDS = 3  # each round's trials are chosen from the rounds before (the DAG's shape)

DEFAULT_VARIANTS = (
    "float32", "dynamic", "float16", "int8", "int16x8",
    "prune-dynamic", "prune-int8",
    "cluster-dynamic", "cluster-int8",
    "prune+cluster-dynamic", "prune+cluster-int8",
    "qat-int8", "prune+cluster+qat-int8",
    "distill-float32", "distill-dynamic", "distill-int8",
    # int4 weights (LiteRT Quantizer) on models the run trains anyway: seconds each.
    "int4", "prune-int4", "prune+cluster-int4", "distill-int4",
    # int4-aware training: the int4 rounding costs nothing, so pruned and clustered weights reach
    # int4 without the loss prune+cluster-int4 takes (seconds of training on the Dense layers).
    "prune+cluster+qat4-int4",
    # int4 convolutions too, int8 kept only where the accuracy budget needs it: the smallest
    # raw file without training (slower than int4: XNNPACK has no int4 convolution).
    "mixed",
)


@dataclass(frozen=True)
class Variant:
    optimizations: tuple[str, ...]
    quantization: str

    @property
    def name(self) -> str:
        if not self.optimizations:
            return self.quantization
        return "+".join(self.optimizations) + "-" + self.quantization

    @property
    def recipe(self) -> str:
        """The optimized Keras model this variant is converted from ('' = the baseline;
        `auto-<mode>` = the best model of that search)."""
        if self.optimizations == (AUTO,):
            return self.name
        return "+".join(self.optimizations)

    @property
    def techniques(self) -> tuple[str, ...]:
        """The techniques its model went through (a search's: the chain it searched)."""
        if self.optimizations == (AUTO,):
            return SEARCH_CHAINS[self.quantization]
        return self.optimizations

    def tags(self) -> dict[str, str]:
        return {"variant": self.name, "quantization": self.quantization,
                "optimizations": ",".join(self.techniques)}


def parse_variant(name: str) -> Variant:
    """Parse and validate a variant name; raise PipelineInputError naming what is wrong."""
    text = name.strip()
    if not text:
        raise PipelineInputError("empty variant name: use e.g. 'int8' or 'prune+cluster-int8'")
    opt_part, sep, mode = text.rpartition("-")
    if not sep:
        opt_part, mode = "", text
    if mode not in QUANTIZATION_MODES:
        raise PipelineInputError(
            f"unknown variant {text!r}: the quantization mode must be one of "
            f"{', '.join(QUANTIZATION_MODES)} (e.g. 'prune-int8')")
    optimizations = tuple(o for o in opt_part.split("+")) if opt_part else ()
    if AUTO in optimizations:
        if optimizations != (AUTO,) or mode not in SEARCH_CHAINS:
            raise PipelineInputError(
                f"unknown variant {text!r}: '{AUTO}' searches on its own, for one of "
                f"{', '.join(f'{AUTO}-{m}' for m in SEARCH_CHAINS)}")
        return Variant(optimizations, mode)
    unknown = [o for o in optimizations if o not in OPTIMIZATION_ORDER]
    if unknown:
        raise PipelineInputError(
            f"unknown variant {text!r}: unknown optimization {unknown[0]!r}; known: "
            f"{', '.join(OPTIMIZATION_ORDER)}")
    if len(set(optimizations)) != len(optimizations):
        raise PipelineInputError(f"unknown variant {text!r}: an optimization is repeated")
    ordered = tuple(sorted(optimizations, key=OPTIMIZATION_ORDER.index))
    if ordered != optimizations:
        raise PipelineInputError(
            f"unknown variant {text!r}: write optimizations in the order they are applied: "
            f"{'+'.join(ordered)}-{mode}")
    problem = qat_problem(optimizations, mode)
    if problem:
        raise PipelineInputError(f"variant {text!r} is not useful: {problem}")
    return Variant(optimizations, mode)


def qat_problem(optimizations, mode: str | None = None) -> str:
    """Why quantization-aware training does not fit these optimizations (and `mode`, if given);
    '' when it does."""
    trained = [o for o in optimizations if o in QAT_MODES]
    if len(trained) > 1:
        return "qat trains for int8 and qat4 for int4; a model is trained for one of them"
    if mode is not None and trained and mode != QAT_MODES[trained[0]]:
        target = QAT_MODES[trained[0]]
        return (f"{trained[0]} trains the model for {target}; converting it to {mode} throws "
                f"that training away: use {'+'.join(optimizations)}-{target}")
    return ""


def parse_variants(names) -> list[Variant]:
    """Parse a comma-separated string or a list of names; duplicates are dropped, order kept."""
    if isinstance(names, str):
        names = names.split(",")
    variants: list[Variant] = []
    for name in names:
        variant = parse_variant(name)
        if variant not in variants:
            variants.append(variant)
    if not variants:
        raise PipelineInputError("no variants selected: give at least one, e.g. 'float32,dynamic'")
    return variants


def all_variant_names() -> list[str]:
    """Every valid recipe name (for the trigger form's choices)."""
    from itertools import combinations
    names = []
    for size in range(len(OPTIMIZATION_ORDER) + 1):
        for optimizations in combinations(OPTIMIZATION_ORDER, size):
            for mode in QUANTIZATION_MODES:
                if qat_problem(optimizations, mode):
                    continue
                names.append(Variant(optimizations, mode).name)
    return names + [Variant((AUTO,), mode).name for mode in SEARCH_CHAINS]


def is_search(recipe: str) -> bool:
    """Whether a recipe name (stages.recipes) is an `auto-<mode>` search."""
    return recipe.startswith(AUTO + "-")
