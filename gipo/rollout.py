"""Rollouts: sample responses, then score them (log-probabilities, values, reward-model scores).

Layout: a query is left-padded to width Tq, its response right-padded to width Tr, and the model
sees ``[query | response]``. Position ids skip the left padding. Logits at positions Tq-1 .. Tq+Tr-2
predict the response tokens, so only those are computed (``logits_to_keep``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel

from gipo.losses import entropy_from_logits, logprobs_from_logits
from gipo.models import position_ids_from_mask


@dataclass
class SamplingSettings:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_on_eos: bool = True


@dataclass
class Rollout:
    query_ids: torch.Tensor  # (B, Tq), left-padded
    query_mask: torch.Tensor  # (B, Tq)
    response_ids: torch.Tensor  # (B, Tr), right-padded
    response_mask: torch.Tensor  # (B, Tr) float, 1 up to and including EOS
    has_eos: torch.Tensor  # (B,) bool

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
                       self.response_mask[index], self.has_eos[index])


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
             pad_id: int, settings: SamplingSettings, greedy: bool = False) -> Rollout:
    config = GenerationConfig(
        do_sample=not greedy, max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature if not greedy else None,
        top_k=settings.top_k or None if not greedy else None,
        top_p=settings.top_p if settings.top_p < 1.0 and not greedy else None,
        eos_token_id=eos_id if settings.stop_on_eos else None, pad_token_id=pad_id,
    )
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config)
    model.train(was_training)
    response_ids = out[:, query_ids.shape[1]:]
    mask, has_eos = response_mask_from_ids(response_ids, eos_id if settings.stop_on_eos else None)
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return Rollout(query_ids, query_mask, response_ids, mask, has_eos)


def response_logprobs(model: PreTrainedModel, rollout: Rollout, temperature: float, with_entropy: bool = False,
                      entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities (B, Tr) of the response tokens under ``model`` (and their entropy, with a
    gradient only when ``entropy_grad``: a logged entropy needs no graph over the vocabulary)."""
    width = rollout.response_ids.shape[1]
    attention_mask = rollout.attention_mask
    logits = model(input_ids=rollout.sequences, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), logits_to_keep=width + 1).logits[:, :-1]
    logits = logits.float() / temperature
    logprobs = logprobs_from_logits(logits, rollout.response_ids)
    if not with_entropy:
        return logprobs, None
    if entropy_grad:
        return logprobs, entropy_from_logits(logits)
    with torch.no_grad():
        return logprobs, entropy_from_logits(logits)


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
    logits = reward_model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask)).logits
    return logits.squeeze(-1).float()
