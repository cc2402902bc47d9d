"""Expert-combination search: which ``r`` of ``n`` experts each MoE layer keeps (method.md §2, §5, §6).

* :mod:`pipeline.search.registry` — the strategies by name (torch-free: the params schema reads it).
* :mod:`pipeline.search.scoring` — one expert pass per chunk of tokens, Gram matrices, every
  candidate's loss from them (:class:`~pipeline.search.scoring.LayerScorer`).
* :mod:`pipeline.search.reference` — the same loss computed directly, one pruned block per candidate.
* :mod:`pipeline.search.strategies`, :mod:`pipeline.search.evolutionary` — enumerate, greedy, beam,
  evolutionary; :mod:`pipeline.search.baselines` — frequency, random, REAP.
* :mod:`pipeline.search.run` — one layer's search with baselines and verification; layerwise and
  progressive drivers with resume. :mod:`pipeline.search.report` — selection.json, tables, plots.
"""
