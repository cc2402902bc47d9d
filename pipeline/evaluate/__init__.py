"""Benchmarking of model variants: lm-eval accuracy and perplexity, decoding speed, memory, report.

- :mod:`~pipeline.evaluate.tasks`: the ``embedded`` lm-eval tasks (the corpus stage's task files, checked),
  and validation of lm-eval task names;
- :mod:`~pipeline.evaluate.lmeval`: ``simple_evaluate`` on an in-memory model (HFLM) or through vllm;
- :mod:`~pipeline.evaluate.speed`: greedy decoding at batch size 1, variants interleaved;
- :mod:`~pipeline.evaluate.memory`: weight bytes, peak RSS and CUDA memory;
- :mod:`~pipeline.evaluate.stats`: 95% intervals, paired differences from the original, verdicts;
- :mod:`~pipeline.evaluate.report`: metrics.json, report.md and plots;
- :mod:`~pipeline.evaluate.runner`: all of the above for a list of variants.
"""

from pipeline.evaluate.report import VariantResult, build_metrics, check_metrics, render_report, write_plots
from pipeline.evaluate.runner import BenchmarkSetup, Variant, run_benchmark
from pipeline.evaluate.tasks import EMBEDDED, select_tasks

__all__ = [
    "EMBEDDED",
    "BenchmarkSetup",
    "Variant",
    "VariantResult",
    "build_metrics",
    "check_metrics",
    "render_report",
    "run_benchmark",
    "select_tasks",
    "write_plots",
]
