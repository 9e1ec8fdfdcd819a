"""Class-wise learnable prompts spliced into open_clip's text tower (CoOp's trick, per class).

Each class gets its own ``n_ctx`` context vectors in token-embedding space, placed between the
start token and the class name: ``[SOT] v1 .. vM <class name> . [EOT]``. Only the context is
trained; the text tower stays frozen and runs exactly as ``CLIP.encode_text`` does, from the
embeddings on, so a context equal to the embeddings of "a photo of a" reproduces the
hand-crafted prompt's feature exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from open_clip.model import text_global_pool
from torch import nn

from worker.cbpt.errors import EngineError

Tokenizer = Callable[[list[str]], torch.Tensor]
DEFAULT_CONTEXT_INIT = "a photo of a"


class PromptTooLongError(EngineError):
    """A class's prompt (the context and its name) does not fit the model's text context."""

    code = "PROMPT_TOO_LONG"


def prompt_tokens(tokenizer: Tokenizer, class_names: Sequence[str], n_ctx: int) -> torch.Tensor:
    """Token ids ``(C, L)`` of each class's ``[SOT] X .. X <class name> . [EOT]`` prompt.

    Cheap, so that a job can check its prompts fit while loading, not after the inversion.
    """
    placeholder = " ".join(["X"] * n_ctx)
    tokens = tokenizer([f"{placeholder} {name}." for name in class_names])  # (C, L)
    context_length = tokens.shape[1]
    eot = tokens.argmax(dim=-1)
    # The tokenizer truncates silently and puts EOT last; an EOT there means no room was left.
    if int(eot.max()) >= context_length - 1:
        longest = class_names[int(eot.argmax())]
        raise PromptTooLongError(
            f"prompt for {longest!r} overflows the text context of {context_length} tokens "
            f"(with n_ctx={n_ctx} context tokens); shorten the class name or lower n_ctx"
        )
    return tokens


class ClassPrompts(nn.Module):
    """The learnable context ``(C, M, width)`` and the fixed tokens around it."""

    tokens: torch.Tensor  # (C, L) token ids: where EOT sits
    prefix: torch.Tensor  # (C, 1, width) SOT embedding
    suffix: torch.Tensor  # (C, L - 1 - M, width) class name, ".", EOT, padding

    def __init__(
        self,
        model: open_clip.CLIP,
        tokenizer: Tokenizer,
        class_names: Sequence[str],
        *,
        n_ctx: int = 4,
        init: str | None = DEFAULT_CONTEXT_INIT,
        seed: int = 0,
    ) -> None:
        super().__init__()
        device = model.token_embedding.weight.device
        tokens = prompt_tokens(tokenizer, class_names, n_ctx).to(device)  # (C, L)
        with torch.no_grad():
            embedded = model.token_embedding(tokens)  # (C, L, width)
            context = self._initial_context(model, tokenizer, len(class_names), n_ctx, init, seed)
        self.context = nn.Parameter(context)  # (C, M, width)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)  # SOT
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)
        self.n_ctx = n_ctx

    @staticmethod
    def _initial_context(
        model: open_clip.CLIP,
        tokenizer: Tokenizer,
        n_classes: int,
        n_ctx: int,
        init: str | None,
        seed: int,
    ) -> torch.Tensor:
        width = model.token_embedding.weight.shape[1]
        if init is None:
            generator = torch.Generator().manual_seed(seed)
            device = model.token_embedding.weight.device
            return (torch.randn(n_classes, n_ctx, width, generator=generator) * 0.02).to(device)
        init_tokens = tokenizer([init])[0].to(model.token_embedding.weight.device)
        n_words = int(init_tokens.argmax()) - 1  # between SOT and EOT
        if n_words != n_ctx:
            raise ValueError(f"context init {init!r} is {n_words} tokens, not n_ctx={n_ctx}")
        vectors: torch.Tensor = model.token_embedding(init_tokens[None])[0, 1 : 1 + n_ctx]
        return vectors.detach().float().unsqueeze(0).repeat(n_classes, 1, 1)

    def forward(self) -> torch.Tensor:
        """Prompt embeddings ``(C, L, width)``: SOT, context, class name, EOT and padding."""
        prefix, suffix = self.prefix, self.suffix
        return torch.cat([prefix, self.context.to(prefix.dtype), suffix], dim=1)


def encode_prompts(
    model: open_clip.CLIP, embeddings: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """L2-normalised text features ``(C, D)`` from prompt embeddings, as ``encode_text`` does.

    Under a causal mask a position sees only those before it, so the positions after the last
    pooled token change nothing: they are cut, which makes each tuning step several times
    cheaper (a 77-token context holds prompts of about ten tokens).
    """
    length = pooled_length(model, tokens)
    embeddings, tokens = embeddings[:, :length], tokens[:, :length]
    attn_mask = model.attn_mask
    if attn_mask is not None:
        attn_mask = attn_mask[:length, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(
        x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
    )
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return F.normalize(x.float(), dim=-1)


@torch.no_grad()
def prompt_class_embeddings(model: open_clip.CLIP, prompts: ClassPrompts) -> torch.Tensor:
    """The class embeddings ``(C, D)`` that ``prompts`` give, in float32 even under autocast:
    the head a job ships must be what deploying its prompts computes."""
    with torch.autocast(device_type=prompts.context.device.type, enabled=False):
        return encode_prompts(model, prompts(), prompts.tokens)


def pooled_length(model: open_clip.CLIP, tokens: torch.Tensor) -> int:
    """How many leading positions the pooled text feature depends on: all of them, unless the
    text tower is causal and pools a token at a known place (EOT or the first)."""
    full = tokens.shape[1]
    if not _is_causal(model.attn_mask, full):
        return full
    pool_type = model.text_pool_type
    if pool_type == "argmax":
        return int(tokens.argmax(dim=-1).max()) + 1
    eos = getattr(model, "text_eos_id", None)
    if pool_type == "eos" and eos is not None and bool((tokens == eos).any(dim=1).all()):
        return int((tokens == eos).int().argmax(dim=-1).max()) + 1
    if pool_type == "first":
        return 1
    return full


def _is_causal(attn_mask: torch.Tensor | None, length: int) -> bool:
    """True for an additive mask that hides every later position and no earlier one."""
    if attn_mask is None or attn_mask.shape[-2:] != (length, length) or attn_mask.dim() != 2:
        return False
    later = torch.ones(length, length, dtype=torch.bool, device=attn_mask.device).triu(1)
    return bool(torch.isneginf(attn_mask[later]).all()) and bool((attn_mask[~later] == 0).all())
