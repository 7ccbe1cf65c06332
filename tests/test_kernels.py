"""The C kernels (`dntsync.marl.kernels`): the GRU recurrence gives GRUCell's numbers and
gradients, the acting masked max the torch version's; the build on first use, and clear
errors where the kernels cannot be used."""

from __future__ import annotations

import pytest
import torch

from dntsync.marl import kernels as gs
from dntsync.marl.networks import torch_scan


def _inputs(n_m=3, n_t=30, n_b=16, h=128, seed=0, s0_zero=False):
    g = torch.Generator().manual_seed(seed)
    gi = (2 * torch.randn(n_m, n_t, n_b, 3 * h, generator=g)).requires_grad_()
    s0 = (torch.zeros(n_m, n_b, h) if s0_zero else torch.randn(n_m, n_b, h, generator=g).tanh())
    w_hh = (torch.randn(n_m, h, 3 * h, generator=g) / h**0.5).requires_grad_()
    b_hh = (0.1 * torch.randn(n_m, 1, 3 * h, generator=g)).requires_grad_()
    return gi, s0.requires_grad_(), w_hh, b_hh


@pytest.mark.parametrize("shape", [(3, 30, 16, 128), (1, 1, 1, 4), (2, 5, 3, 7)])
def test_fused_scan_matches_the_eager_gru_equations_and_their_gradients(shape):
    inputs = _inputs(*shape)
    weights = torch.randn(shape[1], shape[0], shape[2], shape[3])  # an arbitrary loss
    outs, grads = [], []
    for scan in (gs.gru_scan, torch_scan):
        states = scan(*inputs)
        outs.append(states.detach())
        grads.append(torch.autograd.grad((states * weights).sum(), inputs))
    assert outs[0].shape == (shape[1], shape[0], shape[2], shape[3])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=2e-6)
    for name, fused, eager in zip(("gi", "s0", "w_hh", "b_hh"), *grads):
        scale = eager.abs().max().item()
        assert scale > 0, name  # every input's gradient is exercised
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=2e-6 * scale, msg=name)


def test_no_grad_path_gives_the_same_states_as_the_differentiable_one():
    inputs = _inputs(2, 6, 4, 8, seed=3)
    with torch.no_grad():
        plain = gs.gru_scan(*inputs)
    assert torch.equal(plain, gs.gru_scan(*inputs).detach())
    frozen = [x.detach() for x in inputs]  # target nets: nothing requires grad
    assert torch.equal(gs.gru_scan(*frozen), plain)


def test_noncontiguous_inputs_are_handled():
    gi, s0, w_hh, b_hh = _inputs(3, 4, 5, 6, seed=1)
    s0_t = s0.detach().transpose(0, 1).contiguous().transpose(0, 1)  # a strided view
    assert not s0_t.is_contiguous()
    torch.testing.assert_close(gs.gru_scan(gi, s0_t, w_hh, b_hh),
                               torch_scan(gi, s0_t, w_hh, b_hh), rtol=1e-5, atol=2e-6)


def test_float64_is_refused_with_the_config_fix():
    gi, s0, w_hh, b_hh = (x.detach().double() for x in _inputs(1, 2, 2, 4))
    with pytest.raises(TypeError, match="marl.kernels=torch"):
        gs.gru_scan(gi, s0, w_hh, b_hh)


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """An empty kernel cache in tmp_path, and `load_kernel` forgetting the loaded library."""
    monkeypatch.setenv("DNTSYNC_CACHE_DIR", str(tmp_path / "cache"))
    gs.load_kernel.cache_clear()
    yield tmp_path / "cache"
    gs.load_kernel.cache_clear()


def test_kernel_is_built_once_into_the_cache(fresh_kernel):
    gs.load_kernel()
    built = list(fresh_kernel.glob("kernels-*.so"))
    assert len(built) == 1 and built[0].stat().st_size > 0
    stamp = built[0].stat().st_mtime_ns
    gs.load_kernel.cache_clear()
    gs.load_kernel()  # a second process: finds it, does not rebuild
    assert built[0].stat().st_mtime_ns == stamp
    assert list(fresh_kernel.iterdir()) == built  # no temporary build folder left


def test_missing_compiler_fails_naming_the_fix(fresh_kernel, monkeypatch):
    from dntsync.marl.networks import AgentQNets

    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(gs.KernelUnavailable, match="marl.kernels=torch"):
        AgentQNets(3, 7, 16, 4)  # fails when the nets are built, before any training
    AgentQNets(3, 7, 16, 4, kernels="torch")  # the plain torch path needs no compiler


def test_broken_build_reports_the_compiler_output(fresh_kernel, monkeypatch, tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'fakecc: boom' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(gs.KernelUnavailable, match="boom"):
        gs.load_kernel()


def test_unknown_kernels_value_is_rejected():
    from dntsync.marl.networks import AgentQNets

    with pytest.raises(ValueError, match="kernels='fast'"):
        AgentQNets(3, 7, 16, 4, kernels="fast")


@pytest.mark.parametrize("n_users", [1, 4, 12])
def test_acting_masked_max_kernel_equals_the_torch_versions(n_users):
    from dntsync.marl.networks import FlatHead, valid_mask

    torch.manual_seed(n_users)
    head = FlatHead(16, n_users)
    x = torch.randn(40, 16)
    covered = torch.rand(40, n_users) < 0.4
    covered[0] = False  # upload or not, serving nobody
    covered[1] = True  # every user covered: the largest k
    with torch.no_grad():
        values, best = gs.flat_head_masked_max(x, covered, head.weight, head.bias)
        ragged = head._masked_max_ragged(x, covered)
        q = head.all_q(x).masked_fill(~valid_mask(covered), -torch.inf)
    assert torch.equal(best, ragged[1])
    torch.testing.assert_close(values, ragged[0])
    torch.testing.assert_close(values, q.max(-1).values)
    assert valid_mask(covered).gather(1, best[:, None]).all()  # always a valid action


def test_acting_masked_max_ties_go_to_the_first_valid_action():
    from dntsync.marl.networks import FlatHead

    head = FlatHead(4, 3)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()  # every action ties
    covered = torch.tensor([[False, True, True], [True, False, False]])
    x = torch.randn(2, 4)
    with torch.no_grad():
        _, best = gs.flat_head_masked_max(x, covered, head.weight, head.bias)
        assert torch.equal(best, head._masked_max_ragged(x, covered)[1])
    assert best.tolist() == [0, 0]


def test_flat_head_uses_the_kernel_only_without_gradient():
    from dntsync.marl.networks import FlatHead

    torch.manual_seed(0)
    head = FlatHead(8, 5, kernels="c")
    x, covered = torch.randn(6, 8), torch.rand(6, 5) < 0.5
    with torch.no_grad():
        fast = head.masked_max(x, covered)
    slow = head.masked_max(x, covered)  # with grad: the differentiable torch path
    assert slow[0].requires_grad
    assert torch.equal(fast[1], slow[1])
    torch.testing.assert_close(fast[0], slow[0].detach())
