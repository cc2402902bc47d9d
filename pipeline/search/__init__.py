"""Expert-combination search: which ``r`` of ``n`` experts each MoE layer keeps (method.md §2, §5, §6).

* :mod:`pipeline.search.scoring` — one expert pass per chunk of tokens, Gram matrices, every
  candidate's loss from them (:class:`LayerScorer`).
* :mod:`pipeline.search.reference` — the same loss computed directly, one pruned block per candidate.
* :mod:`pipeline.search.strategies`, :mod:`pipeline.search.evolutionary` — enumerate, greedy, beam,
  evolutionary; :mod:`pipeline.search.baselines` — frequency, random, REAP.
* :mod:`pipeline.search.run` — one layer's search with baselines and verification; layerwise and
  progressive drivers with resume. :mod:`pipeline.search.report` — selection.json, tables, plots.
"""

from pipeline.search.reference import reference_losses
from pipeline.search.run import LayerResult, SearchSettings, run_layerwise, run_progressive, search_layer
from pipeline.search.scoring import LayerScorer
from pipeline.search.strategies import resolve, validate_r

__all__ = [
    "LayerResult",
    "LayerScorer",
    "SearchSettings",
    "reference_losses",
    "resolve",
    "run_layerwise",
    "run_progressive",
    "search_layer",
    "validate_r",
]
