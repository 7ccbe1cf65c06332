"""Two small C kernels for the Q networks' hot loops, where eager torch spends its time
launching ops on tiny tensors rather than computing (`kernels.c`; `marl.kernels: c`).

1. `gru_scan`: the stacked Q networks' GRU recurrence over an episode. `AgentQNets.unroll`
   turns every slot's input into the gate pre-activations `gi` with one batched matmul; what
   is left is per slot one `[M, B, h] x [M, h, 3h]` matmul `gh = s W_hh + b_hh` and GRUCell's
   gate equations (r, z, n, then s'). In eager torch those are a dozen elementwise ops per
   slot, twice as many in the backward, each on a tensor so small (3 x 16 x 128) that
   launching it costs more than computing it. Here a slot's gates (and their backward) are
   one kernel call; the matmuls stay in torch (MKL), and the backward computes dL/dW_hh of
   all slots in one matmul instead of one per slot. No library op does this on CPU (torch's
   fused GRU cell is CUDA only).
2. `flat_head_masked_max`: the flat head's max over each row's valid actions when acting
   (one row per environment and BS). The torch version gathers a copy of every valid
   action's weight row first, which cost more than the dot products themselves.

Both give torch's numbers up to float rounding (the kernel's exp is a polynomial, sums run
in another order), checked in tests/test_kernels.py; what they save is measured in the
README ("Speed").

The C code uses no Python or torch headers: it is compiled once per machine with the
system's C compiler (`$CC`, default `cc`) into `$DNTSYNC_CACHE_DIR` (default
`~/.cache/dntsync`) on first use, a fraction of a second, and loaded with ctypes. Where no
compiler is available, `marl.kernels: torch` keeps plain torch ops (numbers then differ in
the last float digits, so the choice is a config value that DVC tracks).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels.c")
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
_F32 = 4  # bytes per float
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class KernelUnavailable(RuntimeError):
    """The C kernel cannot be built here (no compiler, or it failed)."""


def _cpu_key() -> str:
    """What `-march=native` depends on: the machine and its CPU's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dntsync"
    return Path(os.environ.get("DNTSYNC_CACHE_DIR", default))


@cache
def load_kernel() -> ctypes.CDLL:
    """The compiled kernel, built on first use (atomically, so parallel runs may race)."""
    compiler = os.environ.get("CC", "cc")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *CFLAGS, _cpu_key()]).encode())
    target = cache_dir() / f"kernels-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        if shutil.which(compiler) is None:
            raise KernelUnavailable(
                f"marl.kernels=c needs a C compiler to build {SOURCE.name}, and {compiler!r} is "
                "not on PATH: install one (Debian: apt install gcc), point $CC at one, or set "
                "marl.kernels=torch (plain torch ops, slower)")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            done = subprocess.run([compiler, *CFLAGS, "-o", str(built), str(SOURCE)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise KernelUnavailable(
                    f"building {SOURCE.name} with {compiler} failed (set marl.kernels=torch to "
                    f"use plain torch ops):\n{done.stderr}")
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    lib.gru_gates_forward.argtypes = [_PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64,
                                      _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, ctypes.c_int]
    lib.gru_gates_forward.restype = None
    lib.gru_gates_backward.argtypes = [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64,
                                       _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR,
                                       _I64, _I64, _I64]
    lib.gru_gates_backward.restype = None
    lib.flat_head_masked_max.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64]
    lib.flat_head_masked_max.restype = None
    return lib


def _check_float32(kernel: str, **tensors: Tensor) -> None:
    for name, x in tensors.items():
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"{kernel}: {name} is {x.dtype} on {x.device}; the C kernels take "
                            "float32 on the CPU (set marl.kernels=torch otherwise)")


def _scan_forward(gi: Tensor, s0: Tensor, w_hh: Tensor, b_hh: Tensor, save: bool):
    """States `[T + 1, M, B, h]` (s0 first) and, with `save`, what the backward needs."""
    lib = load_kernel()
    n_m, n_t, n_b, h3 = gi.shape
    h = h3 // 3
    states = gi.new_empty(n_t + 1, n_m, n_b, h)
    states[0] = s0
    gh = gi.new_empty(n_t if save else 1, n_m, n_b, h3)
    gates = [gi.new_empty(n_t, n_m, n_b, h) for _ in range(3)] if save else []  # r, z, n
    slot = n_m * n_b * h * _F32  # bytes per slot of states and gates
    gi_p, st_p = gi.data_ptr(), states.data_ptr()
    for t in range(n_t):
        gh_t = gh[t if save else 0]
        torch.baddbmm(b_hh, states[t], w_hh, out=gh_t)
        r, z, n = ((g.data_ptr() + t * slot) for g in gates) if save else (None, None, None)
        lib.gru_gates_forward(gi_p + t * n_b * h3 * _F32, n_t * n_b * h3, gh_t.data_ptr(),
                              n_b * h3, st_p + t * slot, n_b * h, st_p + (t + 1) * slot, n_b * h,
                              r, z, n, n_b * h, n_m, n_b, h, int(save))
    return states, gh, gates


class _GRUScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, s0, w_hh, b_hh):
        states, gh, gates = _scan_forward(gi, s0, w_hh, b_hh, save=True)
        ctx.save_for_backward(states, gh, *gates, w_hh)
        return states[1:]

    @staticmethod
    def backward(ctx, grad):
        lib = load_kernel()
        states, gh, r, z, n, w_hh = ctx.saved_tensors
        n_t, n_m, n_b, h = grad.shape
        h3 = 3 * h
        grad = grad.contiguous()
        d_gi = grad.new_empty(n_m, n_t, n_b, h3)  # the layout of gi
        d_gh = grad.new_empty(n_t, n_m, n_b, h3)
        carry = grad.new_zeros(n_m, n_b, h)  # dL/ds_t from the slots after t
        direct = grad.new_empty(n_m, n_b, h)
        w_hh_t = w_hh.transpose(1, 2)
        slot, slot3 = n_m * n_b * h * _F32, n_m * n_b * h3 * _F32
        for t in reversed(range(n_t)):
            lib.gru_gates_backward(grad.data_ptr() + t * slot, n_b * h, carry.data_ptr(),
                                   states.data_ptr() + t * slot, n_b * h,
                                   r.data_ptr() + t * slot, z.data_ptr() + t * slot,
                                   n.data_ptr() + t * slot, n_b * h,
                                   gh.data_ptr() + t * slot3, n_b * h3,
                                   d_gi.data_ptr() + t * n_b * h3 * _F32, n_t * n_b * h3,
                                   d_gh.data_ptr() + t * slot3, n_b * h3, direct.data_ptr(),
                                   n_m, n_b, h)
            carry = torch.baddbmm(direct, d_gh[t], w_hh_t)  # + the path through gh = s W_hh
        prev = states[:n_t].transpose(0, 1).reshape(n_m, n_t * n_b, h)  # s_{t-1} of every slot
        d_gh = d_gh.transpose(0, 1).reshape(n_m, n_t * n_b, h3)
        d_w = torch.bmm(prev.transpose(1, 2), d_gh)  # all slots' dL/dW_hh in one matmul
        return d_gi, carry, d_w, d_gh.sum(1, keepdim=True)


def gru_scan(gi: Tensor, s0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """GRUCell's recurrence for M stacked nets: `gi[M, T, B, 3h]` (input projections with
    b_ih), `s0[M, B, h]`, `w_hh[M, h, 3h]` (W_hh transposed), `b_hh[M, 1, 3h]` -> the
    states `[T, M, B, h]`. Differentiable in all four; float32 only (the kernel's type)."""
    _check_float32("gru_scan", gi=gi, s0=s0, w_hh=w_hh, b_hh=b_hh)
    gi, s0 = gi.contiguous(), s0.contiguous()
    if torch.is_grad_enabled() and any(x.requires_grad for x in (gi, s0, w_hh, b_hh)):
        return _GRUScan.apply(gi, s0, w_hh, b_hh)
    return _scan_forward(gi, s0, w_hh, b_hh, save=False)[0][1:]


def flat_head_masked_max(x: Tensor, covered: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """`FlatHead.masked_max` without gathering: `x[R, h]`, `covered[R, U]`, the head's
    `weight[2^(U+1), h]` and `bias[2^(U+1), 1]` -> values `[R]` and argmax actions `[R]`
    (ties: the first valid action in `valid_actions_of` order). No gradient."""
    _check_float32("flat_head_masked_max", x=x, weight=weight, bias=bias)
    n_rows, h = x.shape
    x = x.detach().contiguous()
    covered = covered.to(torch.uint8).contiguous()
    values = x.new_empty(n_rows)
    best = torch.empty(n_rows, dtype=torch.long)
    load_kernel().flat_head_masked_max(x.data_ptr(), covered.data_ptr(), weight.data_ptr(),
                                       bias.data_ptr(), values.data_ptr(), best.data_ptr(),
                                       n_rows, covered.shape[1], h)
    return values, best
