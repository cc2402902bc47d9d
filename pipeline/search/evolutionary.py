"""EEP-style evolutionary search over kept-expert sets (Liu et al. 2024; method.md §4).

A population of ``r``-subsets evolves by tournament selection, set crossover (keep the parents'
common experts, fill up from the others) and mutation (swap a kept expert for a dropped one), with
(mu + lambda) elitist survival. Fitness defaults to the reconstruction loss; any
``fitness(kept [C, r]) -> [C]`` (lower is better) can be plugged in. Each distinct set is scored
once, and the search stops after ``budget`` distinct sets (or when every set has been seen).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.config import EvolutionaryParams
from pipeline.search.strategies import Fitness, LayerProblem, StrategyResult, best_of


def _random_set(rng: np.random.Generator, n: int, r: int) -> tuple[int, ...]:
    return tuple(sorted(int(e) for e in rng.choice(n, size=r, replace=False)))


def _crossover(rng: np.random.Generator, a: tuple[int, ...], b: tuple[int, ...], r: int) -> tuple[int, ...]:
    common = sorted(set(a) & set(b))
    rest = sorted(set(a) ^ set(b))
    fill = rng.choice(len(rest), size=r - len(common), replace=False) if len(common) < r else []
    return tuple(sorted(common + [rest[int(i)] for i in fill]))


def _mutate(rng: np.random.Generator, s: tuple[int, ...], n: int, rate: float) -> tuple[int, ...]:
    kept = list(s)
    for pos in range(len(kept)):
        if rng.random() < rate:
            dropped = sorted(set(range(n)) - set(kept))
            if dropped:
                kept[pos] = dropped[int(rng.integers(len(dropped)))]
    return tuple(sorted(kept))


def evolutionary_search(
    fitness: Fitness, n: int, r: int, settings: EvolutionaryParams, seed: int | list[int]
) -> StrategyResult:
    """Minimise ``fitness`` over ``r``-subsets of ``range(n)`` with at most ``settings.budget`` evaluations."""
    rng = np.random.default_rng(seed)
    total = math.comb(n, r)
    budget = min(settings.budget, total)
    seen: dict[tuple[int, ...], float] = {}

    def score(sets: list[tuple[int, ...]]) -> None:
        if sets:
            losses = fitness(torch.tensor(sets, dtype=torch.long)).double().cpu().tolist()
            seen.update(zip(sets, losses, strict=True))

    pop_size = min(settings.population, budget)
    initial: list[tuple[int, ...]] = []
    while len(initial) < pop_size:
        cand = _random_set(rng, n, r)
        if cand not in initial:
            initial.append(cand)
    score(initial)
    population = sorted(initial, key=lambda s: (seen[s], s))

    def tournament() -> tuple[int, ...]:
        i, j = rng.integers(len(population), size=2)
        return min(population[int(i)], population[int(j)], key=lambda s: (seen[s], s))

    while len(seen) < budget:
        want = min(settings.population, budget - len(seen))
        children: list[tuple[int, ...]] = []
        attempts = 0
        while len(children) < want and attempts < 50 * want:
            attempts += 1
            parent = tournament()
            child = _crossover(rng, parent, tournament(), r) if rng.random() < settings.crossover else parent
            child = _mutate(rng, child, n, settings.mutation)
            if child not in seen and child not in children:
                children.append(child)
        if not children:  # the population has converged: explore fresh random sets instead
            while len(children) < want:
                cand = _random_set(rng, n, r)
                if cand not in seen and cand not in children:
                    children.append(cand)
        score(children)
        population = sorted(set(population) | set(children), key=lambda s: (seen[s], s))[: settings.population]

    sets = sorted(seen)
    kept = torch.tensor(sets, dtype=torch.long).view(len(sets), r)
    losses = torch.tensor([seen[s] for s in sets], dtype=torch.float64)
    i = best_of(kept, losses)
    return StrategyResult(kept[i].tolist(), float(losses[i]), len(sets), kept, losses)


def evolutionary_layer(p: LayerProblem) -> StrategyResult:
    """:func:`evolutionary_search` on one layer, seeded by ``(search.seed, layer)``."""
    return evolutionary_search(p.losses, p.n, p.r, p.params.evolutionary, seed=[p.params.seed, p.layer])
