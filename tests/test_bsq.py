"""Invariant tests for the BSQ quantizer: exact index round trips, STE gradient, entropies."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from qlip.quantizers import (
    BSQuantizer,
    bits_to_codes,
    bits_to_indices,
    codes_to_bits,
    group_indices_to_indices,
    indices_to_bits,
    indices_to_group_indices,
    usage_stats,
)

torch.set_num_threads(1)


def _divisors(d: int) -> list[int]:
    return [g for g in range(1, d + 1) if d % g == 0]


def _sample_indices(dim: int, n: int = 64) -> torch.Tensor:
    """Random indices plus the edge cases a float sum would get wrong (>= 2**24, >= 2**53, all ones)."""
    gen = torch.Generator().manual_seed(dim)
    top = 1 << dim
    edges = [0, 1, top - 1, top >> 1, (top >> 1) + 1, 2**24 + 1, 2**53 + 1, 2**61 + 12345]
    edges = [v for v in edges if v < top]
    rand = torch.randint(0, top, (n,), generator=gen, dtype=torch.int64)
    return torch.cat([torch.tensor(edges, dtype=torch.int64), rand])


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dim", [1, 2, 6, 28, 31, 32, 53, 62])  # 31 | 32: where the packing leaves int32 for int64
def test_index_round_trips_are_exact(dim):
    q = BSQuantizer(dim, entropy="analytical")
    idx = _sample_indices(dim)
    codes = q.indices_to_codes(idx)
    assert codes.dtype == torch.float32 and codes.shape == (idx.numel(), dim)
    assert torch.equal(q.codes_to_indices(codes), idx)
    bits = indices_to_bits(idx, dim)
    assert torch.equal(bits, codes_to_bits(codes))
    assert torch.equal(bits_to_indices(bits), idx)
    assert torch.equal(bits_to_codes(bits), codes)
    for g in _divisors(dim):
        groups = indices_to_group_indices(idx, dim, g)
        assert groups.shape == (idx.numel(), dim // g)
        assert int(groups.min()) >= 0 and int(groups.max()) < (1 << g)
        assert torch.equal(group_indices_to_indices(groups, g), idx)
        # bits <-> group indices agree with the split of the full index
        expected = groups.squeeze(-1) if g == dim else groups
        assert torch.equal(bits_to_indices(bits, group_size=g), expected)
        assert torch.equal(indices_to_bits(expected, dim, group_size=g), bits)


def test_indices_to_bits_can_skip_the_range_check():
    """The fast decode path trusts indices it wrote itself: the same bits, without reading min / max back."""
    for dim in (8, 31, 32, 62):
        idx = _sample_indices(dim)
        assert torch.equal(indices_to_bits(idx, dim, check_range=False), indices_to_bits(idx, dim))
    with pytest.raises(ValueError, match="must lie in"):
        indices_to_bits(torch.tensor([256]), 8)
    assert indices_to_bits(torch.tensor([256]), 8, check_range=False).tolist() == [[False] * 8]  # its low 8 bits


def test_index_is_msb_first_and_exact_above_float_precision():
    dim = 62
    value = 2**53 + 1  # float64 rounds this to 2**53; float32 rounds it much further
    bits = torch.zeros(dim, dtype=torch.bool)
    bits[dim - 1] = True  # least significant bit
    bits[dim - 1 - 53] = True
    assert int(bits_to_indices(bits)) == value
    three = torch.tensor([False, True, True])  # MSB first: 0b011
    assert int(bits_to_indices(three)) == 3
    assert indices_to_group_indices(torch.tensor(0b110001), 6, 3).tolist() == [0b110, 0b001]


def test_batch_shapes_are_preserved():
    q = BSQuantizer(12, group_size=3)
    u = torch.randn(2, 3, 5, 12)
    out = q(u)
    assert out.codes.shape == u.shape and out.indices.shape == (2, 3, 5)
    assert out.indices.dtype == torch.int64
    assert torch.equal(q.indices_to_codes(out.indices), out.codes.detach())


# ------------------------------------------------------------------------------------------------ quantization


def test_codes_on_unit_sphere_and_sign_of_zero():
    dim = 8
    q = BSQuantizer(dim)
    u = torch.randn(16, dim)
    u[0] = 0.0  # all-zero token: every bit -1, and no NaN from the normalisation
    u[1, ::2] = 0.0
    out = q(u)
    norms = out.codes.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(16), rtol=0, atol=1e-6)
    level = torch.tensor(1 / math.sqrt(dim), dtype=torch.float32).item()  # exactly the two float32 levels
    assert set(out.codes.detach().unique().tolist()) == {-level, level}
    assert torch.all(out.codes[0] < 0) and int(out.indices[0]) == 0
    assert torch.all(out.codes[1, ::2] < 0)
    assert torch.equal(out.codes[1, 1::2] > 0, u[1, 1::2] > 0)
    assert torch.isfinite(out.loss)


def test_quantize_matches_forward():
    for l2_norm in (True, False):
        q = BSQuantizer(10, group_size=2, l2_norm=l2_norm)
        u = torch.randn(4, 7, 10)
        u[0, 0, :3] = 0.0
        codes, indices = q.quantize(u)
        out = q(u)
        assert torch.equal(codes, out.codes.detach())
        assert torch.equal(indices, out.indices)


def test_straight_through_gradient_is_identity():
    u = torch.randn(5, 6, requires_grad=True)
    w = torch.randn(5, 6)
    q = BSQuantizer(6, l2_norm=False, compute_entropy=False)
    (q(u).codes * w).sum().backward()
    torch.testing.assert_close(u.grad, w, rtol=0, atol=0)


def test_straight_through_gradient_passes_the_l2_norm():
    u = torch.randn(5, 6, dtype=torch.float32)
    w = torch.randn(5, 6)
    u1 = u.clone().requires_grad_(True)
    (BSQuantizer(6, compute_entropy=False)(u1).codes * w).sum().backward()
    u2 = u.clone().requires_grad_(True)
    ((u2 / u2.norm(dim=-1, keepdim=True)) * w).sum().backward()
    torch.testing.assert_close(u1.grad, u2.grad, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ entropies


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def _brute_force(u: torch.Tensor, inv_temperature: float):
    """Joint soft assignment over all 2**d codewords (float64), enumerated MSB first with -1 before +1."""
    dim = u.shape[-1]
    codewords = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=dim)), dtype=torch.float64)  # (2**d, d)
    logits = 2 * inv_temperature * (u.double() @ codewords.T) / math.sqrt(dim)
    return torch.softmax(logits, dim=-1)  # (N, 2**d)


@pytest.mark.parametrize("dim,group_size,inv_t", [(4, 1, 1.0), (4, 2, 0.5), (6, 3, 3.0), (6, 6, 2.0), (5, 5, 1.0)])
def test_group_entropy_matches_brute_force(dim, group_size, inv_t):
    torch.manual_seed(0)
    u = torch.randn(32, dim) * 3
    q = BSQuantizer(dim, group_size=group_size, inv_temperature=inv_t)
    out = q(u)
    joint = _brute_force(F.normalize(u, dim=-1), inv_t)  # (N, 2**d)
    # per-sample: the joint softmax factorises over groups, so its entropy is the sum of the group entropies
    torch.testing.assert_close(out.per_sample_entropy.double(), _entropy(joint).mean(), rtol=1e-5, atol=1e-5)
    # codebook: the sum over groups of the entropy of each group's marginal of the batch-averaged joint
    avg = joint.mean(0).reshape([1 << group_size] * (dim // group_size))
    others = [[j for j in range(avg.ndim) if j != k] for k in range(avg.ndim)]
    marginals = [avg] if avg.ndim == 1 else [avg.sum(dim=dims) for dims in others]
    expected = sum(_entropy(m) for m in marginals)
    torch.testing.assert_close(out.codebook_entropy.double(), expected, rtol=1e-5, atol=1e-5)
    if group_size == dim:  # a single group: the codebook term is the full entropy of the averaged joint
        torch.testing.assert_close(out.codebook_entropy.double(), _entropy(joint.mean(0)), rtol=1e-5, atol=1e-5)


def test_analytical_equals_group_for_group_size_one():
    torch.manual_seed(1)
    u = torch.randn(3, 9, 12)
    for inv_t in (0.5, 1.0, 4.0):
        a = BSQuantizer(12, inv_temperature=inv_t, entropy="analytical")(u)
        group = BSQuantizer(12, inv_temperature=inv_t, entropy="group")
        g = group(u)  # g = 1 dispatches to the closed form ...
        # ... which must equal the explicit 2-way softmax over the group codewords
        per_sample, codebook = group._group_entropies(torch.nn.functional.normalize(u, dim=-1).reshape(-1, 12))
        for out in (a, g):
            torch.testing.assert_close(out.per_sample_entropy, per_sample, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out.codebook_entropy, codebook, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.loss, g.loss, rtol=0, atol=1e-5)  # a difference of two ~8-nat terms


def test_entropy_terms_are_differentiable():
    u = torch.randn(8, 6, requires_grad=True)
    out = BSQuantizer(6, group_size=2)(u)
    (gp,) = torch.autograd.grad(out.per_sample_entropy, u, retain_graph=True)
    (gc,) = torch.autograd.grad(out.codebook_entropy, u)
    assert gp.abs().sum() > 0 and gc.abs().sum() > 0


def test_float32_under_bf16_autocast():
    torch.manual_seed(2)
    u = torch.randn(16, 8)
    linear = torch.nn.Linear(8, 8)
    for entropy, g in (("group", 4), ("analytical", 1)):
        q = BSQuantizer(8, group_size=g, entropy=entropy, beta=0.25)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = linear(u)
            assert x.dtype == torch.bfloat16
            out = q(x)
        ref = q(x.float())  # the same bf16 values, without autocast
        for name in ("codes", "loss", "commit_loss", "per_sample_entropy", "codebook_entropy"):
            value = getattr(out, name)
            assert value.dtype == torch.float32, name
            assert torch.isfinite(value).all(), name
            # a bf16 matmul inside would be off by ~1e-3; fp32 matches to rounding
            torch.testing.assert_close(value, getattr(ref, name), rtol=1e-6, atol=1e-6)


def test_module_cast_to_half_still_computes_in_float32():
    q = BSQuantizer(6, group_size=2).to(torch.bfloat16)
    u = torch.randn(4, 6)
    out, ref = q(u), BSQuantizer(6, group_size=2)(u)
    torch.testing.assert_close(out.per_sample_entropy, ref.per_sample_entropy, rtol=1e-6, atol=1e-6)
    assert out.per_sample_entropy.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ loss


def test_loss_formula_and_weights():
    torch.manual_seed(3)
    u = torch.randn(10, 8)
    beta, g0, g1, inv_t = 0.3, 0.7, 1.9, 2.0
    out = BSQuantizer(8, group_size=2, beta=beta, gamma0=g0, gamma1=g1, inv_temperature=inv_t)(u)
    expected = beta * out.commit_loss + (g0 * out.per_sample_entropy - g1 * out.codebook_entropy) / inv_t
    torch.testing.assert_close(out.loss, expected)
    un = F.normalize(u, dim=-1)
    hard = torch.where(un > 0, 1.0, -1.0) / math.sqrt(8)
    torch.testing.assert_close(out.commit_loss, ((hard - un) ** 2).sum(-1).mean())
    # the weights must act: a different gamma1 changes the loss by exactly the codebook term
    out2 = BSQuantizer(8, group_size=2, beta=beta, gamma0=g0, gamma1=0.0, inv_temperature=inv_t)(u)
    torch.testing.assert_close(out2.loss - out.loss, g1 * out.codebook_entropy / inv_t)


def test_commit_loss_gradient_reaches_input_only_through_u():
    u = torch.randn(4, 6, requires_grad=True)
    out = BSQuantizer(6, beta=1.0, compute_entropy=False, l2_norm=False)(u)
    out.loss.backward()
    hard = torch.where(u.detach() > 0, 1.0, -1.0) / math.sqrt(6)
    torch.testing.assert_close(u.grad, 2 * (u.detach() - hard) / 4)  # d/du of mean_n ||sg(q) - u||^2


def test_compute_entropy_false_returns_zeros():
    u = torch.randn(5, 4)
    out = BSQuantizer(4, beta=0.5, compute_entropy=False)(u)
    assert float(out.per_sample_entropy) == 0.0 and float(out.codebook_entropy) == 0.0
    torch.testing.assert_close(out.loss, 0.5 * out.commit_loss)


def test_large_dim_never_builds_the_full_codebook():
    # 2**62 entries could not be allocated: this only runs if everything stays per group
    for entropy, g in (("group", 2), ("analytical", 62)):
        out = BSQuantizer(62, group_size=g, entropy=entropy)(torch.randn(3, 62))
        assert torch.isfinite(out.loss)
        assert int(out.stats["distinct_codes"]) == 3


# ------------------------------------------------------------------------------------------------ stats


def test_usage_stats_on_a_hand_made_batch():
    idx = torch.tensor([[5, 5], [3, 7]])  # d = 3: 101, 101, 011, 111
    s = usage_stats(idx, 3)
    assert int(s["distinct_codes"]) == 3 and int(s["num_tokens"]) == 4
    torch.testing.assert_close(s["bit_mean"], torch.tensor([0.75, 0.5, 1.0]))
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    torch.testing.assert_close(s["bit_entropy"], torch.tensor([h, 1.0, 0.0]))
    torch.testing.assert_close(s["mean_bit_entropy"], torch.tensor((h + 1.0) / 3))
    torch.testing.assert_close(s["code_entropy"], torch.tensor(1.5))  # p = (1/2, 1/4, 1/4)
    torch.testing.assert_close(s["code_perplexity"], torch.tensor(2**1.5))
    with_bits = usage_stats(idx, 3, bits=indices_to_bits(idx, 3))
    for k, v in s.items():
        assert torch.equal(v, with_bits[k]), k


def test_balanced_bits_can_hide_few_codes():
    # every bit is used half the time (1 bit of entropy each) but only two codes occur
    idx = torch.tensor([0, 2**28 - 1] * 50)
    s = usage_stats(idx, 28)
    torch.testing.assert_close(s["mean_bit_entropy"], torch.tensor(1.0))
    assert int(s["distinct_codes"]) == 2
    torch.testing.assert_close(s["code_perplexity"], torch.tensor(2.0))


def test_forward_stats_are_detached_and_consistent():
    u = torch.randn(6, 5, requires_grad=True)
    out = BSQuantizer(5)(u)
    assert all(not v.requires_grad for v in out.stats.values())
    ref = usage_stats(out.indices, 5)
    for k, v in ref.items():
        assert torch.equal(v, out.stats[k]), k


# ------------------------------------------------------------------------------------------------ errors


def test_clear_errors_for_bad_arguments():
    with pytest.raises(ValueError, match=r"\[1, 62\]"):
        BSQuantizer(63)
    with pytest.raises(ValueError, match="divisor"):
        BSQuantizer(28, group_size=3)
    with pytest.raises(ValueError, match="analytical"):
        BSQuantizer(34, group_size=17)
    BSQuantizer(34, group_size=17, entropy="analytical")  # fine: no codebook
    with pytest.raises(ValueError, match="entropy"):
        BSQuantizer(4, entropy="lookup")
    with pytest.raises(ValueError, match="inv_temperature"):
        BSQuantizer(4, inv_temperature=0.0)
    q = BSQuantizer(4)
    with pytest.raises(ValueError, match="last dimension 4"):
        q(torch.randn(2, 5))
    with pytest.raises(ValueError, match="last dimension 4"):
        q.quantize(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[0, 2\*\*4\)"):
        q.indices_to_codes(torch.tensor([16]))
    with pytest.raises(ValueError, match=r"\[0, 2\*\*4\)"):
        q.indices_to_codes(torch.tensor([-1]))
    with pytest.raises(ValueError, match="int64"):
        q.indices_to_codes(torch.tensor([3.0]))
    with pytest.raises(ValueError, match="divisor"):
        indices_to_group_indices(torch.tensor([3]), 6, 4)
    with pytest.raises(ValueError, match=r"\[1, 62\]"):
        bits_to_indices(torch.ones(63, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[1, 62\]"):
        group_indices_to_indices(torch.zeros(3, dtype=torch.int64), 21)
    with pytest.raises(ValueError, match="last dimension 3"):
        indices_to_bits(torch.zeros(2, 2, dtype=torch.int64), 6, group_size=2)
    with pytest.raises(ValueError, match="no tokens"):
        q(torch.randn(0, 4))


# --- graph export: the integer steps must be ops every exporter has ----------------------------------------------


class _BitRoundTrip(torch.nn.Module):
    def forward(self, u):
        indices = bits_to_indices(codes_to_bits(u))  # (B, N)
        return indices, indices_to_bits(indices, u.shape[-1], check_range=False)


def test_bit_packing_traces_without_integer_shifts():
    """ONNX has no shift for signed integers: the traced sign -> index step and its inverse must not shift."""
    program = torch.export.export(_BitRoundTrip().eval(), (torch.randn(2, 5, 28),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "shift" in t], targets


@pytest.mark.slow
def test_bit_packing_exports_to_onnx_exactly():
    """The BSQ sign -> index step and its inverse are plain integer ops that ONNX has (no signed shifts)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")

    u = torch.randn(3, 5, 28)
    program = torch.onnx.export(_BitRoundTrip().eval(), (u,), dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))  # fmt: skip
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 5, 28)
    x[1, 2] = 1.0  # every bit set: index 2**28 - 1
    indices, bits = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.equal(torch.from_numpy(indices), bits_to_indices(codes_to_bits(x)))
    assert indices[1, 2] == 2**28 - 1
    assert torch.equal(torch.from_numpy(bits), codes_to_bits(x))
