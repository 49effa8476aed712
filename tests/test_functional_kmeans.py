import torch

from lightning_distill.functional import kmeans_pp_starts, lloyd, squared_distances


def test_kmeans_pp_starts_are_distinct_rows_even_when_rows_repeat():
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]])
    starts = kmeans_pp_starts(x, 3, torch.Generator().manual_seed(0))
    assert starts.shape == (3, 2)
    assert {tuple(r) for r in starts.tolist()} == {(0.0, 0.0), (1.0, 1.0)}  # both points, then a repeat of a row


def test_lloyd_matches_a_naive_float64_kmeans():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    start = x[:4].clone()
    centres = start.clone()
    for _ in range(100):  # naive Lloyd: explicit distances, per-cluster means
        assign = torch.stack([((x - c) ** 2).sum(1) for c in centres], 1).argmin(1)
        new = torch.stack([x[assign == k].mean(0) if (assign == k).any() else centres[k] for k in range(4)])
        if torch.equal(new, centres):
            break
        centres = new
    torch.testing.assert_close(lloyd(x, start), centres)


def test_squared_distances_match_cdist_in_float64():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 9, generator=g, dtype=torch.float64), torch.randn(5, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(squared_distances(a, b), torch.cdist(a, b) ** 2)
    assert (squared_distances(a, a).diagonal() >= 0).all()


def test_kmeans_pp_starts_follow_the_given_generator():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(2))
    a = kmeans_pp_starts(x, 4, torch.Generator().manual_seed(5))
    b = kmeans_pp_starts(x, 4, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and len({tuple(r) for r in a.tolist()}) == 4
