"""The class-wise prompt learner splices into open_clip's text tower without changing it."""

from __future__ import annotations

import open_clip
import pytest
import torch

from worker.cbpt.prompts import ClassPrompts, encode_prompts, pooled_length
from worker.lab.architecture import TinyClipConfig, build_model

NAMES = ["ankle boot", "t-shirt", "bag"]


@pytest.fixture(scope="module")
def model() -> open_clip.CLIP:
    config = TinyClipConfig(
        image_size=16,
        patch_size=8,
        vision_width=32,
        vision_layers=1,
        text_width=64,
        text_layers=2,
        embed_dim=32,
        context_length=16,
    )
    return build_model(config, seed=1).eval()


@pytest.fixture(scope="module")
def tokenizer() -> open_clip.SimpleTokenizer:
    return open_clip.get_tokenizer("", context_length=16)


def test_hand_crafted_context_reproduces_encode_text(
    model: open_clip.CLIP, tokenizer: open_clip.SimpleTokenizer
) -> None:
    prompts = ClassPrompts(model, tokenizer, NAMES, n_ctx=4, init="a photo of a")
    with torch.no_grad():
        learned = encode_prompts(model, prompts(), prompts.tokens)
        reference = model.encode_text(
            tokenizer([f"a photo of a {n}." for n in NAMES]), normalize=True
        )
    torch.testing.assert_close(learned, reference, atol=1e-5, rtol=1e-5)


def test_positions_after_the_pooled_token_are_cut_only_under_a_causal_mask(
    model: open_clip.CLIP, tokenizer: open_clip.SimpleTokenizer
) -> None:
    prompts = ClassPrompts(model, tokenizer, NAMES, n_ctx=4, init="a photo of a")
    longest_eot = int(prompts.tokens.argmax(dim=-1).max())
    assert pooled_length(model, prompts.tokens) == longest_eot + 1 < prompts.tokens.shape[1]
    bidirectional = build_model(
        TinyClipConfig(image_size=16, patch_size=8, text_width=64, context_length=16), seed=1
    )
    bidirectional.attn_mask = torch.zeros(16, 16)  # every position sees every other one
    assert pooled_length(bidirectional, prompts.tokens) == 16
    bidirectional.attn_mask = None
    assert pooled_length(bidirectional, prompts.tokens) == 16


def test_context_shape_and_gradients(
    model: open_clip.CLIP, tokenizer: open_clip.SimpleTokenizer
) -> None:
    prompts = ClassPrompts(model, tokenizer, NAMES, n_ctx=8, init=None, seed=0)
    assert prompts.context.shape == (3, 8, 64)  # (n_cls, n_ctx, width)
    features = encode_prompts(model, prompts(), prompts.tokens)
    features[0].sum().backward()
    assert prompts.context.grad is not None
    assert float(prompts.context.grad[0].abs().sum()) > 0
    assert float(prompts.context.grad[1:].abs().sum()) == 0, "classes do not share context"


def test_random_init_is_seeded(model: open_clip.CLIP, tokenizer: open_clip.SimpleTokenizer) -> None:
    one = ClassPrompts(model, tokenizer, NAMES, n_ctx=4, init=None, seed=7).context
    two = ClassPrompts(model, tokenizer, NAMES, n_ctx=4, init=None, seed=7).context
    assert torch.equal(one, two)


def test_init_must_match_n_ctx(model: open_clip.CLIP, tokenizer: open_clip.SimpleTokenizer) -> None:
    with pytest.raises(ValueError, match="not n_ctx=3"):
        ClassPrompts(model, tokenizer, NAMES, n_ctx=3, init="a photo of a")


def test_overflowing_class_name_is_refused(
    model: open_clip.CLIP, tokenizer: open_clip.SimpleTokenizer
) -> None:
    with pytest.raises(ValueError, match="overflows"):
        ClassPrompts(model, tokenizer, ["very " * 12 + "long name", "bag"], n_ctx=4)
