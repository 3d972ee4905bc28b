"""mackay_ext.ops.adam_proximal_prior_: the ARD prior's proximal step after a torch Adam step, in
one pass, against a float64 reference; and the pruner's use of it under torch's Adam/AdamW."""
import math

import pytest
import torch

import mackay_ext
from mackay_ext import MacKayPruner
from mackay_ext.ops import adam_proximal_prior_

from conftest import CUDA_AVAILABLE, DEVICES

TINY = torch.finfo(torch.float32).tiny
HYPER = dict(beta2=0.99, eps=1e-6, scale=3e-2)


def reference(weight, v, alpha, step, *, beta2, eps, scale):
    """The proximal prior (docs/mathematics.md section 2) at Adam's step per unit of gradient,
    float64, written out plainly."""
    w, v, a = weight.double(), v.double(), alpha.double().expand_as(weight)
    d = torch.sqrt(v / (1 - beta2 ** max(float(step), 1.0)) + TINY) + eps
    shrunk = w * d / (d + scale * torch.where(a == math.inf, torch.zeros_like(a), a))
    return torch.where(a == math.inf, torch.zeros_like(w), shrunk)


def _case(shape, alpha_shape, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator).to(device)
    v = (torch.rand(shape, generator=generator) * 1e-3).to(device)
    alpha = (torch.rand(alpha_shape, generator=generator) * 50).to(device)
    flat = alpha.view(-1)
    flat[torch.rand(flat.shape, generator=generator).to(device) < 0.2] = math.inf
    flat[torch.rand(flat.shape, generator=generator).to(device) < 0.2] = 0
    return weight, v, alpha


SHAPES = [((7, 13), (7, 13)), ((9, 11), (1, 11)), ((5, 3), (5, 1)), ((4, 3, 3, 3), (4, 1, 1, 1)),
          ((6, 5, 3, 3), (1, 5, 1, 1)), ((40003,), (40003,)), ((0, 5), (1, 5))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, alpha_shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_matches_the_float64_reference(device, shape, alpha_shape, backend):
    weight, v, alpha = _case(shape, alpha_shape, device)
    expected = reference(weight, v, alpha, 7.0, **HYPER)
    adam_proximal_prior_(weight, v, alpha, torch.tensor(7.0, device=device), **HYPER, backend=backend)
    torch.testing.assert_close(weight.double(), expected, rtol=2e-6, atol=1e-7)
    assert torch.all(weight[(alpha == math.inf).expand_as(weight)] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_non_contiguous_weight_and_a_step_before_the_first(device):
    """A transposed weight (its own strides; v alike), and step 0 read as Adam's first step."""
    weight, v, alpha = _case((13, 7), (13, 7), device)
    weight_t, v_t, alpha_t = weight.t(), v.t(), alpha.t()   # non-contiguous views, written through
    expected = reference(weight_t, v_t, alpha_t, 1.0, **HYPER)
    adam_proximal_prior_(weight_t, v_t, alpha_t, torch.zeros((), device=device, dtype=torch.float64), **HYPER)
    torch.testing.assert_close(weight_t.double(), expected, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["v transposed", "channels_last", "offset slice"])
def test_layouts_of_their_own(device, layout):
    """The weight and v each indexed by its own strides, with alpha broadcast: v with other strides
    than the weight's, a channels_last conv weight under a per-output-channel alpha (no dimension
    merges), a sliced weight at a storage offset under a per-column alpha."""
    if layout == "v transposed":
        weight, v, alpha = _case((13, 7), (13, 1), device)
        v = v.t().contiguous().t()   # the same values, column-major
    elif layout == "channels_last":
        weight, v, alpha = _case((8, 3, 3, 5), (8, 1, 1, 1), device)
        weight = weight.contiguous(memory_format=torch.channels_last)
    else:
        weight, v, alpha = _case((9, 15), (1, 11), device)
        weight, v = weight[2:, 3:14], v[1:8, 2:13]
    assert not (weight.is_contiguous() and v.is_contiguous())
    expected = reference(weight, v, alpha, 5.0, **HYPER)
    adam_proximal_prior_(weight, v, alpha, torch.tensor(5.0, device=device), **HYPER)
    torch.testing.assert_close(weight.double(), expected, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flag_on_cpu", [False, True], ids=["flag on the weight's device", "flag on the cpu"])
def test_a_skipped_step_changes_nothing(device, flag_on_cpu):
    weight, v, alpha = _case((9, 11), (1, 11), device)
    before = weight.clone()
    flag_device = "cpu" if flag_on_cpu else device
    adam_proximal_prior_(weight, v, alpha, torch.tensor(3.0), **HYPER, found_inf=torch.ones((), device=flag_device))
    assert torch.equal(weight, before)   # pruned entries included: the step GradScaler skipped changed nothing
    adam_proximal_prior_(weight, v, alpha, torch.tensor(3.0), **HYPER, found_inf=torch.zeros((), device=flag_device))
    torch.testing.assert_close(weight.double(), reference(before, v, alpha, 3.0, **HYPER), rtol=2e-6, atol=1e-7)


@pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA GPU")
def test_cuda_past_one_grid_and_on_a_side_stream():
    """A weight of more elements than one launch's 65,535 blocks of 256 threads cover (the kernel's
    grid-stride loop), stepped on a stream other than the default one (the kernel runs on the
    current stream: read after that stream, the result is there)."""
    weight, v, alpha = _case((4097, 4097), (4097, 1), "cuda")
    expected = reference(weight, v, alpha, 9.0, **HYPER)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        adam_proximal_prior_(weight, v, alpha, torch.tensor(9.0, device="cuda"), **HYPER)
    stream.synchronize()
    torch.testing.assert_close(weight.double(), expected, rtol=2e-6, atol=1e-7)


@pytest.mark.skipif(not CUDA_AVAILABLE or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_model_over_two_gpus_under_grad_scaler():
    """GradScaler keeps one found_inf per device: the weights on the second GPU are stepped with
    the flag of their own device, and a weight off the current device gets its own device's
    kernel (a guard); the result is the general path's."""
    runs = []
    for backend in ("ext", "torch"):
        torch.manual_seed(0)
        first, second = torch.nn.Linear(6, 9).to("cuda:0"), torch.nn.Linear(9, 3).to("cuda:1")
        model = torch.nn.ModuleDict({"first": first, "second": second})
        opt = torch.optim.Adam(model.parameters(), lr=3e-2, fused=True)
        pruner = MacKayPruner(model, opt, num_data=64, batch_size=16, backend=backend, curvature="ef-batch",
                              prune="alpha", threshold=1e3)
        scaler = torch.amp.GradScaler("cuda")
        generator = torch.Generator().manual_seed(1)
        for step in range(20):
            x = torch.randn(16, 6, generator=generator).to("cuda:0")
            y = torch.randint(0, 3, (16,), generator=generator).to("cuda:1")
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(second(torch.tanh(first(x)).to("cuda:1")), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if step % 10 == 9:
                pruner.update()
        runs.append([p.detach().cpu() for p in model.parameters()])
    for ext, torch_path in zip(*runs):
        torch.testing.assert_close(ext, torch_path, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    weight, v, alpha = _case((9, 11), (1, 11), device)
    torch.library.opcheck(torch.ops.mackay_ext.adam_proximal_prior_.default,
                          (weight, v, alpha, torch.tensor(4.0)), HYPER)
    torch.library.opcheck(torch.ops.mackay_ext.adam_proximal_prior_.default,
                          (weight, v, alpha, torch.tensor(4.0, device=device)),
                          dict(HYPER, found_inf=torch.zeros((), device=device)))


BAD = [
    (dict(weight=torch.zeros(3, 4, dtype=torch.float64)), TypeError, r"weight, exp_avg_sq and alpha must be float32"),
    (dict(v=torch.zeros(4, 3)), RuntimeError, r"exp_avg_sq must have the weight's shape \[3, 4\], got \[4, 3\]"),
    (dict(alpha=torch.zeros(3, 2)), RuntimeError, r"alpha must be broadcastable to the weight's shape \[3, 4\]"),
    (dict(step=torch.zeros(2)), RuntimeError, r"step must be one float32 or float64 value"),
    (dict(beta2=1.0), ValueError, r"beta2 must be in \[0, 1\), got 1"),
    (dict(scale=-1.0), ValueError, r"scale \(lr / N\) must be finite and >= 0, got -1"),
    (dict(weight=torch.zeros(4).expand(3, 4)), RuntimeError, r"weight has overlapping memory"),
    (dict(v=torch.zeros(3, 4).to_sparse()), RuntimeError, r"exp_avg_sq must be a dense \(strided\) tensor"),
]


@pytest.mark.parametrize("change, error, message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_arguments_are_named(change, error, message):
    args = dict(weight=torch.zeros(3, 4), v=torch.zeros(3, 4), alpha=torch.ones(3, 4), step=torch.tensor(1.0),
                beta2=0.9, eps=1e-8, scale=1e-3)
    args.update(change)
    with pytest.raises(error, match=message):
        adam_proximal_prior_(args["weight"], args["v"], args["alpha"], args["step"], beta2=args["beta2"],
                             eps=args["eps"], scale=args["scale"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "NAdam", "Adam-fused"])
def test_the_pruner_steps_as_the_general_path_does(device, optimizer, monkeypatch):
    """The pruner's one-pass prior (backend 'ext', float32, Adam family) against its general
    path (backend 'torch'): the same weights after training steps with updates between."""
    calls = []
    one_pass = mackay_ext.standalone_prior.adam_proximal_prior_
    monkeypatch.setattr(mackay_ext.standalone_prior, "adam_proximal_prior_",
                        lambda *args, **kwargs: calls.append(1) or one_pass(*args, **kwargs))
    runs = []
    for backend in ("ext", "torch"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(device)
        kind = optimizer.removesuffix("-fused")
        options = {"fused": True} if optimizer.endswith("fused") else {}
        opt = getattr(torch.optim, kind)(model.parameters(), lr=3e-2, **options)
        pruner = MacKayPruner(model, opt, num_data=64, batch_size=16, backend=backend, prune="alpha", threshold=1e3)
        generator = torch.Generator().manual_seed(1)
        for step in range(30):
            x = torch.randn(16, 6, generator=generator).to(device)
            y = torch.randint(0, 3, (16,), generator=generator).to(device)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if step % 10 == 9:
                pruner.update()
        runs.append([p.detach().clone() for p in model.parameters()])
        pruned = sum(int((pruner.alpha(n) == math.inf).sum()) for n in pruner.targets)
    assert pruned > 0 and len(calls) == 2 * 20   # the masks were exercised too; the kernel ran
    # on both layers at every step after the first update (the 'torch' pruner never calls it)
    for ext, torch_path in zip(*runs):
        torch.testing.assert_close(ext, torch_path, rtol=1e-5, atol=1e-6)
