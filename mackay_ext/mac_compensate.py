"""MAC-priced pruning of a Linear layer's inputs with the other inputs taking over (OBS-style).

The evidence gain of mac_price.py is diagonal: it is what the data lose when one group goes and
every other weight stays as it is. For the inputs of a Linear layer that is far too pessimistic
when inputs are correlated: measured on LeNet-300-100 after priced training, re-fitting the other
inputs of the last layer recovers all but 1-18% (median 6%) of what removing one hidden unit
costs its output, and all but a median 12% for a pixel. The diagonal gain keeps those redundant
units at any price.

With the curvature of the layer's outputs as Kronecker factor (K-FAC: F = A x G, A = E[x x^T] over
the layer's inputs with a constant 1 for the bias), removing input j and re-fitting the others
changes the outputs by W[:, j] / [A^-1]_jj in the directions A^-1[j, :], and the data term of the
gain shrinks by rho_j = 1 / (A_jj [A^-1]_jj), the part of input j's second moment the other live
inputs cannot explain (1 - rho_j is the R^2 of input j on the others, for centred inputs): the
curvature left to input j once the others are re-fitted (the Schur complement) is rho_j H, in the
data term and the Occam factor alike. So, per input group j:

    gain_j = 1/2 sum_i [ w_ij^2 (alpha_j + rho_j H_ij) - log(1 + rho_j H_ij / alpha_j) ]

(with rho_j H in the data term only, a redundant group's Occam factor outweighs its fit and it
goes at any price: on LeNet-300-100 three quarters of the network went in one update).

and a group priced out (gain_j < price * MACs_j) is removed with the re-fit applied to the live
columns and the bias: W[:, k] -= W[:, j] A^-1[j, k] / A^-1[j, j]. Groups go one at a time, the
cheapest margin first, with A^-1 downdated after each, so two copies of one input are never both
removed for being each other's copy.

InputCovariance samples A from every `every`-th training forward (an EMA), so it costs a fraction
of the layer's own matmul, and is saved with the pruner's state; until it has a sample the
diagonal rule of mac_price.py is used, as it is for layers wider than REFIT_MAX_INPUTS inputs and if A cannot
be inverted.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .copy_inert import CopyInert
from .mac_price import entry_gains, group_gamma

COVARIANCE_EVERY = 8     # training forwards between two samples of A
REFIT_MAX_INPUTS = 2048  # wider layers are priced by the diagonal rule: A is (in+1)^2 float64, and
# each group removed costs a rank-one downdate of its inverse
COVARIANCE_DECAY = 0.9   # EMA weight of the samples before (about the last 10 samples count)
DAMPING = 1e-6           # of the mean diagonal, added to A before it is inverted


class InputCovariance:
    """A = E[x~ x~^T] of the inputs of some Linear layers (x~ = the input with a 1 appended, the
    bias's input), float64, from a forward pre-hook on each, in training mode only."""

    def __init__(self, modules: dict[str, nn.Linear], every: int = COVARIANCE_EVERY,
                 decay: float = COVARIANCE_DECAY):
        self.every, self.decay = every, decay
        self.second_moment: dict[str, torch.Tensor] = {}
        self._calls = dict.fromkeys(modules, 0)
        self._hooks = [module.register_forward_pre_hook(CopyInert(self._sampler(name)))
                       for name, module in modules.items()]

    def _sampler(self, name: str):
        def sample(module, args):
            if not module.training or not torch.is_grad_enabled():
                return
            self._calls[name] += 1
            if (self._calls[name] - 1) % self.every:
                return
            with torch.no_grad():
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
                moment = x.T @ x / max(x.shape[0], 1)
                old = self.second_moment.get(name)
                self.second_moment[name] = moment if old is None else self.decay * old + (1 - self.decay) * moment
        return sample

    def state_dict(self) -> dict:
        return {"second_moment": {n: m.clone() for n, m in self.second_moment.items()},
                "calls": dict(self._calls)}

    def load_state_dict(self, state: dict) -> None:
        """The samples of a saved pruner (absent from older checkpoints: sampling starts again)."""
        self.second_moment = {n: m.to(torch.float64).clone() for n, m in state.get("second_moment", {}).items()
                              if n in self._calls}
        self._calls.update({n: int(c) for n, c in state.get("calls", {}).items() if n in self._calls})

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


@torch.no_grad()
def compensated_price_out(module: nn.Linear, curvature: torch.Tensor, alpha: torch.Tensor,
                          old_alpha: torch.Tensor, second_moment: torch.Tensor, *, num_data: float,
                          macs: torch.Tensor, price: float, rule: str) -> tuple[int, float]:
    """Prune, one at a time, the input groups of `module` (alpha of shape (1, in)) whose
    compensated gain is below price * their MACs, re-fitting the live inputs and the bias after
    each. Groups with alpha 0 (prior off) or +inf are not for sale; +inf ones are not used in the
    re-fit either. Returns (groups pruned, their sum of gamma from old_alpha, as the update did)."""
    weight, bias = module.weight, module.bias
    inputs = weight.shape[1]
    a = alpha.reshape(inputs).double()
    w = weight.detach().double()
    n_h = (curvature.double() * num_data).clamp(min=0.0)
    cost = price * macs.reshape(inputs).double()
    # the live inputs, and the constant 1 where a bias can take a share
    active = torch.cat([a != math.inf, torch.full((1,), bias is not None, dtype=torch.bool, device=a.device)])
    moment = second_moment.to(w.device)
    moment = moment + DAMPING * moment.diagonal().mean() * torch.eye(inputs + 1, dtype=w.dtype, device=w.device)
    index = active.nonzero().flatten()
    inverse = torch.zeros_like(moment)
    inverse[index.unsqueeze(1), index] = torch.linalg.inv(moment[index][:, index])
    for_sale = torch.isfinite(a) & (a > 0)
    pruned: list[int] = []
    while bool(for_sale.any()):
        rho = (1.0 / (moment.diagonal()[:inputs] * inverse.diagonal()[:inputs])).clamp(0.0, 1.0)
        conditional = rho * n_h     # the curvature left to input j once the others are re-fitted
        gain = 0.5 * entry_gains(w, conditional, a).sum(dim=0)   # 0 for groups not for sale
        margin = (gain - cost).masked_fill(~for_sale, math.inf)
        j = int(margin.argmin())
        if not margin[j] < 0:
            break
        # the other live inputs and the bias take over column j
        shift = inverse[j] / inverse[j, j]                 # zero outside the active set
        column = w[:, j].clone()
        w -= column.unsqueeze(1) * shift[:inputs].unsqueeze(0)
        if bias is not None:
            bias.sub_((column * shift[inputs]).to(bias.dtype))
        w[:, j] = 0.0
        inverse -= torch.outer(inverse[:, j], inverse[j]) / inverse[j, j]
        inverse[j, :] = 0.0
        inverse[:, j] = 0.0
        for_sale[j] = False
        pruned.append(j)
    if not pruned:
        return 0, 0.0
    gone = torch.zeros(inputs, dtype=torch.bool, device=a.device)
    gone[pruned] = True
    weight.copy_(w.to(weight.dtype))
    weight[:, gone] = 0
    alpha.view(-1)[gone] = math.inf
    gamma = group_gamma(n_h, old_alpha.double().reshape(1, inputs), [0], rule).view(-1)
    return len(pruned), float(gamma[gone].sum())
