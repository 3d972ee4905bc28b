"""MacKayAdam: the fused step (compiled and fallback) against a float64 loop written from
docs/mathematics.md section 2, against torch.optim.Adam/AdamW, and its optimizer contract."""
import copy
import math

import pytest
import torch

import mackay_ext
from mackay_ext.optim import MacKayAdam, ard_param_groups

from conftest import DEVICES

BACKENDS = ["ext", "torch"]


def design_step(w, g, m, v, h, alpha, step, *, lr, beta1, beta2, eps, weight_decay, decoupled,
                num_data, batch_size, rho):
    """docs/mathematics.md section 2 for one tensor, float64, written out plainly (alpha may broadcast)."""
    alpha = alpha.expand_as(w)
    pruned = alpha == math.inf
    a = torch.where(pruned, torch.zeros_like(alpha), alpha)
    if h is not None:
        h = torch.where(pruned, h, rho * h + (1 - rho) * batch_size * g * g)
    d = g + (a / num_data) * w
    if weight_decay and not decoupled:
        d = d + weight_decay * w
    if weight_decay and decoupled:
        w = w * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * d
    v = beta2 * v + (1 - beta2) * d * d
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    w = w - lr * (m / bc1) / (torch.sqrt(v / bc2) + eps)
    zero = torch.zeros_like(w)
    return (torch.where(pruned, zero, w), torch.where(pruned, zero, m), torch.where(pruned, zero, v), h)


def make_params(device, dtype):
    """Parameters of odd sizes with their alpha shapes: per weight, per input (1, in), per
    output (out, 1), per conv filter, per conv input channel, and a 2-run pattern."""
    shapes = [((7, 13), (7, 13)), ((9, 11), (1, 11)), ((5, 3), (5, 1)), ((4, 3, 3, 3), (4, 1, 1, 1)),
              ((6, 5, 3, 3), (1, 5, 1, 1)), ((3, 4, 5), (3, 1, 5)), ((40000,), (40000,))]
    params, alphas = [], []
    for shape, alpha_shape in shapes:
        params.append(torch.nn.Parameter(torch.randn(shape, dtype=torch.float64).to(device, dtype)))
        alpha = torch.rand(alpha_shape, dtype=torch.float64) * 50
        flat = alpha.view(-1)
        flat[torch.rand(flat.shape) < 0.2] = 0
        flat[torch.rand(flat.shape) < 0.2] = math.inf
        alphas.append(alpha.float().to(device))
    plain = [torch.nn.Parameter(torch.randn(17, dtype=torch.float64).to(device, dtype))]
    return params, alphas, plain


def grads_for(params, steps, seed, non_contiguous=True):
    generator = torch.Generator().manual_seed(seed)
    sequence = []
    for _ in range(steps):
        grads = []
        for p in params:
            g = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if non_contiguous and p.dim() == 2:  # a transposed view: non-contiguous gradient
                g = g.t().contiguous().t()
            grads.append(g)
        sequence.append(grads)
    return sequence


HYPER = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-6, num_data=250.0, batch_size=32.0,
             curvature_decay=0.9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("weight_decay,decoupled", [(0.0, False), (0.05, False), (0.05, True)])
def test_matches_design_loop(device, backend, dtype, weight_decay, decoupled):
    params, alphas, plain = make_params(device, dtype)
    optimizer = MacKayAdam([{"params": params}, {"params": plain, "ard": False}],
                           weight_decay=weight_decay, decoupled_weight_decay=decoupled,
                           backend=backend, **HYPER)
    for p, a in zip(params, alphas):
        optimizer.ard_state(p)["alpha"] = a.clone()
    # float64 mirror on the CPU (the gradients and alphas it steps with live there): weights,
    # moments, curvature
    mirror = [[None] + [torch.zeros(p.shape, dtype=torch.float64) for _ in range(3)]
              for p in params + plain]
    for p, a in zip(params, alphas):  # pruned weights start at 0, as the pruner leaves them
        p.data.masked_fill_((a == math.inf).expand_as(p), 0)
    for state, p in zip(mirror, params + plain):
        state[0] = p.detach().double().cpu().clone()  # a copy even when p is float64
    for step, grads in enumerate(grads_for(params + plain, 20, seed=1), start=1):
        for p, g in zip(params + plain, grads):
            p.grad = g.to(device, dtype)
        optimizer.step()
        for k, (state, g) in enumerate(zip(mirror, grads)):
            is_ard = k < len(params)
            alpha = alphas[k].double().cpu() if is_ard else torch.zeros(())
            g = g.to(dtype).double()  # the kernels see the gradient rounded to the param dtype
            w, m, v, h = design_step(state[0], g, state[1], state[2], state[3] if is_ard else None, alpha, step,
                                     lr=HYPER["lr"], beta1=0.9, beta2=0.99, eps=1e-6,
                                     weight_decay=weight_decay, decoupled=decoupled,
                                     num_data=250.0, batch_size=32.0, rho=0.9)
            state[:] = [w, m, v, h if is_ard else state[3]]
    tol = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}[dtype]
    for k, (p, state) in enumerate(zip(params + plain, mirror)):
        st = optimizer.state[p]
        torch.testing.assert_close(p.detach().double().cpu(), state[0], rtol=tol, atol=tol)
        torch.testing.assert_close(st["exp_avg"].double().cpu(), state[1], rtol=tol, atol=tol)
        if k < len(params):
            torch.testing.assert_close(st["curvature"].double().cpu(), state[3], rtol=tol, atol=tol)
            pruned = (alphas[k] == math.inf).expand_as(p)
            assert torch.all(p.detach()[pruned] == 0) and torch.all(st["exp_avg"][pruned] == 0)
            assert torch.all(st["exp_avg_sq"][pruned] == 0)
        else:
            assert "alpha" not in st and "curvature" not in st
        assert st["step"].item() == 20.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_many_tensors_match_the_fallback(device, dtype):
    """More parameters than one CUDA launch carries (36), empty ones among them, and tensors of
    many 4096-element chunks: the compiled step equals the fallback's, element for element
    up to rounding, after three steps."""
    generator = torch.Generator().manual_seed(3)
    sizes = [int(s) for s in torch.randint(0, 9000, (80,), generator=generator)] + [0, 1, 70001]
    copies = []
    for backend in BACKENDS:
        params = [torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n),
                                                 dtype=torch.float64).to(device, dtype)) for n in sizes]
        optimizer = MacKayAdam(params, backend=backend, **HYPER)
        for p in params:
            alpha = torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel() + 1)) * 50
            alpha[alpha > 45] = math.inf
            optimizer.ard_state(p)["alpha"] = alpha.to(device)
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + step),
                                     dtype=torch.float64).to(device, dtype)
            optimizer.step()
        copies.append((params, optimizer))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    (ext_params, ext_opt), (torch_params, torch_opt) = copies
    for p, q in zip(ext_params, torch_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol, atol=tol)
        for key in ("exp_avg", "exp_avg_sq", "curvature", "step"):
            torch.testing.assert_close(ext_opt.state[p][key], torch_opt.state[q][key], rtol=tol, atol=tol)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_thread_shares_cut_inside_tensors(threads):
    """The CPU kernel splits the elements of all tensors evenly between threads, so a thread's
    share starts and ends inside tensors: inside a run of one alpha (per output row of 67, per
    conv filter), inside a per-input pattern and a per-channel pattern. Every element must
    still get its own alpha and the design formula."""
    # 163K elements: enough for 5 shares of the kernel's smallest (32K elements)
    shapes = [((300, 67), (300, 1)), ((197, 130), (1, 130)), ((81, 23, 3, 3), (81, 1, 1, 1)),
              ((65, 29, 5, 5), (1, 29, 1, 1)), ((311, 171), (311, 171))]
    params, alphas = [], []
    for shape, alpha_shape in shapes:
        params.append(torch.nn.Parameter(torch.randn(shape)))
        alpha = torch.rand(alpha_shape) * 50
        alpha.view(-1)[torch.rand(alpha.numel()) < 0.2] = math.inf
        alphas.append(alpha)
        params[-1].data.masked_fill_((alpha == math.inf).expand(shape), 0)
    plain = [torch.nn.Parameter(torch.randn(150))]
    optimizer = MacKayAdam([{"params": params}, {"params": plain, "ard": False}], **HYPER)
    for p, a in zip(params, alphas):
        optimizer.ard_state(p)["alpha"] = a.clone()
    mirror = [[p.detach().double().clone()] + [torch.zeros(p.shape, dtype=torch.float64)] * 3
              for p in params + plain]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step, grads in enumerate(grads_for(params + plain, 3, seed=2, non_contiguous=False), 1):
            for p, g in zip(params + plain, grads):
                p.grad = g.float()
            optimizer.step()
            for k, (state, g) in enumerate(zip(mirror, grads)):
                alpha = alphas[k].double() if k < len(params) else torch.zeros(())
                state[:] = design_step(state[0], g, state[1], state[2], state[3], alpha, step,
                                       lr=HYPER["lr"], beta1=0.9, beta2=0.99, eps=1e-6,
                                       weight_decay=0.0, decoupled=False, num_data=250.0,
                                       batch_size=32.0, rho=0.9)
    finally:
        torch.set_num_threads(previous)
    for k, (p, state) in enumerate(zip(params + plain, mirror)):
        torch.testing.assert_close(p.detach().double(), state[0], rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"].double(), state[2], rtol=2e-4, atol=1e-7)
        if k < len(params):
            torch.testing.assert_close(optimizer.state[p]["curvature"].double(), state[3], rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decoupled", [False, True])
def test_alpha_zero_is_torch_adam(device, backend, decoupled):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(5 * 6 * 6, 7)).to(device)
    twin = copy.deepcopy(model)
    ours = MacKayAdam(ard_param_groups(model), lr=1e-2, weight_decay=0.01, num_data=100,
                      decoupled_weight_decay=decoupled, backend=backend)
    theirs = (torch.optim.AdamW if decoupled else torch.optim.Adam)(twin.parameters(), lr=1e-2,
                                                                      weight_decay=0.01)
    x, y = torch.randn(16, 3, 8, 8, device=device), torch.randint(0, 7, (16,), device=device)
    for _ in range(20):
        for net, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruned_entries_stay_exactly_zero(backend):
    weight = torch.nn.Parameter(torch.randn(6, 8))
    optimizer = MacKayAdam([weight], lr=0.1, num_data=10, batch_size=4, backend=backend)
    alpha = torch.full((6, 1), 3.0)
    alpha[1] = alpha[4] = math.inf
    optimizer.ard_state(weight)["alpha"] = alpha
    for _ in range(5):
        weight.grad = torch.randn(6, 8) * 100
        optimizer.step()
    state = optimizer.state[weight]
    for tensor in (weight.detach(), state["exp_avg"], state["exp_avg_sq"]):
        assert torch.all(tensor[[1, 4]] == 0)
        assert torch.all(tensor[[0, 2, 3, 5]] != 0)
    assert torch.all(state["curvature"][[1, 4]] == 0) and torch.all(state["curvature"][0] > 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_subnormal_averages_are_flushed_to_zero(device, dtype):
    """A dead unit's moments and curvature (no gradient, alpha 0) decay into subnormal numbers,
    on which the CPU computes ~100x slower: the kernels write 0 once a value falls below the
    smallest normal number of the state's dtype, and leave everything else as the fallback does."""
    weight = torch.nn.Parameter(torch.randn(7, 143, dtype=torch.float64).to(device, dtype))   # (lanes and tail)
    steps = {backend: MacKayAdam([weight], lr=1e-2, num_data=100, batch_size=8, backend=backend)
             for backend in BACKENDS}
    grad = torch.randn(7, 143, dtype=torch.float64).to(device, dtype)
    grad[[1, 4]] = 0   # dead units: rows 1 and 4
    results = {}
    for backend, optimizer in steps.items():
        with torch.no_grad():
            start = weight.detach().clone()
        weight.grad = grad.clone()
        optimizer.step()   # creates the state
        state = optimizer.ard_state(weight)
        state["alpha"] = torch.full((7, 1), 2.0, device=device)
        state["alpha"][[1, 4]] = 0
        for key in ("exp_avg", "exp_avg_sq", "curvature"):
            tiny = torch.finfo(state[key].dtype).tiny
            state[key][1] = tiny / 4     # subnormal in the state's dtype
            state[key][4] = tiny * 4     # normal: one step of decay keeps it normal for m and h
        with torch.no_grad():
            weight.copy_(start)
        optimizer.step()
        results[backend] = [weight.detach().clone()] + [state[k].clone() for k in ("exp_avg", "exp_avg_sq", "curvature")]
        with torch.no_grad():
            weight.copy_(start)
    ext, fallback = results["ext"], results["torch"]
    for tensor in ext[1:]:
        assert torch.all(tensor[1] == 0)
    assert torch.all(ext[1][4] != 0) and torch.all(ext[3][4] != 0)   # (beta1 = 0.9, rho = 0.99: still normal)
    live = [0, 2, 3, 5, 6]
    for got, expected in zip(ext, fallback):
        torch.testing.assert_close(got[live].double(), expected[live].double(), rtol=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_state_dict_round_trip_continues_identically(backend, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=50, batch_size=8, backend=backend)
    optimizer.ard_state(model[0].weight)["alpha"] = torch.rand(1, 9) * 10 + 1e-3
    x, y = torch.randn(8, 9).to(dtype), torch.randint(0, 3, (8,))

    def train(net, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x).float(), y).backward()
            opt.step()

    train(model, optimizer, 5)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, 5)

    model2 = torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)
    model2.load_state_dict(saved_model)
    optimizer2 = MacKayAdam(ard_param_groups(model2), lr=1e-2, num_data=50, batch_size=8, backend=backend)
    optimizer2.load_state_dict(saved_opt)
    alpha = optimizer2.state[model2[0].weight]["alpha"]
    assert alpha.dtype == torch.float32 and alpha.shape == (1, 9)
    moments = torch.float32 if dtype == torch.float16 else dtype
    for state in optimizer2.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == moments
    assert torch.equal(alpha, saved_opt["state"][0]["alpha"])
    train(model2, optimizer2, 5)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_model_moved_to_channels_last_after_steps_keeps_stepping():
    """model.to(memory_format=torch.channels_last) after MacKayAdam's first step (a layout
    switched for speed mid-training): the next step raised the kernel's stride error about
    exp_avgs[0] (torch's Adam carries on). The moments and the curvature follow the layout."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 2))
    twin = copy.deepcopy(model)
    optimizers = [MacKayAdam(ard_param_groups(m), lr=1e-2, num_data=100, batch_size=4) for m in (model, twin)]
    x = torch.randn(4, 3, 8, 8)
    for step in range(3):
        if step == 1:
            model.to(memory_format=torch.channels_last)
        for net, optimizer in zip((model, twin), optimizers):
            optimizer.zero_grad()
            net(x).pow(2).mean().backward()
            optimizer.step()
    state = optimizers[0].state[model[0].weight]
    assert state["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


def test_param_groups_in_another_order_are_named_on_load():
    """Groups are matched by position: a checkpoint of [weights (ard), biases] loaded into
    [biases, weights] copied ard=True onto the biases' group (the prior moved off the weights) and
    failed later on a broadcast; same-shaped layers swapped inside a group moved moments silently."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=50, batch_size=8)
    model(torch.randn(8, 6)).sum().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    reversed_groups = MacKayAdam(list(reversed(ard_param_groups(model))), lr=1e-2, num_data=50, batch_size=8)
    with pytest.raises(ValueError, match=r"param group 0 has ard=False here and ard=True in the state: a state "
                                         r"from another model .* or the param groups, or the parameters in "
                                         r"them, in another order"):
        reversed_groups.load_state_dict(saved)
    weights, biases = ard_param_groups(model)
    swapped = MacKayAdam([dict(weights, params=list(reversed(weights["params"]))), biases],
                         lr=1e-2, num_data=50, batch_size=8)
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(3, 5\) here and its saved exp_avg \(5, 6\)"):
        swapped.load_state_dict(saved)
    assert all(not state for state in swapped.state.values())   # nothing was loaded
    wider = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))   # another model
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(9, 6\) here and its saved exp_avg \(5, 6\): "
                                         r"a state from another model \(another architecture or width\)"):
        MacKayAdam(ard_param_groups(wider), lr=1e-2, num_data=50, batch_size=8).load_state_dict(saved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_weights_keep_float32_moments_under_a_large_prior(device, backend):
    """alpha w / N past float16's range (alpha 4e11, as a weight is pruned): the moments of a
    float16 weight are float32, so the step stays finite and follows the float64 design loop;
    a float16 model moved there after the optimizer was built gets float32 moments too."""
    w = torch.nn.Parameter(torch.full((4, 5), 4e-5, dtype=torch.float16, device=device))
    optimizer = MacKayAdam([w], lr=1e-2, num_data=200, batch_size=16, backend=backend)
    alpha = torch.full((4, 5), 4e11)
    alpha[0] = 0.0   # a row with no prior beside the heavy ones
    optimizer.ard_state(w)["alpha"] = alpha.to(device)
    weight, m, v, h = (w.detach().double().cpu(), *(torch.zeros(4, 5, dtype=torch.float64) for _ in range(3)))
    for step in range(1, 4):
        g = torch.full((4, 5), 0.05, dtype=torch.float16)
        w.grad = g.to(device)
        optimizer.step()
        weight, m, v, h = design_step(weight, g.double(), m, v, h, alpha.double(), step, lr=1e-2,
                                      beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False,
                                      num_data=200.0, batch_size=16.0, rho=optimizer.param_groups[0]["curvature_decay"])
    state = optimizer.state[w]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32 and w.dtype == torch.float16
    assert torch.isfinite(w).all() and torch.isfinite(state["exp_avg_sq"]).all()
    torch.testing.assert_close(w.detach().double().cpu(), weight, rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(state["exp_avg"].double().cpu(), m, rtol=1e-3, atol=0)
    model = torch.nn.Linear(3, 2).to(device)
    moved = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=10, batch_size=2, backend=backend)
    moved.ard_state(model.weight)
    model.half()
    model(torch.randn(2, 3, device=device, dtype=torch.float16)).sum().backward()
    moved.step()
    assert moved.state[model.weight]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_matches_torch(backend):
    torch.manual_seed(0)
    ours_w = torch.nn.Parameter(torch.randn(5, 5))
    theirs_w = torch.nn.Parameter(ours_w.detach().clone())
    ours = MacKayAdam([ours_w], lr=0.1, num_data=10, backend=backend)
    theirs = torch.optim.Adam([theirs_w], lr=0.1)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1) for o in (ours, theirs)]
    for step in range(6):
        grad = torch.randn(5, 5)
        for w, opt, sched in ((ours_w, ours, schedulers[0]), (theirs_w, theirs, schedulers[1])):
            w.grad = grad.clone()
            opt.step()
            sched.step()
        torch.testing.assert_close(ours_w, theirs_w, rtol=1e-5, atol=1e-6)
    assert ours.param_groups[0]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_skips_the_step(device, backend):
    weight = torch.nn.Parameter(torch.randn(4, 6, device=device))
    optimizer = MacKayAdam([weight], lr=0.1, num_data=10, batch_size=4, backend=backend)
    optimizer.ard_state(weight)["alpha"] = torch.full((4, 6), 2.0, device=device)
    weight.grad = torch.randn(4, 6, device=device)
    optimizer.step()
    snapshot = copy.deepcopy(optimizer.state_dict()), weight.detach().clone()
    weight.grad = torch.full((4, 6), float("nan"), device=device)
    weight.grad[0, 0] = float("inf")
    optimizer.found_inf = torch.ones((), device=device)
    optimizer.grad_scale = torch.full((), 1024.0, device=device)
    optimizer.step()
    state = optimizer.state[weight]
    assert torch.equal(weight.detach(), snapshot[1])
    for key in ("exp_avg", "exp_avg_sq", "curvature", "alpha", "step"):
        assert torch.equal(state[key], snapshot[0]["state"][0][key]), key
    assert torch.isfinite(state["curvature"]).all() and torch.isfinite(state["alpha"]).all()
    # found_inf = 0: a normal step with the gradient unscaled by grad_scale
    optimizer.found_inf = torch.zeros((), device=device)
    twin = MacKayAdam([torch.nn.Parameter(weight.detach().clone())], lr=0.1, num_data=10,
                      batch_size=4, backend=backend)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    grad = torch.randn(4, 6, device=device)
    weight.grad = grad * 1024
    twin.param_groups[0]["params"][0].grad = grad
    optimizer.step()
    twin.step()
    torch.testing.assert_close(weight.detach(), twin.param_groups[0]["params"][0].detach())
    assert state["step"].item() == 2


def test_grad_scaler_on_cpu_skips_overflow():
    model = torch.nn.Linear(6, 3)
    optimizer = MacKayAdam(model.parameters(), lr=0.1, num_data=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.full((2, 6), 1e38)).sum() * 1e38  # overflows: inf gradients
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0 ** 10
    optimizer.zero_grad()
    loss = model(torch.randn(2, 6)).sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    params, alphas, plain = make_params(device, torch.float32)
    tensors = params[:3] + plain
    grads = [torch.randn_like(p) for p in tensors]
    moments = [torch.rand_like(p) for p in tensors]
    moments_sq = [torch.rand_like(p) for p in tensors]
    steps = [torch.full((), 3.0, device=device) for _ in tensors]
    curvatures = [torch.rand_like(p) for p in params[:3]]
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                  decoupled_weight_decay=False, num_data=100.0, batch_size=8.0, curvature_decay=0.9)
    args = ([p.detach().clone() for p in tensors], grads, moments, moments_sq, steps, curvatures,
            alphas[:3])
    torch.library.opcheck(torch.ops.mackay_ext.mackay_adam_step_.default, args, kwargs)
    torch.library.opcheck(torch.ops.mackay_ext.mackay_adam_step_.default, args,
                          dict(kwargs, grad_scale=torch.full((), 8.0, device=device),
                               found_inf=torch.zeros((), device=device)))



@pytest.mark.parametrize("meta_list", [0, 3, 6])
def test_the_op_names_a_meta_tensor_among_cpu_ones(meta_list):
    """The dispatcher sends a CPU/meta mix to the fake kernel (Meta outranks CPU), which would
    return without a word and leave every real tensor unchanged; it names the odd one out."""
    params, alphas, _ = make_params("cpu", torch.float32)
    tensors = params[:2]
    lists = [[p.detach().clone() for p in tensors], [torch.randn_like(p) for p in tensors],
             [torch.zeros_like(p) for p in tensors], [torch.zeros_like(p) for p in tensors],
             [torch.zeros(()) for _ in tensors], [torch.rand_like(p) for p in tensors], alphas[:2]]
    lists[meta_list][1] = torch.empty_like(lists[meta_list][1], device="meta")
    name = ["params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "curvatures", "alphas"][meta_list]
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                  num_data=100.0, batch_size=8.0, curvature_decay=0.9)
    with pytest.raises(RuntimeError, match=rf"mackay_adam_step_: {name}\[1\] is on meta but params\[0\] is on cpu"):
        torch.ops.mackay_ext.mackay_adam_step_.default(*lists, **kwargs)


def test_torch_compile_training_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    twin = copy.deepcopy(model)
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=64, batch_size=16)
    twin_optimizer = MacKayAdam(ard_param_groups(twin), lr=1e-2, num_data=64, batch_size=16)
    for opt, net in ((optimizer, model), (twin_optimizer, twin)):
        opt.ard_state(net[0].weight)["alpha"] = torch.full((1, 10), 5.0)
    x, y = torch.randn(16, 10), torch.randint(0, 4, (16,))

    def train_step(net, opt):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    compiled = torch.compile(train_step, backend="aot_eager")
    for _ in range(3):
        compiled(model, optimizer)
        train_step(twin, twin_optimizer)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


def test_ard_param_groups_split():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    groups = ard_param_groups(model)
    assert [p.shape for p in groups[0]["params"]] == [(3, 4), (2, 3)]
    assert groups[1]["ard"] is False and len(groups[1]["params"]) == 4


BAD_OPTIONS = [
    (dict(lr=float("nan")), ValueError, "lr must be finite"),
    (dict(lr=float("inf")), ValueError, "lr must be finite"),
    (dict(num_data=0), ValueError, "num_data must be"),
    (dict(num_data=-5), ValueError, "num_data must be"),
    (dict(betas=(0.9, 1.0)), ValueError, "betas"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=11), ValueError, r"batch_size \(11\) exceeds num_data \(10\)"),
    (dict(curvature_decay=1.5), ValueError, "curvature_decay"),
    (dict(backend="cuda"), ValueError, "backend"),
    # types: named, not Python's "must be real number, not str" (or "no" taken as true)
    (dict(eps="1e-8"), TypeError, "eps must be a number, got str"),
    (dict(weight_decay=None), TypeError, "weight_decay must be a number, got NoneType"),
    (dict(curvature_decay="0.9"), TypeError, "curvature_decay must be a number, got str"),
    (dict(betas=0.9), ValueError, "betas must be two numbers"),
    (dict(betas=("0.9", 0.99)), ValueError, "betas must be two numbers"),
    (dict(decoupled_weight_decay="yes"), TypeError, "decoupled_weight_decay must be True or False, got str"),
]


@pytest.mark.parametrize("options,error,message", BAD_OPTIONS, ids=[str(o[0]) for o in BAD_OPTIONS])
def test_bad_options_rejected(options, error, message):
    kwargs = dict(lr=1e-3, num_data=10)
    kwargs.update(options)
    with pytest.raises(error, match=message):
        MacKayAdam([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_a_group_flag_that_is_not_a_bool_is_refused():
    """{"ard": "no"} was taken as true: the group the user meant to keep out got a prior."""
    with pytest.raises(TypeError, match="ard must be True or False, got str 'no'"):
        MacKayAdam([{"params": [torch.nn.Parameter(torch.zeros(3))], "ard": "no"}], num_data=10)
    optimizer = MacKayAdam([torch.nn.Parameter(torch.zeros(3))], num_data=10,
                           eps=torch.tensor(1e-8), weight_decay=0, curvature_decay=0.5)
    with pytest.raises(TypeError, match="ard must be True or False, got int 0"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "ard": 0})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_state_rejected_and_nothing_changes(backend):
    weight = torch.nn.Parameter(torch.randn(4, 5))
    optimizer = MacKayAdam([weight], lr=1e-2, num_data=10, backend=backend)
    before = weight.detach().clone()

    weight.grad = torch.randn(4, 5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
    weight.grad = torch.randn(4, 5)
    optimizer.ard_state(weight)["alpha"] = torch.zeros(3, 5)
    with pytest.raises(RuntimeError, match=r"not broadcastable to the parameter's shape \(4, 5\)"):
        optimizer.step()
    optimizer.ard_state(weight)["alpha"] = torch.zeros(1, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="must be a float32 tensor"):
        optimizer.step()
    optimizer.ard_state(weight)["alpha"] = torch.zeros(1, 5)
    optimizer.ard_state(weight)["exp_avg"] = torch.zeros(4, 5, device="meta")
    with pytest.raises(RuntimeError, match=r"state\['exp_avg'\] of param 0 of param group 0 is on meta"):
        optimizer.step()
    optimizer.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr must be finite"):
        optimizer.step()
    assert torch.equal(weight.detach(), before)


def test_op_rejects_inconsistent_lists():
    p = torch.zeros(3)
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                  decoupled_weight_decay=False, num_data=10.0, batch_size=1.0, curvature_decay=0.9)
    op = torch.ops.mackay_ext.mackay_adam_step_.default
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        op([p], [], [p.clone()], [p.clone()], [torch.ones(())], [], [], **kwargs)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must have the shape and strides"):
        op([p], [torch.zeros(4)], [p.clone()], [p.clone()], [torch.ones(())], [], [], **kwargs)
    with pytest.raises(TypeError, match=r"steps\[i\] must be float32"):
        op([p], [p.clone()], [p.clone()], [p.clone()], [torch.ones((), dtype=torch.int64)], [], [], **kwargs)
    with pytest.raises(ValueError, match="num_data must be a positive"):
        op([p], [p.clone()], [p.clone()], [p.clone()], [torch.ones(())], [], [], **dict(kwargs, num_data=-1.0))
    with pytest.raises(RuntimeError, match=r"alphas\[0\] must be broadcastable"):
        op([p], [p.clone()], [p.clone()], [p.clone()], [torch.ones(())], [], [torch.zeros(2)], **kwargs)


def test_deepcopy_and_pickle_keep_the_backend():
    import copy
    import pickle
    model = torch.nn.Linear(3, 2)
    optimizer = MacKayAdam(model.parameters(), num_data=10, backend="torch")
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    for clone in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert clone.backend == "torch"
        clone.step()  # used to fail: AttributeError 'backend'


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_replays_from_a_cuda_graph(backend):
    """A graphed training loop captures optimizer.step() once and replays it: the step must
    neither synchronise nor allocate, and each replay must equal an eager step."""
    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Linear(17, 5)).cuda()
        opt = MacKayAdam(ard_param_groups(net), lr=1e-2, num_data=100, batch_size=10, backend=backend)
        opt.ard_state(net[0].weight)["alpha"].uniform_(0.0, 10.0)
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        return net, opt

    graphed_net, graphed_opt = make()
    eager_net, eager_opt = make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    eager_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_opt.step()
    for _ in range(3):
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(graphed_net.parameters(), eager_net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p, q in zip(graphed_net.parameters(), eager_net.parameters()):
        assert float(graphed_opt.state[p]["step"]) == float(eager_opt.state[q]["step"]) == 5


def test_a_module_for_params_names_the_two_fixes():
    with pytest.raises(TypeError, match=r"MacKayAdam: params must be the parameters, not the module: "
                                        r"pass ard_param_groups\(model\)"):
        MacKayAdam(torch.nn.Linear(3, 2), num_data=10)


# ------------------------------------------------------------------ the step's plan
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_lr_changed_every_step_keeps_the_plan_and_matches_torch(backend, monkeypatch):
    """A per-step scheduler (OneCycleLR) changes the lr of both groups every step: the launch
    plan is built once (rebuilding it checked every state tensor again: 3x the step's time), and
    each group steps with its own current lr, also once their lrs part (group 1's is halved
    from step 4: the two groups, one launch until then, need two)."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(3))]
    theirs_w = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    ours = MacKayAdam([{"params": [weights[0]]}, {"params": [weights[1]], "ard": False}], lr=0.1,
                      num_data=10, backend=backend)
    theirs = torch.optim.Adam([{"params": [theirs_w[0]]}, {"params": [theirs_w[1]]}], lr=0.1)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10) for o in (ours, theirs)]
    builds = []
    build = MacKayAdam._build_plan
    monkeypatch.setattr(MacKayAdam, "_build_plan", lambda self: builds.append(1) or build(self))
    for step in range(8):
        if step == 4:
            for o in (ours, theirs):
                o.param_groups[1]["max_lr"] = 0.05
                o.param_groups[1]["lr"] *= 0.5
        grads = [torch.randn_like(w) for w in weights]
        for ws, opt, sched in ((weights, ours, schedulers[0]), (theirs_w, theirs, schedulers[1])):
            for w, g in zip(ws, grads):
                w.grad = g.clone()
            opt.step()
            sched.step()
        for a, b in zip(weights, theirs_w):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(builds) == 2   # the first step, and the step the two lrs parted
    assert len(ours._plan()) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_in_another_layout_and_a_replaced_alpha(backend):
    """A channels-last gradient of a contiguous weight is stepped in the weight's layout (the
    launch the op refused is retried, and later steps copy it first); an alpha replaced between
    steps (as the pruner does) is the one the next step uses."""
    torch.manual_seed(0)
    ours_w = torch.nn.Parameter(torch.randn(4, 3, 2, 5))
    theirs_w = torch.nn.Parameter(ours_w.detach().clone())
    ours = MacKayAdam([ours_w], lr=0.1, num_data=10, backend=backend)
    theirs = torch.optim.Adam([theirs_w], lr=0.1)
    for step in range(3):
        grad = torch.randn(4, 3, 2, 5)
        ours_w.grad = grad.clone().to(memory_format=torch.channels_last)
        theirs_w.grad = grad.clone()
        ours.step()
        theirs.step()
        torch.testing.assert_close(ours_w, theirs_w, rtol=1e-5, atol=1e-5)   # the fallback's foreach order
    assert ours_w.is_contiguous()
    ours.ard_state(ours_w)["alpha"] = torch.full((4, 1, 1, 1), math.inf)
    ours_w.grad = torch.randn(4, 3, 2, 5)
    ours.step()
    assert not ours_w.detach().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_replaced_after_the_plan_is_made_is_checked_and_changes_nothing(backend):
    """The per-step path leaves the state's checks to the op; on either backend a bad entry put in
    after steps were taken is refused with the optimizer's message, and no tensor moves, the
    step count included (the fallback checks everything before it writes, as the op does)."""
    weight = torch.nn.Parameter(torch.randn(4, 5))
    bias = torch.nn.Parameter(torch.randn(5))
    optimizer = MacKayAdam([{"params": [weight]}, {"params": [bias], "ard": False}], lr=1e-2,
                           num_data=10, batch_size=2, backend=backend)
    for _ in range(2):
        weight.grad, bias.grad = torch.randn(4, 5), torch.randn(5)
        optimizer.step()
    state = optimizer.state[weight]
    good = state["alpha"]
    bad_entries = [("alpha", torch.zeros(3, 5), RuntimeError, r"not broadcastable to the parameter's shape"),
                   ("alpha", torch.zeros(1, 5, dtype=torch.float64), TypeError, "must be a float32 tensor"),
                   ("curvature", torch.zeros(5, 4), RuntimeError, "curvatures"),
                   ("exp_avg", torch.zeros(4, 5, device="meta"), RuntimeError, r"state\['exp_avg'\] of param 0")]
    for key, bad, error, message in bad_entries:
        saved = state[key]
        state[key] = bad
        before = [t.detach().clone() for t in (weight, bias, state["step"], optimizer.state[bias]["step"],
                                              state["exp_avg"] if key != "exp_avg" else saved)]
        with pytest.raises(error, match=message):
            optimizer.step()
        state[key] = saved
        after = [weight, bias, state["step"], optimizer.state[bias]["step"], state["exp_avg"]]
        for b, a in zip(before, after):
            assert torch.equal(b, a.detach())
    assert state["alpha"] is good
    optimizer.step()   # and the good state steps again
    assert int(state["step"]) == 3


def _adam_run(optimizer_class, model, steps, **options):
    optimizer = optimizer_class(model.parameters(), lr=1e-2, **options)
    for step in range(steps):
        optimizer.zero_grad()
        model(torch.full((8, 4), float(step + 1)).sin()).pow(2).mean().backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("adam_class, options", [(torch.optim.Adam, {}),
                                                 (torch.optim.AdamW, {"weight_decay": 0.1})])
def test_an_adam_or_adamw_checkpoint_carries_over(adam_class, options):
    """Its state_dict lacks MacKayAdam's options: the next step failed with KeyError: 'num_data'.
    Loaded, the run goes on as Adam's (AdamW's) would (alpha = 0)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    twin = copy.deepcopy(model)
    adam = _adam_run(adam_class, model, 3, **options)   # model goes on with Adam
    _adam_run(adam_class, twin, 3, **options)            # twin, the same so far, with MacKayAdam
    mackay = MacKayAdam(twin.parameters(), lr=1e-2, num_data=100)
    mackay.load_state_dict(adam.state_dict())
    assert mackay.param_groups[0]["num_data"] == 100.0
    assert mackay.param_groups[0]["decoupled_weight_decay"] == (adam_class is torch.optim.AdamW)
    for optimizer, net in ((adam, model), (mackay, twin)):
        for step in range(3, 6):
            optimizer.zero_grad()
            net(torch.full((8, 4), float(step + 1)).sin()).pow(2).mean().backward()
            optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adams_options_are_taken_where_they_change_nothing_and_named_where_they_would():
    """Code written for Adam passes them: at their defaults they were refused (TypeError); in a
    param group, maximize=True was ignored (it minimised) and amsgrad=True gave plain Adam."""
    params = [torch.nn.Parameter(torch.randn(3, 4))]
    MacKayAdam(params, num_data=10, amsgrad=False, maximize=False, foreach=None, fused=True, capturable=False,
               differentiable=False)
    for name in ("amsgrad", "maximize", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=rf"MacKayAdam: {name}=True is not supported"):
            MacKayAdam(params, num_data=10, **{name: True})
        with pytest.raises(ValueError, match=rf"MacKayAdam \(param group\): {name}=True is not supported"):
            MacKayAdam([{"params": params, name: True}], num_data=10)
    model = torch.nn.Linear(4, 2)
    adam = _adam_run(torch.optim.Adam, model, 1, amsgrad=True)
    mackay = MacKayAdam(model.parameters(), lr=1e-2, num_data=100)
    before = copy.deepcopy(mackay.state_dict())
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        mackay.load_state_dict(adam.state_dict())
    assert mackay.state_dict()["param_groups"] == before["param_groups"]   # nothing replaced


def test_a_refused_param_group_is_not_kept_and_unstepable_params_are_named_when_added():
    optimizer = MacKayAdam([torch.nn.Parameter(torch.randn(3))], num_data=10)
    extra = torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="lr must be finite and >= 0"):
        optimizer.add_param_group({"params": [extra], "lr": -1e-3})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": [extra], "lr": 1e-3})   # the fixed group is taken
    with pytest.raises(TypeError, match="complex parameters are not supported"):
        MacKayAdam([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], num_data=10)
    with pytest.raises(ValueError, match=r"strides \(6, 2\) \(a strided view"):
        MacKayAdam([torch.nn.Parameter(torch.randn(5, 6)[:, ::2])], num_data=10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("optimizer_kind", ["mackay", "sgd"])
def test_half_precision_weights_keep_their_curvature_in_float32(device, backend, dtype, optimizer_kind):
    """h <- 0.99 h + 0.01 B g^2 stored in the weight's dtype: in float16 a step's share of a
    gradient of 1e-4 (B = 32) rounds to 0, h stayed 0 and the update pruned half of a layer the
    data determine; in bfloat16 h stalled 15-20% short of B g^2. Kept in float32, h reaches B g^2
    and float16 prunes what float32 prunes (nothing here), with MacKayAdam's fused step and with
    the pruner's own curvature under a torch optimizer."""
    from mackay_ext.pruner import MacKayPruner
    layer = torch.nn.Linear(8, 8, bias=False).to(device, dtype)
    with torch.no_grad():
        layer.weight.fill_(0.5)
    model = torch.nn.Sequential(layer)
    if optimizer_kind == "mackay":
        optimizer = MacKayAdam(ard_param_groups(model), lr=0.0, num_data=1e6, batch_size=32, backend=backend)
        pruner = MacKayPruner(model, optimizer, num_data=1e6, backend=backend)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        pruner = MacKayPruner(model, optimizer, num_data=1e6, batch_size=32, backend=backend)
    gradient = torch.full((8, 8), 1e-1, device=device)
    gradient[:, :4] = 1e-4
    for _ in range(3):
        for _ in range(100):
            layer.weight.grad = gradient.to(dtype)
            optimizer.step()
        report = pruner.update()
    assert pruner.curvature("0").dtype == torch.float32
    expected = 32 * gradient.to(dtype).double() ** 2
    torch.testing.assert_close(pruner.curvature_estimate("0").double(), expected, rtol=1e-3, atol=0)
    assert report["kept"] == report["total"] == 64
    assert layer.weight.dtype == dtype and bool((layer.weight == 0.5).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_op_takes_a_float32_curvature_beside_half_precision_weights(device, backend, dtype):
    """h of a bfloat16 / float16 weight is float32 (MacKayAdam's state): the op updates it in
    float32 in the same pass, h <- rho h + (1 - rho) B g^2 against float64 (kept where pruned),
    and the weights and moments as with a half-precision h; opcheck'd. A call mixing h dtypes,
    or a float32 h beside float64 weights, is refused naming the entry."""
    if backend == "ext" and not mackay_ext.compiled_backends():
        pytest.skip("the compiled extension is not built")
    params, alphas, _ = make_params(device, dtype)
    params, alphas = params[:4], alphas[:4]
    grads = [torch.randn(p.shape, device=device).to(dtype) for p in params]
    curvatures = [torch.rand(p.shape, device=device) * 1e-6 for p in params]   # small: below a bf16 ulp step
    start = [h.clone() for h in curvatures]
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                  num_data=100.0, batch_size=8.0, curvature_decay=0.99)
    lists = ([p.detach().clone() for p in params], grads, [torch.zeros_like(p) for p in params],
             [torch.zeros_like(p) for p in params], [torch.zeros((), device=device) for _ in params],
             curvatures, alphas)
    twin = [[t.clone() for t in lists[0]], grads, [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params], [torch.zeros((), device=device) for _ in params],
            [h.to(dtype) for h in start], alphas]
    mackay_ext.ops.mackay_adam_step_(*lists, backend=backend, **kwargs)
    mackay_ext.ops.mackay_adam_step_(*twin, backend=backend, **kwargs)
    for h, h0, g, a in zip(curvatures, start, grads, alphas):
        assert h.dtype == torch.float32
        expected = 0.99 * h0.double() + 0.01 * 8.0 * g.double() ** 2
        expected = torch.where((a == math.inf).expand_as(h).to(device), h0.double(), expected)
        torch.testing.assert_close(h.double(), expected, rtol=1e-6, atol=1e-12)
    for ours, theirs in zip(lists[0] + lists[2] + lists[3], twin[0] + twin[2] + twin[3]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)   # the rest does not see h
    if backend == "ext":
        torch.library.opcheck(torch.ops.mackay_ext.mackay_adam_step_.default, lists, kwargs)
    mixed = list(lists)
    mixed[5] = [curvatures[0], curvatures[1].to(dtype)] + curvatures[2:]
    with pytest.raises((RuntimeError, TypeError), match=r"curvatures\[1\]"):
        mackay_ext.ops.mackay_adam_step_(*mixed, backend=backend, **kwargs)
    wide = [p.detach().double() for p in params]
    wide_lists = (wide, [g.double() for g in grads], [torch.zeros_like(p) for p in wide],
                  [torch.zeros_like(p) for p in wide], [torch.zeros((), device=device) for _ in wide],
                  curvatures, alphas)
    with pytest.raises((RuntimeError, TypeError), match=r"curvatures\[0\]"):
        mackay_ext.ops.mackay_adam_step_(*wide_lists, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_a_graph_that_saved_a_weight_refuses_a_backward_after_the_step(backend):
    """The fused step writes the weights below autograd: it advances their versions as torch's
    optimizers' steps do, so a backward through a graph that saved a weight before the step is
    refused (it went through, computed from the stepped weight, with no word)."""
    model = torch.nn.Linear(4, 3)
    optimizer = MacKayAdam(ard_param_groups(model), lr=0.1, num_data=100, batch_size=10, backend=backend)
    x = torch.randn(5, 4, requires_grad=True)
    stale = model(x).square().sum()   # saves the weight (the input's gradient needs it)
    model(x.detach()).sum().backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()
