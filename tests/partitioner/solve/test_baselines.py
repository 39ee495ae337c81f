import itertools
import random

import pytest

from partitioner.solve.baselines import balanced_weights, equal_layers


def test_equal_layers() -> None:
    assert equal_layers(26, 4) == [0, 6, 13, 20, 26]
    assert equal_layers(4, 4) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="K=5"):
        equal_layers(4, 5)


def test_balanced_weights_is_optimal() -> None:
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        w = [rng.randint(0, 9) for _ in range(n)]
        cuts = balanced_weights(w, k)
        assert len(cuts) == k + 1 and all(a < b for a, b in itertools.pairwise(cuts))
        got = max(sum(w[a:b]) for a, b in itertools.pairwise(cuts))
        best = min(max(sum(w[a:b]) for a, b in itertools.pairwise((0, *c, n)))
                   for c in itertools.combinations(range(1, n), k - 1))
        assert got == best
