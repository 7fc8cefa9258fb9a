"""duetlm.grpo: hand-computed examples, hypothesis properties, and gradients through a tiny real Qwen3."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duetlm.grpo import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    aggregate,
    batch_advantages,
    compute_advantages,
    global_advantages,
    group_advantages,
    kl_k1,
    kl_k3,
    model_token_logprobs,
    policy_loss,
    sequence_kl_k1,
    token_logprobs,
)

torch.set_num_threads(1)

PROPS = settings(derandomize=True, deadline=None, max_examples=150)
LN = math.log


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def ids(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------
# Advantages: hand-computed examples
# ---------------------------------------------------------------------------------------------------

# Four groups, ids deliberately neither sorted-contiguous nor starting at 0:
#   group 5: [1, 0, 0, 1]  mean 0.5, centred ±0.5, unbiased var = 4·0.25/3 = 1/3, std = 0.5773503
#            -> ±0.5 / (0.5773503 + 1e-6) = ±0.8660239
#   group 2: [0.5, 0.5]    all tie -> 0
#   group 9: [2]           singleton -> 0
#   group 0: [3, 1, 2]     mean 2, centred [1, -1, 0], var = 2/2 = 1 -> ±1/(1 + 1e-6) = ±0.999999, 0
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 2.0, 3.0, 1.0, 2.0]
GROUPS = [5, 5, 5, 5, 2, 2, 9, 0, 0, 0]


def test_group_advantages_hand_example() -> None:
    a, b = 0.8660239037870368, 0.9999990000010001
    expected = [a, -a, -a, a, 0.0, 0.0, 0.0, b, -b, 0.0]
    out = group_advantages(t64(REWARDS), ids(GROUPS))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, t64(expected), rtol=0, atol=1e-12)
    # float32 in, float32 out, same numbers
    out32 = group_advantages(torch.tensor(REWARDS), ids(GROUPS))
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, torch.tensor(expected), rtol=0, atol=1e-6)


def test_group_advantages_without_std_is_centring_only() -> None:
    # Dr. GRPO: R - mean_g R = [.5, -.5, -.5, .5 | 0, 0 | 0 | 1, -1, 0]
    out = group_advantages(t64(REWARDS), ids(GROUPS), norm_std=False)
    torch.testing.assert_close(out, t64([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 1, -1, 0]), rtol=0, atol=1e-15)


def test_group_advantages_ties_are_exactly_zero() -> None:
    # 0.1 * 3 / 3 != 0.1 in floating point; a tied group must still give exactly 0, not 1e-17 / 1e-6.
    out = group_advantages(t64([0.1, 0.1, 0.1, 0.7]), ids([0, 0, 0, 1]))
    assert torch.equal(out, torch.zeros(4, dtype=torch.float64))


def test_batch_advantages_hand_example() -> None:
    # rewards [1, 0 | 3, 1 | 4 | 2, 2], groups [0, 0, 1, 1, 2, 3, 3]
    # centred per group: [.5, -.5, 1, -1, 0, 0, 0]; batch std (unbiased, N - 1 = 6):
    # sqrt((.25 + .25 + 1 + 1) / 6) = sqrt(2.5 / 6) = 0.6454972
    # -> .5 / (0.6454972 + 1e-6) = 0.7745955, 1 / (...) = 1.5491909; singleton and tied group stay 0
    a, b = 0.7745954692433424, 1.5491909384866849
    out = batch_advantages(t64([1, 0, 3, 1, 4, 2, 2]), ids([0, 0, 1, 1, 2, 3, 3]))
    torch.testing.assert_close(out, t64([a, -a, b, -b, 0, 0, 0]), rtol=0, atol=1e-12)
    out = batch_advantages(t64([1, 0, 3, 1, 4, 2, 2]), ids([0, 0, 1, 1, 2, 3, 3]), norm_std=False)
    torch.testing.assert_close(out, t64([0.5, -0.5, 1, -1, 0, 0, 0]), rtol=0, atol=1e-15)


def test_global_advantages_hand_example() -> None:
    # rewards [1, 0, 3, 1]: batch mean 1.25, centred [-.25, -1.25, 1.75, -.25],
    # unbiased std sqrt((.0625 + 1.5625 + 3.0625 + .0625) / 3) = sqrt(4.75 / 3) = 1.2583057
    # -> [-0.1986797, -0.9933985, 1.3907579, -0.1986797]; group ids play no part
    expected = t64([-0.19867969566514523, -0.9933984783257261, 1.3907578696560166, -0.19867969566514523])
    for groups in ([0, 0, 1, 1], [0, 1, 2, 3], [7, 7, 7, 7]):
        out = global_advantages(t64([1, 0, 3, 1]), ids(groups))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    out = global_advantages(t64([1, 0, 3, 1]), ids([0, 0, 1, 1]), norm_std=False)
    torch.testing.assert_close(out, t64([-0.25, -1.25, 1.75, -0.25]), rtol=0, atol=1e-15)
    # a batch that ties, or of one response, gives 0
    assert torch.equal(global_advantages(t64([0.3, 0.3]), ids([0, 1])), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(global_advantages(t64([5.0]), ids([0])), torch.zeros(1, dtype=torch.float64))


def test_compute_advantages_dispatch_and_unknown_name() -> None:
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "batch", "global"}
    r, g = t64(REWARDS), ids(GROUPS)
    torch.testing.assert_close(compute_advantages("grpo", r, g), group_advantages(r, g), rtol=0, atol=0)
    torch.testing.assert_close(
        compute_advantages("global", r, g, norm_std=False), global_advantages(r, g, norm_std=False)
    )
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'.*grpo, batch, global"):
        compute_advantages("ppo", r, g)


def test_empty_inputs_give_empty_outputs() -> None:
    for name in ADVANTAGE_ESTIMATORS:
        assert compute_advantages(name, torch.zeros(0), ids([])).shape == (0,)
    assert token_logprobs(torch.zeros(2, 0, 5), torch.zeros(2, 0, dtype=torch.long), chunk_size=3).shape == (
        2,
        0,
    )


def test_advantages_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), ids([0, 0]))
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.zeros(3), ids([0, 0]))
    with pytest.raises(ValueError, match="integer"):
        group_advantages(torch.zeros(2), torch.zeros(2))


# ---------------------------------------------------------------------------------------------------
# Advantages: properties
# ---------------------------------------------------------------------------------------------------

# Rewards on a 1/64 grid, as real ones are (successes in quarters, lengths in tokens / B): exactly
# representable, so shifted and unshifted inputs differ only by the rounding of the mean.
grid = st.integers(-640, 640).map(lambda k: k / 64)


@st.composite
def grouped(draw, values=grid):
    n = draw(st.integers(1, 24))
    rewards = draw(st.lists(values, min_size=n, max_size=n))
    groups = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    return rewards, groups


@PROPS
@given(grouped(), st.lists(grid, min_size=6, max_size=6), st.booleans())
def test_grpo_advantages_ignore_a_per_group_shift(data, shifts, norm_std) -> None:
    rewards, groups = data
    r, g = t64(rewards), ids(groups)
    shifted = r + t64(shifts)[g]
    for name in ("grpo", "batch"):
        torch.testing.assert_close(
            compute_advantages(name, shifted, g, norm_std),
            compute_advantages(name, r, g, norm_std),
            rtol=0,
            atol=1e-10,
        )


@PROPS
@given(grouped(), st.booleans())
def test_grpo_advantages_sum_to_zero_per_group_and_follow_permutations(data, norm_std) -> None:
    rewards, groups = data
    r, g = t64(rewards), ids(groups)
    perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(len(rewards)))
    for name in ("grpo", "batch"):
        adv = compute_advantages(name, r, g, norm_std)
        per_group = torch.zeros(6, dtype=torch.float64).index_add(0, g, adv)
        torch.testing.assert_close(per_group, torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-10)
        torch.testing.assert_close(
            compute_advantages(name, r[perm], g[perm], norm_std), adv[perm], rtol=0, atol=1e-12
        )
    if norm_std:  # grpo: unit unbiased std in every group that does not tie (up to eps)
        adv = group_advantages(r, g)
        for k in g.unique():
            a = adv[g == k]
            if a.numel() > 1 and a.abs().max() > 0:
                std = r[g == k].std()
                assert a.std().item() == pytest.approx(std.item() / (std.item() + 1e-6), abs=1e-12)


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@PROPS
@given(grouped(values=finite32))
def test_advantages_are_finite_for_any_float32_rewards(data) -> None:
    rewards, groups = data
    r, g = torch.tensor(rewards, dtype=torch.float32), ids(groups)
    for name in ADVANTAGE_ESTIMATORS:
        adv = compute_advantages(name, r, g)
        assert adv.dtype == torch.float32 and torch.isfinite(adv).all(), (name, rewards, adv)


@PROPS
@given(grouped(values=st.floats(-(2.0**100), 2.0**100, width=32)))
def test_centred_advantages_are_finite(data) -> None:
    rewards, groups = data
    r, g = torch.tensor(rewards, dtype=torch.float32), ids(groups)
    for name in ADVANTAGE_ESTIMATORS:
        assert torch.isfinite(compute_advantages(name, r, g, norm_std=False)).all()


# ---------------------------------------------------------------------------------------------------
# Token log-probs
# ---------------------------------------------------------------------------------------------------


def test_token_logprobs_hand_example() -> None:
    # a = [0, 0, ln 2]       -> softmax [1/4, 1/4, 1/2]
    # b = [ln 1, ln 2, ln 5] -> softmax [1/8, 2/8, 5/8]; b + 10 has the same softmax
    a = [0.0, 0.0, LN(2)]
    b = [0.0, LN(2), LN(5)]
    logits = torch.tensor([[a, b], [[x + 10 for x in b], a]])  # (2, 2, 3)
    labels = ids([[2, 2], [1, 0]])
    # ln(1/2) = -0.6931472, ln(5/8) = -0.4700036, ln(2/8) = -1.3862944, ln(1/4) = -1.3862944
    expected = torch.tensor([[-0.6931472, -0.4700036], [-1.3862944, -1.3862944]])
    torch.testing.assert_close(token_logprobs(logits, labels), expected, rtol=0, atol=1e-6)
    for chunk in (1, 2, 5):
        torch.testing.assert_close(
            token_logprobs(logits, labels, chunk_size=chunk), expected, rtol=0, atol=1e-6
        )
    # temperature 2 on [0, 0, 2 ln 2] is softmax of [0, 0, ln 2]: label 2 -> ln(1/2)
    hot = torch.tensor([[[0.0, 0.0, 2 * LN(2)]]])
    out = token_logprobs(hot, ids([[2]]), temperature=2.0)
    torch.testing.assert_close(out, torch.tensor([[-0.6931472]]), rtol=0, atol=1e-6)


def test_token_logprobs_chunking_and_bf16_match_the_plain_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 11, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits)
    for chunk in (None, 1, 2, 3, 7, 100):
        for tau in (1.0, 0.7):
            out = token_logprobs(logits, labels, chunk_size=chunk, temperature=tau)
            want = torch.log_softmax(logits / tau, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
        (grad,) = torch.autograd.grad(token_logprobs(logits, labels, chunk_size=chunk).sum(), logits)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    # bf16 logits are computed in float32 (here through the checkpointed path, gradients included)
    lb = logits.detach().to(torch.bfloat16).requires_grad_()
    out = token_logprobs(lb, labels, chunk_size=3)
    assert out.dtype == torch.float32
    lf = lb.detach().float().requires_grad_()
    want = torch.log_softmax(lf, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    (g_b,) = torch.autograd.grad(out.sum(), lb)
    (g_f,) = torch.autograd.grad(want.sum(), lf)
    torch.testing.assert_close(g_b, g_f.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("dtype", "chunk", "tau"),
    [(torch.float32, None, 1.0), (torch.float32, 4, 1.0), (torch.float32, 4, 0.7), (torch.bfloat16, 4, 1.0)],
)
def test_token_logprobs_keeps_no_second_vocabulary_sized_tensor(dtype, chunk, tau) -> None:
    # Every tensor autograd saves for backward that has a vocabulary dimension must be (a view of)
    # the logits themselves: no log_softmax output, no upcast or temperature-scaled copy.
    vocab = 1000
    logits = torch.randn(2, 8, vocab, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 8))
    base = logits.untyped_storage().data_ptr()
    foreign: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= vocab and t.untyped_storage().data_ptr() != base:
            foreign.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logprobs(logits, labels, chunk_size=chunk, temperature=tau)
    assert foreign == []
    out.sum().backward()
    assert torch.isfinite(logits.grad.float()).all()


def test_token_logprobs_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        token_logprobs(torch.zeros(2, 3), ids([[0, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 1, 2), ids([[0]]), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(torch.zeros(1, 1, 2), ids([[0]]), chunk_size=0)


# ---------------------------------------------------------------------------------------------------
# A tiny real model
# ---------------------------------------------------------------------------------------------------

PAD = 0  # used only as padding, so its embedding row must get exactly zero gradient


def tiny_qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,  # so the pad row of the input embedding is its own parameter
        pad_token_id=PAD,
    )
    return Qwen3ForCausalLM(config).eval()  # eval: no dropout (gradients still flow)


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3()


SEQ = [5, 17, 9, 33, 2, 41, 8]  # prompt [5, 17, 9] + response [33, 2, 41, 8]
PROMPT_LEN = 3


def pad_left(seq: list[int], width: int) -> tuple[list[int], list[int]]:
    return [PAD] * (width - len(seq)) + seq, [0] * (width - len(seq)) + [1] * len(seq)


def pad_right(seq: list[int], width: int) -> tuple[list[int], list[int]]:
    return seq + [PAD] * (width - len(seq)), [1] * len(seq) + [0] * (width - len(seq))


def tiny_gpt2():
    """Absolute learned positions: a left-padded row shifts them unless position ids come from the mask
    (RoPE models like Qwen3 are nearly blind to a constant shift, so they cannot show that bug)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = PAD, 1, 1
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_model_token_logprobs_shift_and_padding(model, arch) -> None:
    model = model if arch == "qwen3" else tiny_gpt2()
    x = ids([SEQ])
    with torch.no_grad():
        plain = model_token_logprobs(model, x, torch.ones_like(x))  # (1, 6)
        logits = model(x).logits  # (1, 7, 64)
    # entry t is log p(x[t+1] | x[:t+1]), from the logits at position t
    want = torch.log_softmax(logits[0, :-1], -1).gather(-1, x[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(plain[0], want, rtol=0, atol=1e-6)

    # left (3 pads) and right (2 pads) padding in one batch give the unpadded values; 0 elsewhere
    (l_ids, l_mask), (r_ids, r_mask) = pad_left(SEQ, 10), pad_right(SEQ, 10)
    with torch.no_grad():
        out = model_token_logprobs(model, ids([l_ids, r_ids]), ids([l_mask, r_mask]))  # (2, 9)
    torch.testing.assert_close(out[0, 3:], plain[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(out[1, :6], plain[0], rtol=0, atol=2e-6)
    assert torch.equal(out[0, :3], torch.zeros(3)) and torch.equal(out[1, 6:], torch.zeros(3))

    with torch.no_grad():
        hot = model_token_logprobs(model, x, torch.ones_like(x), chunk_size=4, temperature=0.7)
    want = torch.log_softmax(logits[0, :-1] / 0.7, -1).gather(-1, x[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(hot[0], want, rtol=0, atol=1e-6)


def response_logprob(model, seq: list[int]) -> torch.Tensor:
    x = ids([seq])
    with torch.no_grad():
        return model_token_logprobs(model, x, torch.ones_like(x))[0, PROMPT_LEN - 1 :].sum()


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_one_sgd_step_moves_the_sequence_logprob_with_the_advantage(advantage) -> None:
    model = tiny_qwen3(seed=1)
    before = response_logprob(model, SEQ)  # about 4 · ln(1/64) = -16.6 at initialisation
    x = ids([SEQ])
    logp = model_token_logprobs(model, x, torch.ones_like(x))  # (1, 6)
    mask = torch.zeros_like(logp)
    mask[:, PROMPT_LEN - 1 :] = 1  # the 4 response tokens
    out = policy_loss(logp, logp.detach(), torch.tensor([advantage]), mask)
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    after = response_logprob(model, SEQ)
    # first order: Δ log p = lr · |∇ Σ log p|² · A / 4 > 0 for A = +1; measured ≈ ±0.4 here
    assert (after - before).item() * advantage > 0.05


@pytest.mark.parametrize("padding", [pad_left, pad_right])
def test_padding_gets_zero_gradient_and_changes_nothing(model, padding) -> None:
    def grads(seqs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        x, m = ids([s for s, _ in seqs]), ids([k for _, k in seqs])
        logp = model_token_logprobs(model, x, m)  # (B, T-1)
        resp = torch.zeros_like(logp)
        for i, (_, k) in enumerate(seqs):  # response = the last 4 real tokens of each row
            real = [t for t in range(logp.shape[1]) if k[t + 1] == 1 and k[t] == 1]
            resp[i, real[-4:]] = 1
        adv = torch.tensor([1.0, -0.5][: len(seqs)])
        policy_loss(logp, logp.detach() - 0.1, adv, resp, loss_agg="seq-mean-token-mean").loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    other = [7, 3, 11, 12, 13, 14]
    padded = grads([padding(SEQ, 10), padding(other, 10)])
    assert torch.equal(padded["model.embed_tokens.weight"][PAD], torch.zeros(32))
    # the same batch without any padding: each row alone, summed with the batch normaliser (2 seqs)
    alone = [grads([(SEQ, [1] * 7)]), grads([(other, [1] * 6)])]
    for name, g in padded.items():
        # padded loss = (ℓ_0(A=1) + ℓ_1(A=-0.5)) / 2, each row's loss linear in A (no clipping here,
        # ρ = e^0.1); the rows alone were run with A = 1 and num_seqs = 1
        combined = (alone[0][name] - 0.5 * alone[1][name]) / 2
        torch.testing.assert_close(g, combined, rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------
# Aggregation and the PPO-clip loss
# ---------------------------------------------------------------------------------------------------

# Two sequences of unequal length; the 100s sit under the mask and must not count.
LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_aggregations_on_unequal_lengths() -> None:
    # token-mean:               (1 + 2 + 3 + 4 + 5) / 5         = 3
    # seq-mean-token-mean:      (6/3 + 9/2) / 2 = (2 + 4.5) / 2  = 3.25
    # seq-mean-token-sum-norm:  (6/4 + 9/4) / 2, max_tokens = 4  = 1.875
    assert aggregate(LOSS_MAT, MASK, "token-mean").item() == pytest.approx(3.0, abs=1e-7)
    assert aggregate(LOSS_MAT, MASK, "seq-mean-token-mean").item() == pytest.approx(3.25, abs=1e-7)
    assert aggregate(LOSS_MAT, MASK, "seq-mean-token-sum-norm", max_tokens=4).item() == pytest.approx(
        1.875, abs=1e-7
    )
    # explicit normalisers replace the batch's own: 15 / 10; (2 + 4.5) / 4; (15/8) / 4
    assert aggregate(LOSS_MAT, MASK, "token-mean", num_tokens=10).item() == pytest.approx(1.5, abs=1e-7)
    assert aggregate(LOSS_MAT, MASK, "seq-mean-token-mean", num_seqs=4).item() == pytest.approx(
        1.625, abs=1e-7
    )
    got = aggregate(LOSS_MAT, MASK, "seq-mean-token-sum-norm", num_seqs=4, max_tokens=8)
    assert got.item() == pytest.approx(15 / 8 / 4, abs=1e-7)
    assert set(AGGREGATIONS) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}


def test_aggregate_errors() -> None:
    with pytest.raises(ValueError, match="unknown loss_agg 'mean'.*token-mean, seq-mean-token-mean"):
        aggregate(LOSS_MAT, MASK, "mean")
    with pytest.raises(ValueError, match="needs max_tokens"):
        aggregate(LOSS_MAT, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="same shape"):
        aggregate(LOSS_MAT, MASK[:, :2], "token-mean")


# Ratios ρ = exp(logp - old): seq 0 (A = +1) [1.5, 0.5, 1.1 | pad], seq 1 (A = -1) [1.5, 0.5 | pad, pad]
# ε = 0.2, ℓ = max(-A ρ, -A clip(ρ, 0.8, 1.2)):
#   seq 0: ρ 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); ρ 0.5 -> max(-0.5, -0.8) = -0.5; ρ 1.1 -> -1.1
#   seq 1: ρ 1.5 -> max(1.5, 1.2) = 1.5;               ρ 0.5 -> max(0.5, 0.8) = 0.8 (clipped)
# token-mean (-1.2 - 0.5 - 1.1 + 1.5 + 0.8) / 5 = -0.1; seq-mean-token-mean (-2.8/3 + 2.3/2) / 2 = 0.1083333;
# seq-mean-token-sum-norm (max_tokens 4): (-2.8/4 + 2.3/4) / 2 = -0.0625.
# clip fraction 2/5; ratio mean 5.1/5 = 1.02, min 0.5, max 1.5;
# approx KL k3 = (ρ - 1) - ln ρ: 0.0945349 (1.5), 0.1931472 (0.5), 0.0046898 (1.1) -> (2·.0945349 + 2·.1931472 + .0046898)/5 = 0.1160108
def ppo_inputs(pad_value: float = 5.0) -> tuple[torch.Tensor, ...]:
    logp = torch.tensor([[LN(1.5), LN(0.5), LN(1.1), pad_value], [LN(1.5), LN(0.5), pad_value, pad_value]])
    return logp.requires_grad_(), torch.zeros(2, 4), torch.tensor([1.0, -1.0]), MASK


def test_policy_loss_hand_example() -> None:
    logp, old, adv, mask = ppo_inputs()
    out = policy_loss(logp, old, adv, mask)
    assert out.loss.item() == pytest.approx(-0.1, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.4, abs=1e-7)
    assert out.ratio_mean.item() == pytest.approx(1.02, abs=1e-6)
    assert out.ratio_min.item() == pytest.approx(0.5, abs=1e-6)
    assert out.ratio_max.item() == pytest.approx(1.5, abs=1e-6)
    assert out.approx_kl.item() == pytest.approx(0.11601079301984737, abs=1e-6)
    assert not out.clip_fraction.requires_grad and not out.approx_kl.requires_grad
    # dℓ/dlog p = -A ρ where the unclipped term is active, 0 where clipped or masked; token-mean / 5:
    #   seq 0: [0 (clipped), -0.5/5, -1.1/5, 0 (pad)]; seq 1: [+1.5/5, 0 (clipped), 0, 0]
    out.loss.backward()
    torch.testing.assert_close(
        logp.grad, torch.tensor([[0.0, -0.1, -0.22, 0.0], [0.3, 0.0, 0.0, 0.0]]), rtol=0, atol=1e-6
    )

    logp, old, adv, mask = ppo_inputs()
    assert policy_loss(logp, old, adv, mask, loss_agg="seq-mean-token-mean").loss.item() == pytest.approx(
        0.10833333333333334, abs=1e-6
    )
    got = policy_loss(logp, old, adv, mask, loss_agg="seq-mean-token-sum-norm", max_tokens=4)
    assert got.loss.item() == pytest.approx(-0.0625, abs=1e-6)
    # per-token advantages (B, T) equal to the per-sequence ones give the same loss
    per_token = adv[:, None].expand(2, 4)
    assert policy_loss(logp, old, per_token, mask).loss.item() == pytest.approx(-0.1, abs=1e-6)


def test_policy_loss_clip_higher() -> None:
    # ε_high = 0.6: ρ = 1.5 with A = +1 is no longer clipped (ℓ = -1.5); ρ = 0.5 with A = -1 still is.
    # token-mean (-1.5 - 0.5 - 1.1 + 1.5 + 0.8) / 5 = -0.16; clip fraction 1/5
    logp, old, adv, mask = ppo_inputs()
    out = policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    assert out.loss.item() == pytest.approx(-0.16, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.2, abs=1e-7)


def test_policy_loss_ignores_nan_and_inf_under_the_mask() -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        logp, old, adv, mask = ppo_inputs(pad_value=bad)
        out = policy_loss(logp, old, adv, mask)
        assert out.loss.item() == pytest.approx(-0.1, abs=1e-6)
        out.loss.backward()
        assert torch.isfinite(logp.grad).all() and logp.grad[0, 3] == 0 and logp.grad[1, 2:].eq(0).all()
    empty = policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1), torch.zeros(1, 3))
    assert empty.loss.item() == 0.0 and empty.ratio_min.item() == 1.0 and empty.ratio_max.item() == 1.0


def test_policy_loss_errors() -> None:
    logp, old, adv, mask = ppo_inputs()
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, torch.ones(3), mask)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        policy_loss(logp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(logp, old, adv, mask, clip_eps=-0.1)
    with pytest.raises(ValueError, match="unknown loss_agg"):
        policy_loss(logp, old, adv, mask, loss_agg="sum")


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_gradient_accumulation_4x1_equals_1x4(model, mode) -> None:
    # Four sequences of different lengths. Full batch: right-padded to 9. Micro-batches: each sequence
    # alone, unpadded, with the full batch's normalisers. Losses and gradients must agree.
    seqs = [SEQ, [7, 3, 11, 12, 13, 14], [4, 4, 60, 61, 62, 63, 20, 21, 22], [9, 10, 30, 31]]
    prompt = 2
    norms = {"num_seqs": 4, "max_tokens": 8}
    gen = torch.Generator().manual_seed(3)
    adv = torch.randn(4, generator=gen)
    old_shift = [torch.randn(len(s) - 1, generator=gen) * 0.1 for s in seqs]  # old log π = log π - shift

    def rows(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in batch)
        padded = [pad_right(s, width) for s in batch]
        return ids([p for p, _ in padded]), ids([m for _, m in padded])

    def loss_of(idx: list[int], num_tokens: torch.Tensor) -> torch.Tensor:
        x, m = rows([seqs[i] for i in idx])
        logp = model_token_logprobs(model, x, m)  # (b, T-1)
        resp = torch.zeros_like(logp)
        old = logp.detach().clone()
        for r, i in enumerate(idx):
            resp[r, prompt - 1 : len(seqs[i]) - 1] = 1
            old[r, : len(seqs[i]) - 1] -= old_shift[i]
        return policy_loss(logp, old, adv[idx], resp, loss_agg=mode, num_tokens=num_tokens, **norms).loss

    total_tokens = torch.tensor(float(sum(len(s) - prompt for s in seqs)))
    model.zero_grad(set_to_none=True)
    full = loss_of([0, 1, 2, 3], total_tokens)
    full.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    summed = 0.0
    for i in range(4):
        micro = loss_of([i], total_tokens)
        micro.backward()
        summed += micro.item()
    assert summed == pytest.approx(full.item(), abs=1e-6)
    for p, g in zip(model.parameters(), full_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_example() -> None:
    # log π = [0, -1, ln .5, -30], log π_ref = 0:
    #   k1 = log π - log π_ref = [0, -1, -0.6931472, -30]
    #   k3 = e^d - d - 1, d = log π_ref - log π = [0, 1, ln 2, 30 -> clamped to 20]
    #      = [0, e - 2 = 0.7182818, 2 - ln 2 - 1 = 0.3068528, e^20 - 21 -> clamped to 10]
    logp = torch.tensor([[0.0, -1.0, LN(0.5), -30.0]])
    ref = torch.zeros(1, 4)
    torch.testing.assert_close(
        kl_k1(logp, ref), torch.tensor([[0.0, -1.0, -0.6931472, -30.0]]), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        kl_k3(logp, ref), torch.tensor([[0.0, 0.7182818, 0.3068528, 10.0]]), rtol=0, atol=1e-6
    )
    # d = -30 -> clamped to -20: e^-20 + 20 - 1 = 19 -> clamped to 10; k3 is never negative
    assert kl_k3(torch.zeros(1), torch.tensor([-30.0])).item() == 10.0
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()
    # sequence sums under the mask: row 0 [0, -1, ln .5 | masked] = -1.6931472; row 1 [2, -0.5] = 1.5
    logp2 = torch.tensor([[0.0, -1.0, LN(0.5), -30.0], [2.0, -0.5, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(
        sequence_kl_k1(logp2, torch.zeros(2, 4), mask), torch.tensor([-1.6931472, 1.5]), rtol=0, atol=1e-6
    )


def test_kl_k3_gradient_pulls_towards_the_reference() -> None:
    # d k3 / d log π = -(e^d - 1) with d = log π_ref - log π: at log π = 0, log π_ref = -1,
    # d = -1 -> gradient 1 - e^-1 = 0.6321206 (positive: lowering log π lowers the loss)
    logp = torch.tensor([0.0], requires_grad=True)
    kl_k3(logp, torch.tensor([-1.0])).sum().backward()
    assert logp.grad.item() == pytest.approx(1 - math.exp(-1), abs=1e-6)


def test_kl_loss_is_aggregated_k3_and_vanishes_with_its_gradient_at_the_reference():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    from duetlm import grpo

    got = grpo.kl_loss(logp, ref, mask, "token-mean")
    d = (ref - logp.detach())[mask.bool()]
    assert torch.allclose(got, (d.exp() - d - 1).sum() / 5)  # the padded position (9.0) never counts
    same = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    zero = grpo.kl_loss(same, same.detach().clone(), torch.ones(1, 2), "seq-mean-token-mean")
    zero.backward()
    assert zero.item() == 0.0 and torch.all(same.grad == 0)
