"""LoRA training on CPU without wasted passes: one autograd function per adapted linear layer, and dropout
masks drawn as the positions of the dropped elements.

peft's vanilla LoRA layer computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate ops. On
CPU the dropout alone is a random draw for every input element, a comparison, a masked copy and a
scaling pass in forward, and the mirror passes in backward; the scaling and the sum are two more passes
over the output. For a small model that is a fifth of a training step. Here the same function is:

- **the mask**: dropout zeroes i.i.d. Bernoulli(``p``) positions. The gaps between successive successes
  of a Bernoulli process are i.i.d. Geometric(``p``), so summing about ``n * p`` geometric draws gives the
  dropped positions with exactly the distribution of ``n`` Bernoulli draws (``p`` is not rounded), at
  ``p`` of the random-number cost. They are stored as int64 indices (0.4 bytes per element at p = 0.05,
  against peft's 1-byte mask) and applied with ``index_fill_``.
- **the layer**: ``y = x W^T + b``, then ``y += scaling * (x_d A^T) B^T`` in one ``addmm_``; in backward the
  input gradient is ``g W + mask(d_u A)`` in one ``addmm``. ``W`` and ``b`` are frozen.

Same maths, same parameters, same state dict as peft: :class:`FastLoraLinear` is peft's ``lora.Linear``
with another ``forward``, used only where it is exact (one active vanilla adapter on a plain
``nn.Linear``, CPU, no autocast); anything else (4-bit bases, DoRA, several adapters, CUDA) takes
peft's own path, whose dropout is :class:`FastDropout`. The random draws come from the global torch
generator, whose state is in qgen's checkpoints, so a resumed run draws the same masks.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn


def dropped_positions(n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted flat indices of the dropped elements of an ``n``-element i.i.d. Bernoulli(``p``) dropout mask."""
    if n == 0 or p <= 0.0:
        return torch.empty(0, dtype=torch.long, device=device)
    if p >= 1.0:
        return torch.arange(n, device=device)
    mean = n * p
    draws = int(mean + 6.0 * (mean * (1.0 - p)) ** 0.5) + 16  # enough to pass n almost always
    ends = torch.empty(draws, dtype=torch.long, device=device).geometric_(p).cumsum(0)  # 1-based drop positions
    while ends[-1] < n:  # rare: draw more gaps
        more = torch.empty(draws, dtype=torch.long, device=device).geometric_(p).cumsum(0) + ends[-1]
        ends = torch.cat([ends, more])
    return ends[: int(torch.searchsorted(ends, n, right=True))] - 1


def apply_dropout(x: torch.Tensor, p: float, dropped: torch.Tensor) -> torch.Tensor:
    """``x`` times ``1 / (1 - p)`` with the ``dropped`` flat positions zeroed (a new tensor)."""
    y = (x * (1.0 / (1.0 - p))).contiguous()  # a permuted x gives a permuted product
    y.view(-1).index_fill_(0, dropped, 0.0)
    return y


class FastDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU masks are drawn as :func:`dropped_positions` (same distribution, about ``p``
    of the random draws). Elsewhere (CUDA) it is ``F.dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        if self.p >= 1.0:
            return x * 0.0
        return apply_dropout(x, self.p, dropped_positions(x.numel(), self.p))


class _LoraLinearFn(torch.autograd.Function):
    """``y = x W^T + b + scaling * (x_d A^T) B^T`` with ``x_d`` = ``x`` with ``dropped`` zeroed, times 1 / (1 - p).

    ``W`` and ``b`` are frozen (no gradient). Shapes: ``x [N, in]``, ``W [out, in]``, ``A [r, in]``, ``B [out, r]``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, dropped):
        xd = x if dropped is None else apply_dropout(x, p, dropped)  # [N, in]
        u = xd @ lora_a.T  # [N, r]
        y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T  # [N, out]
        y.addmm_(u, lora_b.T, alpha=scaling)  # [N, out]
        ctx.save_for_backward(xd, weight, lora_a, lora_b, u, dropped)
        ctx.scaling, ctx.keep_scale = scaling, 1.0 / (1.0 - p)
        return y

    @staticmethod
    def backward(ctx, grad):
        xd, weight, lora_a, lora_b, u, dropped = ctx.saved_tensors
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[4]:
            grad_b = (grad.T @ u).mul_(ctx.scaling)  # [out, r]
        du = (grad @ lora_b).mul_(ctx.scaling)  # [N, r]
        if ctx.needs_input_grad[3]:
            grad_a = du.T @ xd  # [r, in]
        if ctx.needs_input_grad[0]:
            dxd = du.mul_(ctx.keep_scale) @ lora_a  # [N, in]
            if dropped is not None:
                dxd.view(-1).index_fill_(0, dropped, 0.0)
            grad_x = torch.addmm(dxd, grad, weight)  # [N, in]
        return grad_x, None, None, grad_a, grad_b, None, None, None


class FastLoraLinear(PeftLoraLinear):
    """peft's LoRA ``Linear`` computed by :class:`_LoraLinearFn` where that is exact, else by peft."""

    def _fused_adapter(self, x: torch.Tensor) -> str | None:
        """The active adapter's name when the fused path computes exactly what peft would, else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        base = self.base_layer
        if (
            name not in self.lora_A
            or name in getattr(self, "lora_variant", {})  # DoRA and friends
            or type(base) is not nn.Linear
            or type(self.lora_A[name]) is not nn.Linear  # e.g. an FSDP1 unit: its weight is a shard outside forward
            or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
            or self.lora_B[name].bias is not None
            or x.device.type != "cpu"
            or torch.is_autocast_enabled("cpu")
            or not x.dtype == base.weight.dtype == self.lora_A[name].weight.dtype
            or getattr(self.lora_dropout[name], "p", 0.0) >= 1.0
        ):
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or kwargs else self._fused_adapter(x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        dropped = dropped_positions(x2.numel(), p) if p > 0.0 else None
        base = self.base_layer
        y = _LoraLinearFn.apply(x2, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                float(self.scaling[name]), p, dropped)  # fmt: skip
        return y.view(*x.shape[:-1], y.shape[-1])


def speed_up_lora(model: nn.Module) -> nn.Module:
    """Swap peft's LoRA ``Linear`` layers of ``model`` for :class:`FastLoraLinear` and their dropouts for
    :class:`FastDropout`, in place (same parameters, same state dict).
    """
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FastLoraLinear
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name, drop in dropouts.items():
                if type(drop) is nn.Dropout:
                    dropouts[name] = FastDropout(drop.p)
    return model
