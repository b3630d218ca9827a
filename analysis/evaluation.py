"""`patchscope eval` as one call: the metrics, then the heatmap pages and robustness sweeps its settings ask for.

`forensics.evaluate.evaluate` scores the test sets; heatmaps (`EvalConfig.heatmaps`) and perturbation
sweeps (`EvalConfig.perturb`) live in `analysis`, which may build on forensics but not the reverse,
so the three are put together here rather than in the command line.
"""
from __future__ import annotations

from typing import Any

from patchscope.analysis.heatmaps import write_eval_heatmaps
from patchscope.analysis.robustness import evaluate_robustness_tests
from patchscope.common import distributed
from patchscope.forensics.evaluate import EvalConfig, evaluate


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Evaluate, then write `config.heatmaps` heatmap pages and sweep `config.perturb`, each when set.

    Returns evaluate's summary (results, out, ...) with "heatmaps": {test set: write_eval_heatmaps'
    result} and "robustness": {"out": folder, "results": {test set: rows}} or None when not asked for.
    """
    summary = evaluate(config)
    heatmaps: dict[str, Any] = {}
    robustness = None
    if not distributed.is_main():  # under torchrun the metrics are sharded; the pages and sweeps are rank 0's
        return {**summary, "heatmaps": heatmaps, "robustness": robustness}
    with distributed.alone():
        if config.heatmaps:
            heatmaps = write_eval_heatmaps(config, config.heatmaps)
        if config.perturb:
            robustness = evaluate_robustness_tests(config, config.perturb)
    return {**summary, "heatmaps": heatmaps, "robustness": robustness}
