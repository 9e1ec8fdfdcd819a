"""Stage 2: class-wise prompt tuning on cached image features, encoders frozen.

Three losses, as DESIGN section 2 reads CBPT:

1. clean: cross-entropy of ``logit_scale * cos(f(x), g(prompt_c))`` against the true class;
2. backdoor: the same cross-entropy on triggered images ``f(T(x))`` against their *true* class,
   which pulls the trigger's feature region back to where the content says it belongs;
3. a regulariser keeping each class's text feature near its hand-crafted prompt's feature, which
   protects accuracy on images the few shots do not cover.

Image features never change during this stage, so they are computed once by the caller (for a
fixed set of views) and each step runs only the text tower on C prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from pydantic import BaseModel, ConfigDict, Field

from worker.cbpt.inversion import CancelledError
from worker.cbpt.prompts import ClassPrompts, Tokenizer, encode_prompts


class TuningSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=150, ge=1, le=20_000)
    lr: float = Field(default=5e-3, gt=0, le=1)
    n_ctx: int = Field(default=4, ge=1, le=32)
    context_init: str | None = Field(default="a photo of a", max_length=200)
    backdoor_weight: float = Field(default=1.0, ge=0, le=100)
    # Few shots overfit fast: on lab models a weight of 0.5 cost 1.6 points of held-out CA
    # with clean data alone, 2 cost 1.3 and 20 cost 0.5.
    regularizer_weight: float = Field(default=2.0, ge=0, le=100)


@dataclass(frozen=True)
class TuningResult:
    prompts: ClassPrompts
    class_embeddings: torch.Tensor  # (C, D), L2-normalised, from the tuned prompts
    final_loss: float


def tune_prompts(
    model: open_clip.CLIP,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    hand_crafted: torch.Tensor,
    clean_features: torch.Tensor,
    clean_labels: torch.Tensor,
    triggered_features: torch.Tensor | None,
    triggered_labels: torch.Tensor | None,
    settings: TuningSettings,
    *,
    seed: int,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> TuningResult:
    """Tunes one context per class; ``hand_crafted`` ``(C, D)`` anchors the regulariser.

    With ``triggered_features`` left out (or a zero backdoor weight) this is plain CoOp with
    class-specific contexts: the "prompt tuning without inversion" baseline.
    """
    torch.manual_seed(seed)
    prompts = ClassPrompts(
        model, tokenizer, class_names, n_ctx=settings.n_ctx, init=settings.context_init, seed=seed
    ).to(clean_features.device)
    optimizer = torch.optim.Adam(prompts.parameters(), lr=settings.lr)
    scale = model.logit_scale.exp().detach()
    backdoor = None
    if triggered_features is not None and triggered_labels is not None and settings.backdoor_weight:
        backdoor = (triggered_features, triggered_labels)
    loss = torch.tensor(0.0)
    for step in range(settings.steps):
        if should_cancel is not None and should_cancel():
            raise CancelledError("cancelled during prompt tuning")
        text = encode_prompts(model, prompts(), prompts.tokens)  # (C, D)
        loss = F.cross_entropy(scale * clean_features @ text.T, clean_labels)
        if backdoor is not None:
            features, labels = backdoor
            loss = loss + settings.backdoor_weight * F.cross_entropy(
                scale * features @ text.T, labels
            )
        if settings.regularizer_weight > 0:
            drift = 1 - (text * hand_crafted).sum(dim=1)
            loss = loss + settings.regularizer_weight * drift.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if progress is not None:
            progress((step + 1) / settings.steps)
    with torch.no_grad():
        embeddings = encode_prompts(model, prompts(), prompts.tokens)
    return TuningResult(prompts, embeddings, loss.item())
