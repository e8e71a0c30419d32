"""The fast sampling loop against HF generate, its log-probabilities, EOS handling and top-k / top-p."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from gipo.models import build_embedded_model, build_embedded_tokenizer
from gipo.rollout import (
    SamplingSettings,
    draw_tokens,
    filter_logits,
    generate,
    has_active_dropout,
    packed_linear_weights,
    prompt_sharing_supported,
    response_logprobs,
    response_mask_from_ids,
    sample_fast,
    shared_prompts,
)

PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def model():
    return build_embedded_model(build_embedded_tokenizer(), seed=3).eval()


def _queries(vocab: int, lengths=(3, 9, 1, 6, 12, 5), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (no pad or EOS inside)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(7, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def _both(model, ids, mask, settings: SamplingSettings, greedy: bool, eos: int = EOS, seed: int = 0):
    torch.manual_seed(seed)
    hf = generate(model, ids, mask, eos, PAD, SamplingSettings(**{**vars(settings), "backend": "hf"}), greedy)
    torch.manual_seed(seed)
    fast = generate(model, ids, mask, eos, PAD, SamplingSettings(**{**vars(settings), "backend": "fast"}), greedy,
                    with_logprobs=True)
    return hf, fast


def _assert_same(a, b):
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.has_eos, b.has_eos)


@pytest.mark.parametrize("stop_on_eos", [True, False])
def test_greedy_equals_hf_generate(model, stop_on_eos):
    ids, mask = _queries(model.config.vocab_size)
    hf, fast = _both(model, ids, mask, SamplingSettings(max_new_tokens=12, stop_on_eos=stop_on_eos), greedy=True)
    _assert_same(hf, fast)
    # top_k=1 sampling (what the 2-process test uses) is greedy too.
    _, top1 = _both(model, ids, mask, SamplingSettings(max_new_tokens=12, top_k=1, stop_on_eos=stop_on_eos),
                    greedy=False)
    _assert_same(hf, top1)


@pytest.mark.parametrize("settings", [
    dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(temperature=1.3, top_k=20, top_p=0.9),
])
def test_sampling_draws_the_same_tokens_as_hf_generate(model, settings):
    ids, mask = _queries(model.config.vocab_size)
    hf, fast = _both(model, ids, mask, SamplingSettings(max_new_tokens=10, **settings), greedy=False, seed=7)
    _assert_same(hf, fast)


def test_eos_ends_rows_and_masks(model):
    ids, mask = _queries(model.config.vocab_size)
    greedy = sample_fast(model, ids, mask, EOS, PAD, SamplingSettings(max_new_tokens=10), greedy=True)
    # A token that greedy decoding emits in row 0 at step 3 serves as EOS: row 0 ends there.
    eos = int(greedy.response_ids[0, 3])
    assert eos != PAD
    hf, fast = _both(model, ids, mask, SamplingSettings(max_new_tokens=10), greedy=True, eos=eos)
    _assert_same(hf, fast)
    assert fast.has_eos[0]
    first = int((fast.response_ids[0] == eos).nonzero()[0])
    assert fast.response_mask[0, :first + 1].eq(1).all() and fast.response_mask[0, first + 1:].eq(0).all()
    assert fast.response_ids[0, first + 1:].eq(PAD).all()
    for row in range(len(ids)):
        expected, has = response_mask_from_ids(fast.response_ids[row:row + 1], eos)
        assert torch.equal(fast.response_mask[row:row + 1], expected) and bool(has) == bool(fast.has_eos[row])
    assert (fast.sampled_logprobs * (1 - fast.response_mask)).eq(0).all()


def test_all_rows_ending_stop_early(model):
    ids, mask = _queries(model.config.vocab_size, lengths=(4,))
    greedy = sample_fast(model, ids, mask, EOS, PAD, SamplingSettings(max_new_tokens=10), greedy=True)
    eos = int(greedy.response_ids[0, 2])
    first = int((greedy.response_ids[0] == eos).nonzero()[0])
    hf, fast = _both(model, ids, mask, SamplingSettings(max_new_tokens=10), greedy=True, eos=eos)
    _assert_same(hf, fast)
    assert fast.response_ids.shape[1] == first + 1 and fast.has_eos.all()


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, top_k=10), dict(stop_on_eos=False)])
def test_sampled_logprobs_equal_a_fresh_forward(model, settings):
    ids, mask = _queries(model.config.vocab_size)
    settings = SamplingSettings(max_new_tokens=12, backend="fast", **settings)
    torch.manual_seed(1)
    rollout = generate(model, ids, mask, EOS, PAD, settings, with_logprobs=True)
    fresh, _ = response_logprobs(model, rollout, settings.temperature)
    torch.testing.assert_close(rollout.sampled_logprobs, fresh * rollout.response_mask, atol=1e-5, rtol=0)
    # HF generate gives them too (from one more forward), and the same.
    torch.manual_seed(1)
    hf = generate(model, ids, mask, EOS, PAD, SamplingSettings(**{**vars(settings), "backend": "hf"}),
                  with_logprobs=True)
    torch.testing.assert_close(hf.sampled_logprobs, rollout.sampled_logprobs, atol=1e-5, rtol=0)
    assert torch.equal(rollout.select(torch.tensor([2, 0])).sampled_logprobs, rollout.sampled_logprobs[[2, 0]])


def test_model_stays_in_its_mode_and_hf_fallback():
    model = build_embedded_model(build_embedded_tokenizer()).train()
    ids, mask = _queries(model.config.vocab_size)
    generate(model, ids, mask, EOS, PAD, SamplingSettings(max_new_tokens=3, backend="fast"))
    assert model.training
    with pytest.raises(ValueError, match="backend"):
        generate(model, ids, mask, EOS, PAD, SamplingSettings(max_new_tokens=3, backend="vllm"))


def test_active_dropout_detected():
    tokenizer = build_embedded_tokenizer()
    assert not has_active_dropout(build_embedded_model(tokenizer))
    model = build_embedded_model(tokenizer)
    model.config.attention_dropout = 0.1
    assert has_active_dropout(model)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert has_active_dropout(gpt2)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_packed_weights_sample_what_the_plain_product_samples(model):
    ids, mask = _queries(model.config.vocab_size)
    settings = SamplingSettings(max_new_tokens=10, backend="fast")
    torch.manual_seed(0)
    plain = sample_fast(model, ids, mask, EOS, PAD, settings, with_logprobs=True)
    with packed_linear_weights(model, rows=len(ids), min_weight_numel=0):
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all("forward" in vars(m) for m in linears)
        torch.manual_seed(0)
        packed = sample_fast(model, ids, mask, EOS, PAD, settings, with_logprobs=True)
        layer = linears[0]
        rows = torch.randn(len(ids), layer.in_features)
        many_rows = torch.randn(len(ids) + 1, layer.in_features)
        torch.testing.assert_close(layer(rows), torch.nn.functional.linear(rows, layer.weight, layer.bias))
        assert torch.equal(layer(many_rows), torch.nn.functional.linear(many_rows, layer.weight, layer.bias))
    assert not any("forward" in vars(m) for m in linears)  # the plain layers are back
    _assert_same(plain, packed)
    torch.testing.assert_close(packed.sampled_logprobs, plain.sampled_logprobs, atol=1e-5, rtol=0)


def test_top_k_top_p_on_hand_made_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0]])
    inf = -math.inf
    assert torch.equal(filter_logits(logits, top_k=2),
                       torch.tensor([[2.0, inf, inf, inf, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]]))  # ties kept
    # Row 0 probabilities: 3 -> .6364, 2 -> .2341, 1 -> .0861, 0 -> .0317, -1 -> .0117.
    assert torch.equal(filter_logits(logits[:1], top_p=0.6), torch.tensor([[inf, inf, inf, inf, 3.0]]))
    assert torch.equal(filter_logits(logits[:1], top_p=0.8), torch.tensor([[2.0, inf, inf, inf, 3.0]]))
    assert torch.equal(filter_logits(logits[:1], top_p=0.95), torch.tensor([[2.0, 1.0, inf, inf, 3.0]]))
    assert torch.equal(filter_logits(logits[:1], top_k=3, top_p=0.8), torch.tensor([[2.0, inf, inf, inf, 3.0]]))
    # k at or beyond the vocabulary keeps every token (and runs no topk).
    assert torch.equal(filter_logits(logits, top_k=5), logits) and torch.equal(filter_logits(logits, top_k=9), logits)
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)
    # The same as HF's warpers.
    hf = transformers.TopPLogitsWarper(0.8)(None, transformers.TopKLogitsWarper(3)(None, logits))
    assert torch.equal(filter_logits(logits, top_k=3, top_p=0.8), hf)


def test_ppo_reuses_sampling_logprobs_as_the_old_policys(tiny_pipeline, tmp_path):
    from gipo.config import PPOConfig, build_config
    from gipo.ppo import PPOTrainer

    config = build_config(PPOConfig, {
        "progress": False, "device": "cpu", "train_prompts_per_group": 8, "max_steps": 1, "batch_size": 8,
        "mini_batch_size": 4, "ppo_epochs": 1,
        "max_new_tokens": 6, "eval_every": 0, "policy": str(tiny_pipeline["sft"] / "final"),
        "reward_model": str(tiny_pipeline["rm"] / "final"), "generation_backend": "fast",
        "reuse_generation_logprobs": True, "fused_optimizer": True})
    trainer = PPOTrainer(config, output_dir=tmp_path / "run")
    assert trainer.collector.reuse_logprobs
    experience, _ = trainer.collector.collect(list(range(8)), 1, trainer.kl_ctl.value)
    rollout = experience.rollout
    with torch.no_grad():
        fresh, _ = response_logprobs(trainer.policy, rollout, config.temperature)
    torch.testing.assert_close(experience.old_logprobs, fresh * rollout.response_mask, atol=1e-5, rtol=0)
    trainer.train()  # and the fused optimizer steps
    plain = build_config(PPOConfig, {**config.__dict__, "generation_backend": "hf"})
    assert not PPOTrainer(plain, output_dir=tmp_path / "plain").collector.reuse_logprobs


def test_one_decoder_pass_gives_the_policys_logprobs_and_the_heads_values(model):
    """shared_critic: the log-probabilities equal a plain forward's; values and group logits equal the heads
    applied to the decoder's hidden states; the group head's objective leaves the policy untouched."""
    from gipo.models import ValueHeads, position_ids_from_mask
    from gipo.rollout import Rollout, logprobs_and_values

    torch.manual_seed(0)
    heads = ValueHeads(model.config.hidden_size, num_groups=3)
    torch.nn.init.normal_(heads.value_head.weight)
    ids, mask = _queries(model.config.vocab_size)
    rollout = generate(model, ids, mask, EOS, PAD, SamplingSettings(max_new_tokens=5))
    rollout = Rollout(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask,
                      rollout.has_eos)
    logprobs, entropy, values, group_logits = logprobs_and_values(model, heads, rollout, 0.7, with_entropy=True)
    expected_logprobs, expected_entropy = response_logprobs(model, rollout, 0.7, with_entropy=True)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    attention = rollout.attention_mask
    hidden = model.model(input_ids=rollout.sequences, attention_mask=attention,
                         position_ids=position_ids_from_mask(attention)).last_hidden_state
    all_values, expected_groups = heads.read(hidden, attention)
    width = rollout.response_ids.shape[1]
    torch.testing.assert_close(values, all_values[:, -width - 1:-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(group_logits, expected_groups, rtol=1e-5, atol=1e-5)
    model.zero_grad(set_to_none=True)
    group_logits.sum().backward()
    assert all(p.grad is None for p in model.parameters()) and heads.group_head.weight.grad is not None
    values.sum().backward()  # the value loss does reach the shared decoder
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("lora", [False, True])
def test_heads_read_the_sampling_states_as_they_read_a_fresh_decoder_pass(model, lora):
    """reuse_generation_logprobs with shared_critic: values and group logits from the hidden states recorded
    while sampling equal those of one more decoder pass, for rows that end early (EOS) and rows that don't."""
    import copy

    from gipo.lora import apply_lora
    from gipo.models import ValueHeads
    from gipo.rollout import logprobs_and_values, sampled_values

    policy = model
    if lora:
        policy = apply_lora(copy.deepcopy(model), 4, 8, 0.0, "q_proj,v_proj")
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(weight, std=0.5)  # adapters that change the hidden states
    torch.manual_seed(0)
    heads = ValueHeads(model.config.hidden_size, num_groups=3)
    torch.nn.init.normal_(heads.value_head.weight)
    ids, mask = _queries(model.config.vocab_size)
    settings = SamplingSettings(max_new_tokens=10, backend="fast")
    torch.manual_seed(1)
    free = generate(policy, ids, mask, EOS, PAD, SamplingSettings(**{**vars(settings), "stop_on_eos": False}))
    eos = int(free.response_ids[0, 3])  # a token that ends row 0 early, and maybe others
    torch.manual_seed(1)
    rollout = generate(policy, ids, mask, eos, PAD, settings, with_logprobs=True, with_states=True)
    assert (rollout.lengths < rollout.response_ids.shape[1]).any() and rollout.has_eos.any()
    assert rollout.sampled_states.shape == (*rollout.response_ids.shape[:1], rollout.response_ids.shape[1] + 1,
                                            model.config.hidden_size)
    values, group_logits = sampled_values(heads, rollout)
    with torch.no_grad():
        logprobs, _, expected_values, expected_groups = logprobs_and_values(policy, heads, rollout, 1.0)
    torch.testing.assert_close(values * rollout.response_mask, expected_values * rollout.response_mask,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(group_logits, expected_groups, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rollout.sampled_logprobs, logprobs * rollout.response_mask, rtol=1e-5, atol=1e-5)
    subset = rollout.select(torch.tensor([3, 1]))
    assert torch.equal(subset.sampled_states, rollout.sampled_states[[3, 1]])
    with pytest.raises(ValueError, match="fast sampling loop"):
        generate(policy, ids, mask, eos, PAD, SamplingSettings(backend="hf"), with_states=True)


def test_ppo_with_a_shared_critic_reads_old_values_from_sampling(tiny_pipeline, tmp_path):
    from gipo.config import PPOConfig, build_config
    from gipo.ppo import PPOTrainer

    def experience(reuse: bool):
        config = build_config(PPOConfig, {
            "progress": False, "device": "cpu", "train_prompts_per_group": 8, "max_steps": 1, "batch_size": 8,
            "mini_batch_size": 4, "max_new_tokens": 6, "eval_every": 0, "policy": str(tiny_pipeline["sft"] / "final"), "method": "gipo",
            "reward_model": str(tiny_pipeline["rm"] / "final"), "generation_backend": "fast",
            "shared_critic": True, "reuse_generation_logprobs": reuse})
        trainer = PPOTrainer(config, output_dir=tmp_path / f"run-{reuse}")
        assert trainer.collector.reuse_logprobs == reuse
        torch.manual_seed(5)
        return trainer.collector.collect(list(range(8)), 1, trainer.kl_ctl.value)

    (reused, reused_metrics), (fresh, fresh_metrics) = experience(True), experience(False)
    assert reused.rollout.sampled_states is not None and fresh.rollout.sampled_states is None
    assert torch.equal(reused.rollout.response_ids, fresh.rollout.response_ids)
    mask = fresh.rollout.response_mask  # past a row's end the sampled log-probabilities are 0, a forward's are not
    for name in ("old_logprobs", "old_values", "advantages", "returns"):
        torch.testing.assert_close(getattr(reused, name) * mask, getattr(fresh, name) * mask, rtol=1e-4, atol=1e-5)
    for key in ("groups/r_var", "objective/kl"):
        assert reused_metrics[key] == pytest.approx(fresh_metrics[key], rel=1e-4, abs=1e-6)


def _repeated_prompts(vocab: int, samples: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Four prompts of different lengths, each ``samples`` times, interleaved (as a shuffled mini-batch holds them)."""
    ids, mask = _queries(vocab, lengths=(3, 9, 1, 6))
    order = torch.arange(4).repeat(samples)
    return ids[order], mask[order]


def test_shared_prompts_finds_each_distinct_prompt_once():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]])
    prompts, prompt_mask, which = shared_prompts(ids, mask)
    assert len(prompts) == 2
    assert torch.equal(prompts[which], ids) and torch.equal(prompt_mask[which], mask)
    # Equal ids under a different mask are a different prompt (a pad id that is also a real token).
    assert shared_prompts(ids[:2], mask[:2]) is None
    assert shared_prompts(torch.tensor([[0, 5], [0, 5]]), torch.tensor([[0, 1], [1, 1]])) is None


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_shared_prompt_logprobs_and_gradients_equal_the_plain_forward(entropy_grad):
    model = build_embedded_model(build_embedded_tokenizer(), seed=4).train()
    ids, mask = _repeated_prompts(model.config.vocab_size)
    torch.manual_seed(2)
    rollout = generate(model, ids, mask, EOS, PAD, SamplingSettings(max_new_tokens=8, backend="fast"))
    assert not rollout.response_mask.all()  # some rows ended early: padding inside the responses is covered
    prompt_forward_rows = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: prompt_forward_rows.append(args[0].shape))
    results = []
    for share in (False, True):
        prompt_forward_rows.clear()
        model.zero_grad()
        logprobs, entropy = response_logprobs(model, rollout, 0.8, with_entropy=True, entropy_grad=entropy_grad,
                                              share_prompts=share)
        loss = (logprobs * rollout.response_mask).sum() + (entropy.sum() if entropy_grad else 0)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results.append((logprobs * rollout.response_mask, entropy * rollout.response_mask, grads,
                        list(prompt_forward_rows)))
    hook.remove()
    (plain_lp, plain_ent, plain_grads, plain_rows), (lp, ent, grads, rows) = results
    assert [shape[0] for shape in plain_rows] == [12]
    assert [shape[0] for shape in rows] == [4, 12]  # four distinct prompts, then every response
    assert rows[1][1] == rollout.response_ids.shape[1] - 1  # the responses' last token predicts nothing
    torch.testing.assert_close(lp, plain_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, plain_ent, atol=1e-5, rtol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prompt_prefill_samples_what_the_plain_prefill_samples(model):
    ids, mask = _repeated_prompts(model.config.vocab_size)
    rollouts = []
    for share in (False, True):
        torch.manual_seed(5)
        settings = SamplingSettings(max_new_tokens=10, backend="fast", share_prompts=share)
        rollouts.append(generate(model, ids, mask, EOS, PAD, settings, with_logprobs=True, with_states=True))
    plain, shared = rollouts
    _assert_same(plain, shared)
    torch.testing.assert_close(shared.sampled_logprobs, plain.sampled_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.sampled_states, plain.sampled_states, atol=1e-5, rtol=0)


def test_prompt_sharing_is_off_where_one_forward_per_backward_is_expected():
    model = build_embedded_model(build_embedded_tokenizer())
    assert prompt_sharing_supported(model)
    model.config.attention_dropout = 0.1
    assert not prompt_sharing_supported(model.train())  # the samples would share the prompt's dropout
    assert prompt_sharing_supported(model.eval())  # a frozen reference's forward is not random
    model.config.attention_dropout = 0.0
    model.gradient_checkpointing_enable()
    assert not prompt_sharing_supported(model)
    wrapped = torch.nn.Module()
    wrapped.module = build_embedded_model(build_embedded_tokenizer())  # as DDP and DeepSpeed hold a model
    assert not prompt_sharing_supported(wrapped)


def test_inverse_cdf_draws_on_hand_computed_cases():
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.0, 0.5, 0.5], [0.25, 0.0, 0.75]])
    for uniform, expected in [((0.05, 0.0, 0.0), (0, 1, 0)), ((0.15, 0.49, 0.25), (1, 1, 2)),
                              ((0.31, 0.5, 0.2499), (2, 2, 0)), ((0.999, 0.999, 0.999), (2, 2, 2))]:
        drawn = draw_tokens(probs, torch.tensor(uniform, dtype=torch.float64)[:, None])
        assert drawn.tolist() == list(expected), uniform
    # Rows that do not sum to 1 (float rounding) are scaled by their own total.
    assert draw_tokens(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.6]], dtype=torch.float64)).item() == 1


def test_inverse_cdf_sampling_draws_the_model_distribution(model):
    """The first token's frequencies over many samples of one prompt match the model's probabilities."""
    ids, mask = _queries(model.config.vocab_size, lengths=(4,))
    settings = SamplingSettings(max_new_tokens=1, backend="fast", draws="inverse_cdf", top_k=5)
    torch.manual_seed(0)
    rollout = generate(model, ids.repeat(20_000, 1), mask.repeat(20_000, 1), EOS, PAD, settings)
    with torch.no_grad():
        scores = filter_logits(model(input_ids=ids, attention_mask=mask).logits[0, -1], top_k=5)
    expected = torch.softmax(scores, dim=-1)
    counts = torch.bincount(rollout.response_ids[:, 0], minlength=len(expected)).double()
    assert set(counts.nonzero().squeeze(1).tolist()) <= set(expected.nonzero().squeeze(1).tolist())
    torch.testing.assert_close(counts / counts.sum(), expected.double(), atol=0.015, rtol=0)
