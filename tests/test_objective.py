"""duetlm.objective: λ dual ascent, M's DUET reward, marginal-utility baselines, the baselines' rewards,
and the algorithm.md §2.1 property (a per-prompt baseline cancels under per-prompt GRPO)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duetlm.grpo import compute_advantages, group_advantages
from duetlm.objective import (
    LAMBDA_SCHEDULES,
    LENGTH_MEASURES,
    MU_BASELINES,
    REWARD_FUNCTIONS,
    LambdaController,
    compute_reward,
    duet_reward,
    lgrpo_reward,
    marginal_utility_baseline,
    select_lengths,
    single_model_reward,
    thinkprune_limit,
    thinkprune_reward,
)

torch.set_num_threads(1)

PROPS = settings(derandomize=True, deadline=None, max_examples=150)


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def ids(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def close(a: torch.Tensor, b, atol: float = 1e-12) -> None:
    torch.testing.assert_close(a, b if isinstance(b, torch.Tensor) else t64(b), rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------
# LambdaController: λ ← clip(λ + η (mean_L / B − 1), 0, λ_max)
# ---------------------------------------------------------------------------------------------------


def run(ctrl: LambdaController, means: list[float]) -> list[float]:
    return [ctrl.update(m) for m in means]


def test_lambda_reference_defaults_trajectory_and_projection_at_zero() -> None:
    # η = 0.01, B = 1000, λ_max = 1, λ_0 = 0:
    #   3000: 0 + .01·(3 − 1)       = 0.02
    #   2000: .02 + .01·(2 − 1)     = 0.03
    #    500: .03 + .01·(.5 − 1)    = 0.025
    #    100: .025 + .01·(.1 − 1)   = 0.016
    #      0: .016 − .01            = 0.006
    #      0: .006 − .01 = −.004    -> projected to 0
    #   1000: 0 + 0                 = 0
    #   1500: 0 + .01·.5            = 0.005
    ctrl = LambdaController()
    assert ctrl.value == 0.0
    got = run(ctrl, [3000, 2000, 500, 100, 0, 0, 1000, 1500])
    assert got == pytest.approx([0.02, 0.03, 0.025, 0.016, 0.006, 0.0, 0.0, 0.005], abs=1e-12)
    assert ctrl.value == got[-1] and ctrl.num_updates == 8
    assert got[5] == 0.0  # exactly 0, not −0.004


def test_lambda_clips_at_max_value() -> None:
    # η = 0.5, B = 100, λ_max = 1:
    #   500: 0 + .5·(5 − 1) = 2 -> 1;  300: 1 + .5·2 = 2 -> 1;  0: 1 − .5 = .5;  0: 0;  0: −.5 -> 0
    ctrl = LambdaController(step_size=0.5, bound=100, max_value=1.0)
    assert run(ctrl, [500, 300, 0, 0, 0]) == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0], abs=1e-12)


def test_lambda_without_upper_clip_is_still_projected_at_zero() -> None:
    # max_value None: 500: 2;  500: 4;  0: 3.5;  then eight steps of −.5 -> −0.5 -> 0
    ctrl = LambdaController(step_size=0.5, bound=100, max_value=None)
    assert run(ctrl, [500, 500, 0]) == pytest.approx([2.0, 4.0, 3.5], abs=1e-12)
    assert run(ctrl, [0] * 8)[-1] == 0.0


def test_lambda_constant_schedule_never_moves() -> None:
    ctrl = LambdaController(init=0.3, schedule="constant")
    assert run(ctrl, [5000, 0, 1e9, 1000]) == [0.3, 0.3, 0.3, 0.3]
    assert ctrl.value == 0.3 and ctrl.num_updates == 4
    # the constant schedule does not care about max_value (λ is never clipped there)
    assert LambdaController(init=2.0, max_value=1.0, schedule="constant").update(0) == 2.0


def test_lambda_state_round_trip() -> None:
    a = LambdaController(step_size=0.05, bound=500)
    run(a, [900, 1200, 100])  # .04, .04 + .07 = .11, .11 − .04 = .07
    assert a.value == pytest.approx(0.07, abs=1e-12)
    state = json.loads(json.dumps(a.state_dict()))  # plain numbers: survives JSON (and torch.save)
    assert state == {"value": a.value, "num_updates": 3}
    b = LambdaController(step_size=0.05, bound=500)
    b.load_state_dict(state)
    assert (b.value, b.num_updates) == (a.value, 3)
    assert run(b, [2000, 0]) == run(a, [2000, 0])
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"value": 0.1})
    with pytest.raises(ValueError, match=">= 0"):
        b.load_state_dict({"value": -1.0, "num_updates": 0})


def test_lambda_validation() -> None:
    assert LAMBDA_SCHEDULES == ("adaptive", "constant")
    with pytest.raises(ValueError, match="unknown lambda schedule 'linear'; valid: adaptive, constant"):
        LambdaController(schedule="linear")
    with pytest.raises(ValueError, match="init"):
        LambdaController(init=-0.1)
    with pytest.raises(ValueError, match="step_size"):
        LambdaController(step_size=-1)
    with pytest.raises(ValueError, match="bound"):
        LambdaController(bound=0)
    with pytest.raises(ValueError, match="max_value"):
        LambdaController(max_value=-1)
    with pytest.raises(ValueError, match="exceeds max_value"):
        LambdaController(init=2.0, max_value=1.0)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="mean_length"):
            LambdaController().update(bad)


# ---------------------------------------------------------------------------------------------------
# M's reward R_i = s_i − b_i − λ L_i / B − β Σ (log π_old − log π_ref)
# ---------------------------------------------------------------------------------------------------


def test_duet_reward_hand_example() -> None:
    # s = [1, .5, .25, 0], b = [.5, .5, .25, 0], L = [100, 500, 1000, 0], λ = .2, B = 1000:
    #   λ L / B = [.02, .1, .2, 0]  ->  R = [1 − .5 − .02, .5 − .5 − .1, .25 − .25 − .2, 0] = [.48, −.1, −.2, 0]
    s, b, L = t64([1, 0.5, 0.25, 0]), t64([0.5, 0.5, 0.25, 0]), ids([100, 500, 1000, 0])
    close(duet_reward(s, b, L, lam=0.2, budget=1000), [0.48, -0.1, -0.2, 0.0], atol=1e-15)
    # with KL: kl_sum = [1, 2, −1, 0], β = .1 subtracts [.1, .2, −.1, 0] -> [.38, −.3, −.1, 0]
    got = duet_reward(s, b, L, lam=0.2, budget=1000, kl_sum=t64([1, 2, -1, 0]), beta=0.1)
    close(got, [0.38, -0.3, -0.1, 0.0], atol=1e-15)
    # λ = 0 and b = 0: the reward is the guided success itself; integer successes become floats
    out = duet_reward(ids([1, 0]), torch.zeros(2), ids([7, 9]), lam=0.0, budget=10)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0]


def test_duet_reward_errors() -> None:
    s = t64([1.0])
    with pytest.raises(ValueError, match="kl_sum"):
        duet_reward(s, s, s, lam=0.1, budget=10, beta=0.001)
    with pytest.raises(ValueError, match="budget"):
        duet_reward(s, s, s, lam=0.1, budget=0)
    with pytest.raises(ValueError, match="lambda"):
        duet_reward(s, s, s, lam=-0.1, budget=10)


def test_marginal_utility_baselines() -> None:
    assert MU_BASELINES == ("per_rollout", "per_prompt", "none")
    groups = ids([0, 0, 1, 1, 1])
    per_rollout = t64([0.25, 0.5, 0.0, 1.0, 0.75])
    per_prompt = t64([0.25, 0.75])  # prompt 0, prompt 1
    close(marginal_utility_baseline("per_rollout", groups, per_rollout=per_rollout), per_rollout)
    close(
        marginal_utility_baseline("per_prompt", groups, per_prompt=per_prompt), [0.25, 0.25, 0.75, 0.75, 0.75]
    )
    none = marginal_utility_baseline("none", groups, per_rollout=per_rollout)
    assert torch.equal(none, torch.zeros(5, dtype=torch.float64))
    assert marginal_utility_baseline("none", groups).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown mu_baseline 'mean'; valid: per_rollout, per_prompt, none"):
        marginal_utility_baseline("mean", groups)
    with pytest.raises(ValueError, match="needs per_rollout"):
        marginal_utility_baseline("per_rollout", groups, per_prompt=per_prompt)
    with pytest.raises(ValueError, match="needs per_prompt"):
        marginal_utility_baseline("per_prompt", groups, per_rollout=per_rollout)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        marginal_utility_baseline("per_rollout", groups, per_rollout=per_prompt)


def test_select_lengths() -> None:
    assert LENGTH_MEASURES == ("response", "signal")
    response, signal = ids([12, 30]), ids([11, 28])
    assert select_lengths("response", response, signal) is response
    assert select_lengths("signal", response, signal) is signal
    with pytest.raises(ValueError, match="unknown length_measure 'chars'; valid: response, signal"):
        select_lengths("chars", response, signal)


# ---------------------------------------------------------------------------------------------------
# algorithm.md §2.1: per-prompt b cancels under per-prompt GRPO (and `batch`), not under `global`
# ---------------------------------------------------------------------------------------------------


def test_section_2_1_by_hand() -> None:
    # One prompt, 4 rollouts, every guided success 1, L = [100, 200, 300, 400], λ = .1, B = 1000:
    #   R (b = 0) = [.99, .98, .97, .96]; centred [.015, .005, −.005, −.015];
    #   unbiased std sqrt(.0005/3) = .0129099 -> A = [1.161805, .387268, −.387268, −1.161805]:
    #   the length term alone becomes an order-one advantage (cpu-facts.md's collapse).
    groups = ids([0, 0, 0, 0])
    s, L = t64([1, 1, 1, 1]), ids([100, 200, 300, 400])
    expected = [1.161805010833055, 0.3872683369443517, -0.3872683369443517, -1.161805010833055]
    none = duet_reward(s, marginal_utility_baseline("none", groups, per_prompt=t64([0.5])), L, 0.1, 1000)
    close(group_advantages(none, groups), expected)
    # per_prompt b = .5: the same advantages
    pp = duet_reward(s, marginal_utility_baseline("per_prompt", groups, per_prompt=t64([0.5])), L, 0.1, 1000)
    close(group_advantages(pp, groups), expected)
    # per_rollout b = [.75, .25, .5, .5] (noisy estimates of the same .5): R = [.24, .73, .47, .46],
    # centred [−.235, .255, −.005, −.015], std sqrt(.1205/3) = .2004162
    #   -> A = [−1.172554, 1.272346, −.024948, −.074844]: the noise now outweighs the length term
    b = marginal_utility_baseline("per_rollout", groups, per_rollout=t64([0.75, 0.25, 0.5, 0.5]))
    close(
        group_advantages(duet_reward(s, b, L, 0.1, 1000), groups),
        [-1.1725538560145838, 1.27234567354774, -0.02494795438328904, -0.07484386314986685],
    )

    # Two prompts where everything ties: grpo gives 0 with or without b; global sees b.
    #   R (b = 0) = .99 everywhere -> global 0. b = [.25, .75] per prompt -> R = [.74, .74, .24, .24],
    #   centred ±.25, std sqrt(4·.0625/3) = .2886751 -> ±.25/(.2886751 + 1e-6) = ±.8660224
    groups = ids([0, 0, 1, 1])
    s, L = t64([1, 1, 1, 1]), ids([100, 100, 100, 100])
    r_none = duet_reward(s, torch.zeros(4, dtype=torch.float64), L, 0.1, 1000)
    r_pp = duet_reward(
        s, marginal_utility_baseline("per_prompt", groups, per_prompt=t64([0.25, 0.75])), L, 0.1, 1000
    )
    for r in (r_none, r_pp):
        assert torch.equal(compute_advantages("grpo", r, groups), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(compute_advantages("global", r_none, groups), torch.zeros(4, dtype=torch.float64))
    a = 0.8660224037948311
    close(compute_advantages("global", r_pp, groups), [a, a, -a, -a])


@st.composite
def duet_batches(draw):
    num_prompts = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(1, 6), min_size=num_prompts, max_size=num_prompts))
    n = sum(sizes)
    groups = [g for g, k in enumerate(sizes) for _ in range(k)]
    quarters = st.integers(0, 4).map(lambda k: k / 4)  # successes over n_m = 4 samples
    success = draw(st.lists(quarters, min_size=n, max_size=n))
    lengths = draw(st.lists(st.integers(0, 3000), min_size=n, max_size=n))
    per_prompt = draw(st.lists(quarters, min_size=num_prompts, max_size=num_prompts))
    lam = draw(st.floats(0.0, 1.0))
    return ids(groups), t64(success), ids(lengths), t64(per_prompt), lam


def rewards_for(mode: str, groups, success, lengths, per_prompt, lam) -> torch.Tensor:
    b = marginal_utility_baseline(mode, groups, per_prompt=per_prompt)
    return duet_reward(success, b, lengths, lam=lam, budget=1000)


@PROPS
@given(duet_batches(), st.booleans())
def test_per_prompt_baseline_is_invisible_to_grpo_and_batch(batch, norm_std) -> None:
    groups, success, lengths, per_prompt, lam = batch
    r_none = rewards_for("none", groups, success, lengths, per_prompt, lam)
    r_pp = rewards_for("per_prompt", groups, success, lengths, per_prompt, lam)
    for name in ("grpo", "batch"):
        close(
            compute_advantages(name, r_pp, groups, norm_std),
            compute_advantages(name, r_none, groups, norm_std),
            atol=1e-9,
        )


@PROPS
@given(duet_batches())
def test_per_prompt_baseline_shifts_global_advantages(batch) -> None:
    # centring over the batch: A_pp = A_none − (b − mean b) exactly, so b matters whenever it varies
    groups, success, lengths, per_prompt, lam = batch
    r_none = rewards_for("none", groups, success, lengths, per_prompt, lam)
    r_pp = rewards_for("per_prompt", groups, success, lengths, per_prompt, lam)
    b = per_prompt[groups]
    a_none = compute_advantages("global", r_none, groups, norm_std=False)
    a_pp = compute_advantages("global", r_pp, groups, norm_std=False)
    close(a_pp, a_none - (b - b.mean()), atol=1e-12)
    if b.unique().numel() > 1:
        assert (a_pp - a_none).abs().max() >= 0.125  # b on a 1/4 grid: max |b - mean b| >= 1/8


# ---------------------------------------------------------------------------------------------------
# Baselines' rewards (paper Appendix D, algorithm.md §5)
# ---------------------------------------------------------------------------------------------------


def test_single_model_reward() -> None:
    # r − λ L / B with λ = .5, B = 1000: [1 − .1, 0 − .025, 1 − .75] = [.9, −.025, .25]
    got = single_model_reward(t64([1, 0, 1]), ids([200, 50, 1500]), lam=0.5, budget=1000)
    close(got, [0.9, -0.025, 0.25], atol=1e-15)
    # β Σ k1 = .01·[10, 0, −5] -> [.8, −.025, .3]
    got = single_model_reward(
        t64([1, 0, 1]), ids([200, 50, 1500]), 0.5, 1000, kl_sum=t64([10, 0, -5]), beta=0.01
    )
    close(got, [0.8, -0.025, 0.3], atol=1e-15)


def test_thinkprune_limit_schedule() -> None:
    # 8000 for steps 0-19, −1000 every 20 steps, floor 1000 from step 140 on
    steps = [0, 19, 20, 39, 40, 119, 120, 139, 140, 1000]
    assert [thinkprune_limit(s) for s in steps] == [
        8000,
        8000,
        7000,
        7000,
        6000,
        3000,
        2000,
        2000,
        1000,
        1000,
    ]
    # start 100, step 30 every 2 steps, floor 20: 100, 100, 70, 70, 40, 40, 20 (10 floored), 20
    assert [thinkprune_limit(s, start=100, step_size=30, every=2, floor=20) for s in range(8)] == [
        100,
        100,
        70,
        70,
        40,
        40,
        20,
        20,
    ]
    for bad in ({"step": -1}, {"step": 0, "every": 0}, {"step": 0, "floor": 9000}):
        with pytest.raises(ValueError):
            thinkprune_limit(**bad)


def test_thinkprune_reward() -> None:
    # limit 2000: [correct, 100 tok] -> 1; [correct, 3000] -> 0; [wrong, 100] -> 0; [correct, exactly 2000] -> 1
    got = thinkprune_reward(t64([1, 1, 0, 1]), ids([100, 3000, 100, 2000]), limit=2000)
    assert got.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_lgrpo_reward() -> None:
    # group 4 (interleaved with the others): correct [1, 1, 0, 1], L [100, 400, 800, 200];
    #   longest *correct* = 400 (the 800 is wrong) -> [1 − 100/400, 1 − 400/400, 0, 1 − 200/400] = [.75, 0, 0, .5]
    # group 1: all wrong -> [0, 0];  group 7: one correct response (the longest of its group) -> 0
    groups = ids([4, 1, 4, 7, 4, 1, 4])
    correct = t64([1, 0, 1, 1, 0, 0, 1])
    lengths = ids([100, 900, 400, 50, 800, 10, 200])
    close(lgrpo_reward(correct, lengths, groups), [0.75, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5], atol=1e-15)


def test_compute_reward_dispatch() -> None:
    assert set(REWARD_FUNCTIONS) == {"duet", "single", "thinkprune", "lgrpo"}
    groups = ids([0, 0, 1, 1])
    correct, lengths = t64([1, 0, 1, 1]), ids([100, 300, 2000, 500])
    kw = {"success": correct, "lengths": lengths, "group_ids": groups}
    b = t64([0.5, 0.5, 0, 0])
    close(
        compute_reward("duet", **kw, lam=0.2, budget=1000, mu_baseline=b),
        duet_reward(correct, b, lengths, 0.2, 1000),
    )
    close(
        compute_reward("single", **kw, lam=0.2, budget=1000), single_model_reward(correct, lengths, 0.2, 1000)
    )
    close(compute_reward("thinkprune", **kw, limit=1000), [1.0, 0.0, 0.0, 1.0])
    close(compute_reward("lgrpo", **kw), [0.0, 0.0, 0.0, 0.75])  # group 1: 1 − 500/2000
    with pytest.raises(ValueError, match="unknown reward mode 'dpo'; valid: duet, single, thinkprune, lgrpo"):
        compute_reward("dpo", **kw)
    with pytest.raises(ValueError, match="needs mu_baseline"):
        compute_reward("duet", **kw)
    with pytest.raises(ValueError, match="needs lam"):
        compute_reward("duet", **kw, mu_baseline=b)
    with pytest.raises(ValueError, match="needs lam"):
        compute_reward("single", **kw, lam=0.1)
    with pytest.raises(ValueError, match="needs limit"):
        compute_reward("thinkprune", **kw)
