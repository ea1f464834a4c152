"""Grouped expert GEMMs: one GEMM per expert over rows grouped by expert, gather and scatter fused in.

Legend: N grouped rows (all rows of expert 0, then expert 1, ...; ``counts_E[e]`` rows are expert e's),
E experts, I/O in/out width, T tokens, K slots per token (flat slot id s = t*K + k), F a fan-in.
Counts are an int64 tensor [E], a list, or a `GroupCounts` (tensor + host list made once and shared).

    grouped_gemm(x, w_EIO, counts, *, src_N=None, fan_in=1, dst_N=None, out_rows=None)
        y[dst_N[p]] = x[src_N[p] // fan_in] @ w[e(p)] for grouped row p. Without src_N row p reads
        x[p]; without dst_N it writes y[p]. src_N / dst_N hold distinct slot ids (a gather that repeats
        a row goes through fan_in: src_N = slot ids, fan_in = K reads the token row of each slot).
    grouped_gemm_gated(x_NI, w_EIO, counts, gates_TK, slot_N)
        y_TD[t] = sum_k gates_TK[t, k] * (x_NI[p] @ w[e(p)]) where p is the row of slot t*K + k
        (slot_N[p] = t*K + k; dropped slots have no row): the second expert GEMM of an MoE MLP with the
        gate-weighted combine folded in (scattermoe's mlp.py).

Each has a readable reference with the same signature (``*_reference``). Each is one
``torch.library.custom_op`` (``molm_ds::grouped_gemm``, ``molm_ds::grouped_gemm_gated``) with
``register_autograd`` (its backward is one more op, ``*_backward``) and ``register_fake``, so
``torch.compile`` traces through them. The backend switch (``molm_ds.ops.backend``) picks, per call:

- Triton (``molm_ds.kernels.grouped_gemm``): gather, scatter and gate scaling inside the GEMM kernels;
  counts read on the device (no host sync); the gated forward writes slot-order rows [T*K, O] and
  sums the K slots of a token with one ``bmm`` (deterministic, no atomics).
- PyTorch: ``index_select`` gather, one ``mm`` per expert straight into the output (no cat, no
  padding), ``index_add_`` scatter; on this CPU build as fast as ``torch._grouped_mm`` (which needs
  16-byte aligned strides and whose backward failed here). It needs the counts on the host and reads
  them inside the op (free on the CPU), unless the dispatcher already has them there (the all-to-all
  split sizes). Nothing outside the ops reads the counts, so on a GPU no grouped GEMM syncs.

dx/dw of both and dgates of the gated one are tested against the references (tests/ops, tests/kernels).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from molm_ds.errors import debug_enabled
from molm_ds.ops.backend import use_triton

__all__ = ["GroupCounts", "grouped_gemm", "grouped_gemm_gated", "grouped_gemm_gated_reference", "grouped_gemm_reference"]


class GroupCounts:
    """Rows per expert of a grouped batch: the device tensor the kernels read, and, when a dispatcher
    already has them on the host (the all-to-all split sizes), the host list, which spares the per-expert
    loop its own conversion. ``host()`` converts on demand (a host sync when the tensor lives on a GPU);
    the ops never call it: the CPU loop converts inside the op, the Triton kernels read the tensor."""

    __slots__ = ("tensor", "_host")

    def __init__(self, tensor: Tensor, host: Optional[list] = None) -> None:
        self.tensor = tensor
        self._host = None if host is None else [int(c) for c in host]

    def host(self) -> list:
        if self._host is None:
            self._host = [int(c) for c in self.tensor.tolist()]  # host sync on a GPU: references and checks only
        return self._host

    def known_host(self) -> Optional[list]:
        """The host list if it is already known (no conversion), else None."""
        return self._host

    @classmethod
    def of(cls, counts) -> "GroupCounts":
        if isinstance(counts, GroupCounts):
            return counts
        if isinstance(counts, Tensor):
            return cls(counts)
        return cls(torch.tensor(list(counts), dtype=torch.int64), list(counts))

    def __repr__(self) -> str:
        return f"GroupCounts({self._host if self._host is not None else tuple(self.tensor.shape)})"


# ---- checks -------------------------------------------------------------------------------------
def _check_shapes(x: Tensor, w_EIO: Tensor, counts: GroupCounts, what: str = "grouped_gemm") -> None:
    """Shape checks (free). The counts' values are checked where they are on the host anyway (the loop
    path) or, under MOLM_DS_DEBUG=1, on the Triton path."""
    if x.dim() != 2 or w_EIO.dim() != 3 or x.shape[1] != w_EIO.shape[1]:
        raise ValueError(f"{what}: x {tuple(x.shape)} and w {tuple(w_EIO.shape)} do not fit (need x [N, I], w [E, I, O])")
    if counts.tensor.dim() != 1 or counts.tensor.shape[0] != w_EIO.shape[0]:
        raise ValueError(f"{what}: counts {tuple(counts.tensor.shape)} must be [E] with E = {w_EIO.shape[0]} experts")


def _check_values(n_rows: int, counts: list, what: str = "grouped_gemm") -> None:
    if sum(counts) != n_rows or min(counts, default=0) < 0:
        raise ValueError(f"{what}: counts sum to {sum(counts)} but there are {n_rows} rows (counts {counts})")


def _host_counts(counts: GroupCounts, n_rows: int, triton: bool, what: str) -> Optional[List[int]]:
    """The host list to pass into the op: only one a dispatcher already has (checked here, for free).
    Otherwise None: the Triton kernels read the device tensor, and the CPU loop converts the counts
    inside the op (``_loop_counts``), so that no host read of a device tensor happens outside an op
    whose GPU implementation needs none. Under MOLM_DS_DEBUG=1 the values are checked here (a sync)."""
    if torch.compiler.is_compiling():
        return None
    host = counts.known_host()
    if host is not None:
        _check_values(n_rows, host, what)
        return None if triton else host
    if debug_enabled():
        _check_values(n_rows, counts.host(), what)
    return None


def _on(t: Tensor, like: Tensor) -> Tensor:
    return t if t.device == like.device else t.to(like.device, non_blocking=True)


# ---- the PyTorch path ---------------------------------------------------------------------------
def _loop_counts(counts: Tensor, host: Optional[List[int]], n_rows: int, what: str = "grouped_gemm") -> List[int]:
    """The per-expert loop's host counts: the ones passed in, or the device tensor read here, inside the
    op (this is the CPU path; the GPU runs the Triton kernels, which read the tensor on the device)."""
    if host is not None:
        return list(host)
    host = [int(c) for c in counts.tolist()]
    _check_values(n_rows, host, what)
    return host


def _rows(x: Tensor, idx: Optional[Tensor], fan: int) -> Tensor:
    """x[idx // fan] (x itself without idx)."""
    if idx is None:
        return x
    return x.index_select(0, idx if fan == 1 else idx // fan)


def _mm_groups(a_NI: Tensor, b_EIO: Tensor, counts: List[int]) -> Tensor:
    """out[rows of e] = a[rows of e] @ b[e]; b may be a transposed view (the backward's w^T)."""
    out = a_NI.new_empty(a_NI.shape[0], b_EIO.shape[2])
    s = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a_NI[s : s + n], b_EIO[e], out=out[s : s + n])
        s += n
    return out


def _dw_groups(x_NI: Tensor, dy_NO: Tensor, counts: List[int], like: Tensor) -> Tensor:
    """dw[e] = x[rows of e]^T dy[rows of e]; zero for an expert without rows."""
    dw = torch.empty_like(like)
    s = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(x_NI[s : s + n].t(), dy_NO[s : s + n], out=dw[e])
        else:
            dw[e].zero_()
        s += n
    return dw


# ---- molm_ds::grouped_gemm ----------------------------------------------------------------------
@torch.library.custom_op("molm_ds::grouped_gemm", mutates_args=())
def _grouped_gemm_op(x: Tensor, w: Tensor, counts: Tensor, counts_host: Optional[List[int]], src: Optional[Tensor],
                     dst: Optional[Tensor], fan_in: int, out_rows: int, triton: bool) -> Tensor:
    if triton:
        from molm_ds.kernels.grouped_gemm import launch

        return launch.scatter2scatter(x, w, counts, src=src, fan_in=fan_in, dst=dst, out_rows=out_rows)
    rows = _rows(x, src, fan_in).contiguous()
    y = _mm_groups(rows, w, _loop_counts(counts, counts_host, rows.shape[0]))
    if dst is None:
        return y
    out = y.new_empty(out_rows, y.shape[1]) if y.shape[0] == out_rows else y.new_zeros(out_rows, y.shape[1])
    return out.index_copy_(0, dst, y)


@_grouped_gemm_op.register_fake
def _(x, w, counts, counts_host, src, dst, fan_in, out_rows, triton):
    return x.new_empty(out_rows, w.shape[2])


@torch.library.custom_op("molm_ds::grouped_gemm_backward", mutates_args=())
def _grouped_gemm_backward_op(dy: Tensor, x: Tensor, w: Tensor, counts: Tensor, counts_host: Optional[List[int]],
                              src: Optional[Tensor], dst: Optional[Tensor], fan_in: int, need_x: bool, need_w: bool,
                              triton: bool) -> tuple[Tensor, Tensor]:
    """(dx, dw) of ``grouped_gemm``; an empty tensor for a gradient that is not needed."""
    dx, dw = x.new_empty(0), w.new_empty(0)
    wT = w.transpose(1, 2)
    if triton:
        from molm_ds.kernels.grouped_gemm import launch

        if need_x:  # dx_slot[src(p)] = dy[dst(p)] @ w^T, then the fan_in slots of a row summed
            if src is None:
                dx = launch.scatter2scatter(dy, wT, counts, src=dst)
            else:
                dx = launch.scatter2scatter(dy, wT, counts, src=dst, dst=src, out_rows=x.shape[0] * fan_in)
                if fan_in > 1:
                    dx = dx.view(x.shape[0], fan_in, -1).sum(1)
        if need_w:
            dw = launch.group_dw(x, dy, counts, x_idx=src, fan_x=fan_in, dy_idx=dst, dtype=w.dtype)
        return dx, dw
    dy_N = _rows(dy, dst, 1).contiguous()
    host = _loop_counts(counts, counts_host, dy_N.shape[0])
    if need_x:
        dx_N = _mm_groups(dy_N, wT, host)
        dx = dx_N if src is None else x.new_zeros(x.shape).index_add_(0, src // fan_in, dx_N)
    if need_w:
        dw = _dw_groups(_rows(x, src, fan_in).contiguous(), dy_N, host, w)
    return dx, dw


@_grouped_gemm_backward_op.register_fake
def _(dy, x, w, counts, counts_host, src, dst, fan_in, need_x, need_w, triton):
    return (torch.empty_like(x) if need_x else x.new_empty(0)), (torch.empty_like(w) if need_w else w.new_empty(0))


def _gg_setup(ctx, inputs, output):
    x, w, counts, counts_host, src, dst, fan_in, out_rows, triton = inputs
    ctx.save_for_backward(x, w, counts, src, dst)
    ctx.cfg = (counts_host, fan_in, triton)


def _gg_backward(ctx, dy):
    x, w, counts, src, dst = ctx.saved_tensors
    counts_host, fan_in, triton = ctx.cfg
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.molm_ds.grouped_gemm_backward(dy.contiguous(), x, w, counts, counts_host, src, dst, fan_in,
                                                     need_x, need_w, triton)
    return (dx if need_x else None), (dw if need_w else None), None, None, None, None, None, None, None


_grouped_gemm_op.register_autograd(_gg_backward, setup_context=_gg_setup)


def grouped_gemm(x: Tensor, w_EIO: Tensor, counts, *, src_N: Optional[Tensor] = None, fan_in: int = 1,
                 dst_N: Optional[Tensor] = None, out_rows: Optional[int] = None) -> Tensor:
    """y[dst_N[p]] = x[src_N[p] // fan_in] @ w_EIO[e(p)]; differentiable in x and w (module docstring)."""
    c = GroupCounts.of(counts)
    _check_shapes(x, w_EIO, c)
    n = src_N.shape[0] if src_N is not None else x.shape[0]
    if out_rows is None:
        if dst_N is not None:
            raise ValueError("grouped_gemm: with dst_N, give out_rows (the rows of the scattered output)")
        out_rows = n
    dt = torch.promote_types(x.dtype, w_EIO.dtype)
    x, w_EIO = x.to(dt), w_EIO.to(dt)
    triton = use_triton(x)
    host = _host_counts(c, n, triton, "grouped_gemm")
    return torch.ops.molm_ds.grouped_gemm(x, w_EIO, _on(c.tensor, x), host, src_N, dst_N, fan_in, out_rows, triton)


def grouped_gemm_reference(x: Tensor, w_EIO: Tensor, counts, *, src_N: Optional[Tensor] = None, fan_in: int = 1,
                           dst_N: Optional[Tensor] = None, out_rows: Optional[int] = None) -> Tensor:
    """Readable loop with the signature of `grouped_gemm`: gather, y[rows of e] = x[rows of e] @ w[e], scatter."""
    if x.dim() != 2 or w_EIO.dim() != 3 or x.shape[1] != w_EIO.shape[1]:
        raise ValueError(f"grouped_gemm: x {tuple(x.shape)} and w {tuple(w_EIO.shape)} do not fit")
    rows = x if src_N is None else x[src_N // fan_in]
    outs, start = [], 0
    for e, n in enumerate(GroupCounts.of(counts).host()):
        outs.append(rows[start : start + n] @ w_EIO[e])
        start += n
    if start != rows.shape[0]:
        raise ValueError(f"grouped_gemm: counts sum to {start} but there are {rows.shape[0]} rows")
    y = torch.cat(outs, dim=0) if outs else x.new_zeros(0, w_EIO.shape[2])
    if dst_N is None:
        return y
    return y.new_zeros(out_rows, y.shape[1]).index_copy(0, dst_N, y)


# ---- molm_ds::grouped_gemm_gated ----------------------------------------------------------------
@torch.library.custom_op("molm_ds::grouped_gemm_gated", mutates_args=())
def _gated_op(x: Tensor, w: Tensor, counts: Tensor, counts_host: Optional[List[int]], gates: Tensor, slot: Tensor,
              triton: bool) -> tuple[Tensor, Tensor]:
    """(y_TD, rows kept for the gate gradient: slot order [T*K, O] on Triton, grouped [N, O] otherwise)."""
    T, K = gates.shape
    if triton:
        from molm_ds.kernels.grouped_gemm import launch

        y_S = launch.scatter2scatter(x, w, counts, dst=slot, out_rows=T * K)  # dropped slots: zero rows
        y = torch.bmm(gates.unsqueeze(1).to(y_S.dtype), y_S.view(T, K, -1)).squeeze(1)
        return y, y_S
    y_N = _mm_groups(x.contiguous(), w, _loop_counts(counts, counts_host, x.shape[0], "grouped_gemm_gated"))
    w_N = gates.reshape(-1).index_select(0, slot).to(y_N.dtype)
    y = y_N.new_zeros(T, y_N.shape[1])
    y.index_add_(0, slot // K, y_N * w_N[:, None])
    return y, y_N


@_gated_op.register_fake
def _(x, w, counts, counts_host, gates, slot, triton):
    T, K = gates.shape
    return x.new_empty(T, w.shape[2]), x.new_empty(T * K if triton else x.shape[0], w.shape[2])


@torch.library.custom_op("molm_ds::grouped_gemm_gated_backward", mutates_args=())
def _gated_backward_op(dy: Tensor, x: Tensor, w: Tensor, counts: Tensor, counts_host: Optional[List[int]],
                       gates: Tensor, slot: Tensor, rows: Tensor, need_x: bool, need_w: bool, need_g: bool,
                       triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, dgates) of ``grouped_gemm_gated``; an empty tensor for a gradient that is not needed."""
    T, K = gates.shape
    dx, dw, dg = x.new_empty(0), w.new_empty(0), gates.new_empty(0)
    if triton:
        from molm_ds.kernels.grouped_gemm import launch

        if need_g:  # dgates[t, k] = dy_t . y_tk
            dg = torch.bmm(rows.view(T, K, -1), dy.unsqueeze(2).to(rows.dtype)).squeeze(2).to(gates.dtype)
        g_N = gates.reshape(-1).index_select(0, slot).float()
        if need_x:  # dx_p = g_p dy[token(p)] @ w^T
            dx = launch.scatter2scatter(dy, w.transpose(1, 2), counts, src=slot, fan_in=K, scale=g_N)
        if need_w:  # dw_e = sum_p x_p^T (g_p dy[token(p)])
            dw = launch.group_dw(x, dy, counts, dy_idx=slot, fan_dy=K, scale=g_N, dtype=w.dtype)
        return dx, dw, dg
    host = _loop_counts(counts, counts_host, x.shape[0], "grouped_gemm_gated")
    dy_N = dy.index_select(0, slot // K)  # the gradient of each row's token
    if need_g:
        dg_N = torch.linalg.vecdot(dy_N, rows)
        dg = dg_N.new_zeros(T * K).index_copy_(0, slot, dg_N).view(T, K).to(gates.dtype)  # dropped slots: 0
    dy_N.mul_(gates.reshape(-1).index_select(0, slot).to(dy_N.dtype)[:, None])
    if need_x:
        dx = _mm_groups(dy_N, w.transpose(1, 2), host)
    if need_w:
        dw = _dw_groups(x.contiguous(), dy_N, host, w)
    return dx, dw, dg


@_gated_backward_op.register_fake
def _(dy, x, w, counts, counts_host, gates, slot, rows, need_x, need_w, need_g, triton):
    return ((torch.empty_like(x) if need_x else x.new_empty(0)), (torch.empty_like(w) if need_w else w.new_empty(0)),
            (torch.empty_like(gates) if need_g else gates.new_empty(0)))


def _gated_setup(ctx, inputs, output):
    x, w, counts, counts_host, gates, slot, triton = inputs
    ctx.save_for_backward(x, w, counts, gates, slot, output[1])
    ctx.cfg = (counts_host, triton)


def _gated_backward(ctx, dy, _drows):
    x, w, counts, gates, slot, rows = ctx.saved_tensors
    counts_host, triton = ctx.cfg
    need_x, need_w, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
    dx, dw, dg = torch.ops.molm_ds.grouped_gemm_gated_backward(dy.contiguous(), x, w, counts, counts_host, gates, slot,
                                                              rows, need_x, need_w, need_g, triton)
    return (dx if need_x else None), (dw if need_w else None), None, None, (dg if need_g else None), None, None


_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup)


def grouped_gemm_gated(x_NI: Tensor, w_EIO: Tensor, counts, gates_TK: Tensor, slot_N: Tensor) -> Tensor:
    """y_TD[t] = sum_k gates_TK[t, k] * x_NI[row of slot t*K+k] @ w_EIO[e]; differentiable in x, w and gates."""
    c = GroupCounts.of(counts)
    _check_shapes(x_NI, w_EIO, c, "grouped_gemm_gated")
    if gates_TK.dim() != 2 or slot_N.shape != (x_NI.shape[0],):
        raise ValueError(f"grouped_gemm_gated: gates {tuple(gates_TK.shape)} must be [T, K] and slots "
                         f"{tuple(slot_N.shape)} one per row of x {tuple(x_NI.shape)}")
    dt = torch.promote_types(x_NI.dtype, w_EIO.dtype)
    x_NI, w_EIO = x_NI.to(dt), w_EIO.to(dt)
    triton = use_triton(x_NI)
    host = _host_counts(c, x_NI.shape[0], triton, "grouped_gemm_gated")
    y, _ = torch.ops.molm_ds.grouped_gemm_gated(x_NI, w_EIO, _on(c.tensor, x_NI), host, gates_TK, slot_N, triton)
    return y


def grouped_gemm_gated_reference(x_NI: Tensor, w_EIO: Tensor, counts, gates_TK: Tensor, slot_N: Tensor) -> Tensor:
    """Readable slow path of `grouped_gemm_gated`: the grouped GEMM, then each row times its slot's gate added
    to its token."""
    T, K = gates_TK.shape
    y_N = grouped_gemm_reference(x_NI, w_EIO, counts)
    g_N = gates_TK.reshape(-1)[slot_N].to(y_N.dtype)
    return y_N.new_zeros(T, y_N.shape[1]).index_add(0, slot_N // K, y_N * g_N[:, None])
