"""Which path every layer took, summarised for the user (pure Python)."""
from __future__ import annotations

from collections import Counter

from ..kernels.module import NVFP4LinearModule


def linear_modules(model) -> list[NVFP4LinearModule]:
    return [m for m in model.modules() if isinstance(m, NVFP4LinearModule)]


def path_counts(model) -> dict[str, int]:
    """Counts of the path each layer took in its last forward (`not run` if it never ran)."""
    return dict(Counter(m.last_path or "not run" for m in linear_modules(model)))


def format_counts(modules: list[NVFP4LinearModule]) -> dict[str, int]:
    return dict(Counter(m.format or "unloaded" for m in modules))


def summary_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v} layer{'s' if v != 1 else ''}" for k, v in
                     sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def reset_paths(model) -> None:
    for m in linear_modules(model):
        m.last_path = None
