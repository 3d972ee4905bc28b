"""mackay_update_: compiled kernels against the pure-PyTorch reference (float64 where it
matters), hand-computed values, opcheck, torch.compile, and rejected inputs."""
import math

import pytest
import torch

import mackay_ext
from mackay_ext import reference
from mackay_ext.ops import mackay_update_

from conftest import DEVICES

RULES = ["mackay", "em", "paper"]
PRUNES = ["alpha", "snr"]
# Thresholds that prune part of the random test data, so both outcomes are exercised.
THRESHOLDS = {"alpha": 3e3, "snr": 0.5}

# (weight shape, alpha shape): per weight, per input neuron, per output neuron, per filter,
# per input channel (not foldable into [groups, n]: a working copy), the whole tensor, scalars.
GROUP_CASES = [
    ((37, 53), (37, 53)),
    ((37, 53), (1, 53)),
    ((37, 53), (53,)),
    ((37, 53), (37, 1)),
    ((37, 53), (1, 1)),
    ((37, 53), ()),
    ((300, 257), (300, 257)),
    ((300, 257), (1, 257)),
    ((300, 257), (300, 1)),
    ((7, 5, 3, 3), (7, 1, 1, 1)),
    ((7, 5, 3, 3), (1, 5, 1, 1)),
    ((7, 5, 3, 3), (7, 5, 3, 3)),
    ((101,), (101,)),
    ((101,), (1,)),
    ((), ()),
]


def make_case(weight_shape, alpha_shape, dtype=torch.float64, alpha_dtype=None, device="cpu"):
    """Random weights, curvature and alpha with the edge values mixed in: w = 0, h = 0, h < 0,
    alpha = 0 (no prior) and alpha = +inf (already pruned, with its weights at 0)."""
    alpha_dtype = alpha_dtype or (dtype if dtype == torch.float64 else torch.float32)
    weight = torch.randn(weight_shape, dtype=torch.float64) * 0.05
    weight[torch.rand(weight_shape) < 0.05] = 0
    curvature = torch.rand(weight_shape, dtype=torch.float64) * 1e-3
    curvature[torch.rand(weight_shape) < 0.05] = 0
    curvature[torch.rand(weight_shape) < 0.02] *= -1
    alpha = torch.rand(alpha_shape, dtype=torch.float64) * 2e3
    if alpha.dim() > 0 and alpha.numel() > 3:
        alpha[torch.rand(alpha_shape) < 0.1] = 0
        alpha[torch.rand(alpha_shape) < 0.1] = math.inf
    weight.masked_fill_((alpha == math.inf).expand(weight_shape), 0)
    return (weight.to(device=device, dtype=dtype), curvature.to(device=device, dtype=dtype),
            alpha.to(device=device, dtype=alpha_dtype))


def run_both(weight, curvature, alpha, **kwargs):
    w_ext, a_ext = weight.clone(), alpha.clone()
    w_ref, a_ref = weight.clone(), alpha.clone()
    stats_ext = mackay_update_(w_ext, curvature, a_ext, **kwargs)
    stats_ref = reference.mackay_update_(w_ref, curvature, a_ref, **kwargs)
    return (w_ext, a_ext, stats_ext), (w_ref, a_ref, stats_ref)


def assert_same(ext, ref, rtol):
    (w_ext, a_ext, s_ext), (w_ref, a_ref, s_ref) = ext, ref
    assert torch.equal(a_ext == math.inf, a_ref == math.inf), "pruned groups differ"
    torch.testing.assert_close(a_ext, a_ref, rtol=rtol, atol=0)
    torch.testing.assert_close(w_ext, w_ref, rtol=0, atol=0)
    assert s_ext.num_pruned.dtype == torch.int64 and s_ext.num_pruned.dim() == 0
    assert s_ext.gamma_sum.dtype == torch.float64 and s_ext.gamma_sum.dim() == 0
    assert s_ext.gamma_sum.device == w_ext.device
    assert int(s_ext.num_pruned) == int(s_ref.num_pruned)
    torch.testing.assert_close(s_ext.gamma_sum, s_ref.gamma_sum, rtol=max(rtol, 1e-6), atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prune", PRUNES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shapes", GROUP_CASES, ids=str)
def test_matches_reference_float64(device, shapes, rule, prune):
    weight, curvature, alpha = make_case(*shapes, device=device)
    ext, ref = run_both(weight, curvature, alpha, num_data=6e4, rule=rule, prune=prune,
                        threshold=THRESHOLDS[prune])
    assert_same(ext, ref, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,alpha_dtype", [
    (torch.float32, torch.float32), (torch.float64, torch.float32),
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("shapes", [((300, 257), (300, 257)), ((300, 257), (1, 257)),
                                    ((300, 257), (300, 1)), ((7, 5, 3, 3), (1, 5, 1, 1))], ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_matches_reference_other_dtypes(device, dtype, alpha_dtype, shapes, rule):
    weight, curvature, alpha = make_case(*shapes, dtype=dtype, alpha_dtype=alpha_dtype,
                                         device=device)
    for prune in PRUNES:
        ext, ref = run_both(weight, curvature, alpha, num_data=6e4, rule=rule, prune=prune,
                            threshold=THRESHOLDS[prune])
        # float32 sums in a different order: allow rounding, and compare decisions away from
        # the threshold (equality of the pruned sets is checked on float64 above).
        (w_ext, a_ext, _), (_, a_ref, _) = ext, ref
        mismatch = (a_ext == math.inf) != (a_ref == math.inf)
        assert mismatch.sum() <= max(1, mismatch.numel() // 1000)
        both = (a_ext != math.inf) & (a_ref != math.inf)
        torch.testing.assert_close(a_ext[both], a_ref[both], rtol=1e-4, atol=0)
        assert a_ext.dtype == alpha_dtype and w_ext.dtype == dtype


def _group_reference(w, h, a, n_data, rule, eps=1e-16):
    """One group in plain Python floats, straight from docs/mathematics.md section 1."""
    n_h = [n_data * max(x, 0.0) for x in h]
    gamma = sum(1.0 if a == 0 else nh / (nh + a) for nh in n_h)
    wsq = sum(x * x for x in w)
    if rule == "mackay":
        return gamma / (wsq + eps), gamma
    if rule == "em":
        return len(w) / (wsq + sum(1.0 / (nh + a) if nh + a > 0 else math.inf for nh in n_h)), gamma
    return len(w) / (wsq + eps), float(len(w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", RULES)
def test_hand_computed_group(device, rule):
    w = [0.3, -0.2, 0.05, 0.0]
    h = [0.01, 0.2, 0.0, 0.5]
    for a0 in (0.0, 7.5):
        expected_alpha, expected_gamma = _group_reference(w, h, a0, 100.0, rule)
        weight = torch.tensor([w], dtype=torch.float64, device=device)
        curvature = torch.tensor([h], dtype=torch.float64, device=device)
        alpha = torch.tensor([[a0]], dtype=torch.float64, device=device)
        stats = mackay_update_(weight, curvature, alpha, num_data=100, rule=rule)
        assert alpha.item() == pytest.approx(expected_alpha, rel=1e-12)
        assert stats.gamma_sum.item() == pytest.approx(expected_gamma, rel=1e-12)
        assert stats.num_pruned.item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_zero_no_curvature_means_gamma_one(device):
    weight = torch.full((5,), 0.5, dtype=torch.float64, device=device)
    curvature = torch.zeros(5, dtype=torch.float64, device=device)
    alpha = torch.zeros(5, dtype=torch.float64, device=device)
    stats = mackay_update_(weight, curvature, alpha, num_data=10)
    assert stats.gamma_sum.item() == 5.0
    torch.testing.assert_close(alpha, torch.full_like(alpha, 4.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prune", PRUNES)
def test_pruned_groups_stay_pruned_and_zero(device, prune):
    weight, curvature, alpha = make_case((64, 33), (64, 1), device=device)
    alpha[:5] = math.inf
    weight[:5] = 1.0  # a stale weight under a pruned alpha is zeroed, never revived
    mackay_update_(weight, curvature, alpha, num_data=1e3, prune=prune)
    assert torch.all(alpha[:5] == math.inf)
    assert torch.all(weight[:5] == 0)
    pruned = (alpha == math.inf).expand_as(weight)
    assert torch.all(weight[pruned] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_snr_prunes_weights_the_data_cannot_tell_from_zero(device):
    weight = torch.tensor([1.0, 1e-4], dtype=torch.float64, device=device)
    curvature = torch.tensor([1.0, 1e-6], dtype=torch.float64, device=device)
    alpha = torch.tensor([1.0, 1.0], dtype=torch.float64, device=device)
    stats = mackay_update_(weight, curvature, alpha, num_data=100, prune="snr")
    assert alpha[0].item() < math.inf and alpha[1].item() == math.inf
    assert weight.tolist() == [1.0, 0.0]
    assert stats.num_pruned.item() == 1


@pytest.mark.parametrize("device", DEVICES)
def test_default_alpha_threshold_is_the_papers(device):
    weight = torch.tensor([1e-7, 1e-6], dtype=torch.float64, device=device)
    curvature = torch.zeros(2, dtype=torch.float64, device=device)
    alpha = torch.zeros(2, dtype=torch.float64, device=device)
    mackay_update_(weight, curvature, alpha, num_data=1, rule="paper")  # 1e14 and 1e12
    assert alpha[0].item() == math.inf and alpha[1].item() == pytest.approx(1.0 / (1e-12 + 1e-16))


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_clamp_and_nan_keeps_old_alpha(device):
    weight = torch.tensor([0.1, float("nan"), 10.0], dtype=torch.float64, device=device)
    curvature = torch.tensor([1.0, 1.0, float("nan")], dtype=torch.float64, device=device)
    alpha = torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64, device=device)
    mackay_update_(weight, curvature, alpha, num_data=1, rule="paper", alpha_min=0.5,
                   alpha_max=50.0)
    assert alpha.tolist() == [50.0, 3.0, 0.5]
    ref_alpha = torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64, device=device)
    reference.mackay_update_(weight.clone(), curvature, ref_alpha, num_data=1, rule="paper",
                             alpha_min=0.5, alpha_max=50.0)
    assert ref_alpha.tolist() == alpha.tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha_shape", [(0, 4), (1, 4), (0, 1)], ids=str)
def test_empty_tensors(device, alpha_shape):
    weight = torch.empty((0, 4), dtype=torch.float64, device=device)
    alpha = torch.ones(alpha_shape, dtype=torch.float64, device=device)
    before = alpha.clone()
    for update in (mackay_update_, reference.mackay_update_):
        stats = update(weight, torch.empty_like(weight), alpha, num_data=10)
        assert stats.gamma_sum.item() == 0 and stats.num_pruned.item() == 0
        assert torch.equal(alpha, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha_shape", [(53, 37), (1, 37), (53, 1)], ids=str)
def test_non_contiguous_weight_and_curvature(device, alpha_shape):
    # weight is the transpose of a contiguous (37, 53) tensor; curvature a strided slice.
    weight, curvature, alpha = make_case((53, 37), alpha_shape, device=device)
    weight_t = weight.t().contiguous().t()
    curvature_s = torch.zeros(53, 74, dtype=torch.float64, device=device)[:, ::2]
    curvature_s.copy_(curvature)
    assert not weight_t.is_contiguous() and not curvature_s.is_contiguous()
    ext, ref = run_both(weight_t, curvature_s, alpha, num_data=6e4, prune="snr", threshold=0.5)
    assert_same(ext, ref, rtol=1e-12)
    # in-place really means in place on the caller's (strided) tensors
    w_ext = weight_t.clone().t().contiguous().t()
    a_ext = alpha.clone()
    mackay_update_(w_ext, curvature_s, a_ext, num_data=6e4, prune="snr", threshold=0.5)
    torch.testing.assert_close(w_ext, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(a_ext, ref[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_alpha_is_updated_in_place(device):
    weight, curvature, _ = make_case((20, 30), (20, 30), device=device)
    storage = torch.rand(30, 20, dtype=torch.float64, device=device) * 100
    alpha = storage.t()  # a (20, 30) view with strides (1, 20)
    ref_alpha = alpha.clone()
    mackay_update_(weight.clone(), curvature, alpha, num_data=1e3)
    reference.mackay_update_(weight.clone(), curvature, ref_alpha, num_data=1e3)
    torch.testing.assert_close(storage.t(), ref_alpha, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_backend_switch(device):
    weight, curvature, alpha = make_case((40, 20), (1, 20), device=device)
    w1, a1, w2, a2 = weight.clone(), alpha.clone(), weight.clone(), alpha.clone()
    s1 = mackay_update_(w1, curvature, a1, num_data=500, backend="torch")
    s2 = reference.mackay_update_(w2, curvature, a2, num_data=500)
    assert torch.equal(a1, a2) and torch.equal(w1, w2) and torch.equal(s1.gamma_sum, s2.gamma_sum)
    with pytest.raises(ValueError, match="backend"):
        mackay_update_(w1, curvature, a1, num_data=500, backend="triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", [((13, 7), (13, 7)), ((13, 7), (1, 7)), ((4, 3, 2, 2), (4, 1, 1, 1))],
                         ids=str)
def test_opcheck(device, shapes):
    weight, curvature, alpha = make_case(*shapes, device=device)
    for kwargs in ({"num_data": 100.0}, {"num_data": 100.0, "rule": "em", "prune": "snr",
                                        "threshold": 0.5, "alpha_max": 1e6}):
        torch.library.opcheck(torch.ops.mackay_ext.mackay_update_.default,
                              (weight.clone(), curvature, alpha.clone()), kwargs)


def test_torch_compile_fullgraph():
    weight, curvature, alpha = make_case((30, 20), (1, 20), dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(w, h, a):
        stats = mackay_update_(w, h, a, num_data=1000.0, prune="snr")
        return stats.gamma_sum * 2, stats.num_pruned

    w1, a1, w2, a2 = weight.clone(), alpha.clone(), weight.clone(), alpha.clone()
    gamma2, pruned = step(w1, curvature, a1)
    stats = mackay_update_(w2, curvature, a2, num_data=1000.0, prune="snr")
    assert torch.equal(a1, a2) and torch.equal(w1, w2)
    torch.testing.assert_close(gamma2, stats.gamma_sum * 2)
    assert int(pruned) == int(stats.num_pruned)


BAD_INPUTS = [
    ("alpha not broadcastable", dict(alpha=torch.zeros(3, 5)), RuntimeError, "alpha must be broadcastable"),
    ("alpha with more dims", dict(alpha=torch.zeros(1, 4, 5)), RuntimeError, "alpha must be broadcastable"),
    ("curvature shape", dict(curvature=torch.zeros(5, 4)), RuntimeError, "curvature must have the weight's shape"),
    ("curvature dtype", dict(curvature=torch.zeros(4, 5, dtype=torch.float64)), TypeError, "curvature must have the weight's dtype"),
    ("integer weight", dict(weight=torch.zeros(4, 5, dtype=torch.int32)), TypeError, "weight must be float32"),
    ("integer alpha", dict(alpha=torch.zeros(4, 5, dtype=torch.int64)), TypeError, "alpha must be float32 or float64"),
    ("half alpha", dict(alpha=torch.zeros(4, 5, dtype=torch.float16)), TypeError, "alpha must be float32 or float64"),
    ("negative num_data", dict(num_data=-1.0), ValueError, "num_data must be a positive"),
    ("zero num_data", dict(num_data=0.0), ValueError, "num_data must be a positive"),
    ("nan num_data", dict(num_data=float("nan")), ValueError, "num_data must be a positive"),
    ("unknown rule", dict(rule="laplace"), ValueError, "rule must be one of"),
    ("unknown prune", dict(prune="magnitude"), ValueError, "prune must be"),
    ("negative threshold", dict(threshold=-1.0), ValueError, "threshold must be finite"),
    ("negative eps", dict(eps=-1.0), ValueError, "eps must be finite"),
    ("alpha_max below alpha_min", dict(alpha_min=2.0, alpha_max=1.0), ValueError, "alpha_max must be"),
    ("expanded alpha", dict(alpha=torch.zeros(1, 5).expand(4, 5)), RuntimeError, "alpha has overlapping memory"),
    ("sparse weight", dict(weight=torch.zeros(4, 5).to_sparse()), RuntimeError, "dense"),
]


@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("name,override,error,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_rejected_and_nothing_changes(backend, name, override, error, message):
    if backend == "torch" and name == "expanded alpha":
        pytest.skip("the reference writes alpha through copy_, which rejects it on its own")
    args = dict(weight=torch.randn(4, 5), curvature=torch.rand(4, 5), alpha=torch.rand(4, 5),
                num_data=10.0)
    args.update(override)
    snapshot = {k: v.clone() for k, v in args.items()
                if isinstance(v, torch.Tensor) and v.layout == torch.strided}
    weight, curvature, alpha = args.pop("weight"), args.pop("curvature"), args.pop("alpha")
    with pytest.raises(error, match=message):
        mackay_update_(weight, curvature, alpha, backend=backend, **args)
    for key, tensor in (("weight", weight), ("alpha", alpha)):
        if key in snapshot:
            assert torch.equal(tensor, snapshot[key]), f"{key} changed by a rejected call"


def test_weight_aliasing_alpha_is_rejected():
    storage = torch.rand(10)
    with pytest.raises(RuntimeError, match="must not share memory"):
        mackay_update_(storage[:5], torch.rand(5), storage[4:9], num_data=10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices_rejected():
    with pytest.raises(RuntimeError, match="one device"):
        mackay_update_(torch.rand(4, 5, device="cuda"), torch.rand(4, 5), torch.rand(4, 5),
                       num_data=10)


def test_meta_alpha_with_cpu_weight_is_rejected_not_ignored():
    # the dispatcher routes a CPU/meta mix to the fake kernel, which must not pass silently
    with pytest.raises(RuntimeError, match="one device"):
        mackay_update_(torch.rand(4, 5), torch.rand(4, 5), torch.rand(4, 5, device="meta"),
                       num_data=10)


@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("prune", ["snr", "alpha"])
def test_an_estimate_beyond_float32_is_capped_not_stored_as_pruned(backend, prune):
    """Tiny float64 weights with eps = 0 make estimates above float32's range: alpha holds the
    largest float32 (or the group is pruned, its weights zeroed), never +inf beside a live weight."""
    weight = torch.tensor([[1e-30, 0.5], [0.3, 1e-25]], dtype=torch.float64)
    curvature = torch.full_like(weight, 1e-3)
    alpha = torch.ones(2, 2, dtype=torch.float32)
    mackay_ext.mackay_update_(weight, curvature, alpha, num_data=100.0, rule="mackay", prune=prune,
                              threshold=None, eps=0.0, backend=backend)
    pruned = alpha == math.inf
    assert bool((weight[pruned] == 0).all()) and bool((weight[~pruned] != 0).all())
    assert bool(torch.isfinite(alpha[~pruned]).all())
    if prune == "alpha":   # alpha >= 1e13: the two tiny weights go
        assert pruned.tolist() == [[True, False], [False, True]]


@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_negative_or_nan_precisions_are_refused_before_anything_changes(backend):
    """alpha = -1 with N h = 1 made N h + alpha zero: gamma infinite, alpha +inf, and every weight
    of a healthy layer pruned without a word (a new-user pass)."""
    weight = torch.ones(2, 2)
    for curvature, alpha, message in (
            (torch.full((2, 2), 0.01), torch.full((1, 2), -1.0), r"alpha must hold precisions >= 0 .*min -1.0"),
            (torch.full((2, 2), 0.01), torch.tensor([[0.0, math.nan]]), "alpha must hold precisions >= 0")):
        before = alpha.clone()
        with pytest.raises(ValueError, match=message):
            mackay_update_(weight, curvature, alpha, num_data=100.0, backend=backend)
        assert torch.equal(weight, torch.ones(2, 2))
        torch.testing.assert_close(alpha, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_expanded_weights_or_alphas_are_refused_on_both_backends(backend):
    """The torch backend wrote an expanded weight in place with only torch's warning."""
    curvature = torch.full((3, 4), 0.01)
    with pytest.raises(RuntimeError, match="mackay_update_: weight has overlapping memory"):
        mackay_update_(torch.ones(1, 4).expand(3, 4), curvature, torch.zeros(3, 4), num_data=10.0, backend=backend)
    with pytest.raises(RuntimeError, match="mackay_update_: alpha has overlapping memory"):
        mackay_update_(torch.ones(3, 4), curvature, torch.zeros(1, 4).expand(3, 4), num_data=10.0, backend=backend)


@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_empty_tensors_with_zero_strides_are_accepted_on_both_backends(backend):
    """torch gives an empty product stride 0 ((2, 0, 1) * 2 has strides (0, 1, 0)); empty memory cannot
    overlap, and the torch backend refused what the compiled op accepts (found by hypothesis in CI)."""
    alpha = torch.rand(2, 0, 1, dtype=torch.float64) * 2.0
    weight = torch.empty_strided((2, 0, 3), (0, 0, 0), dtype=torch.float64)
    assert 0 in alpha.stride() and 0 in weight.stride()
    stats = mackay_update_(weight, torch.zeros_like(weight), alpha, num_data=10.0, backend=backend)
    assert int(stats.num_pruned) == 0 and float(stats.gamma_sum) == 0.0
