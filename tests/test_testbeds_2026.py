"""The 2026 families' random-weight test beds (``sdlens.testing.pipeline_2026``): each builds from
the real configs, runs 2 steps on the CPU deterministically, and has the published size at
``scale=1`` (on the meta device)."""

from __future__ import annotations

import pytest
import torch

from sdlens.testing import (BEDS_2026, call_kwargs_2026, mistral_tokenizer, qwen_tokenizer,
                            random_pipeline)

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = {"flux2": "Flux2Pipeline", "flux2-klein": "Flux2KleinPipeline",
           "qwen-image": "QwenImagePipeline", "qwen-image-edit": "QwenImageEditPipeline",
           "z-image": "ZImagePipeline", "chroma": "ChromaPipeline",
           "flux-kontext": "FluxKontextPipeline"}
# (arch, variant, component, published size in billions of parameters)
SIZES = [
    ("flux2", None, "transformer", 32.0),
    ("flux2", None, "text_encoder", 24.0),  # Mistral-Small-3.1
    ("flux2-klein", "4b", "transformer", 4.0), ("flux2-klein", "4b", "text_encoder", 4.0),
    ("flux2-klein", "9b", "transformer", 9.0), ("flux2-klein", "9b", "text_encoder", 8.2),
    ("qwen-image", None, "transformer", 20.0), ("qwen-image", None, "text_encoder", 8.3),
    ("z-image", None, "transformer", 6.0), ("z-image", None, "text_encoder", 4.0),
    ("chroma", None, "transformer", 8.9), ("chroma", None, "text_encoder", 4.76),  # T5-XXL enc.
    ("flux-kontext", None, "transformer", 12.0),
]


def billions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


@pytest.mark.parametrize("arch", BEDS_2026)
def test_bed_runs_deterministically(arch):
    pipe = random_pipeline(arch, seed=0)
    assert type(pipe).__name__ == CLASSES[arch]
    first = pipe(**call_kwargs_2026(arch)).images
    again = pipe(**call_kwargs_2026(arch)).images
    assert torch.isfinite(first).all() and torch.equal(first, again)
    if arch != "qwen-image-edit":  # (its ~1 MP reference encode makes each run ~5 s)
        other = pipe(**call_kwargs_2026(arch, seed=1)).images
        assert not torch.equal(first, other)  # the generator, not a constant, makes the latents


def test_klein_base_runs_true_cfg():
    pipe = random_pipeline("flux2-klein", variant="base-4b", seed=0)
    assert not pipe.config.is_distilled and pipe.transformer.config.guidance_embeds is False
    calls = []
    pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    pipe(**call_kwargs_2026("flux2-klein", guidance_scale=4.0))
    assert len(calls) == 4  # a conditional and an unconditional call per step


@pytest.mark.parametrize(("arch", "variant", "component", "published"), SIZES)
def test_full_size_on_meta(arch, variant, component, published):
    pipe = random_pipeline(arch, scale=1, device="meta", variant=variant)
    module = getattr(pipe, component)
    assert next(module.parameters()).device.type == "meta"
    assert abs(billions(module) - published) / published < 0.05  # (klein "4B": 3.88B)


def test_qwen_image_template_prefixes_are_the_dropped_tokens():
    # QwenImage(Edit)Pipeline drop the first 34 (64) tokens: the system turn and "user\n" --
    # with the real vocabulary's one piece per word; the local tokenizer must do the same.
    for arch in ("qwen-image", "qwen-image-edit"):
        pipe = random_pipeline(arch, seed=0)
        template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
        prefix = template[: template.index("user\n") + len("user\n")]
        assert len(pipe.tokenizer(prefix).input_ids) == drop


def test_llm_tokenizers_carry_the_chat_templates():
    qwen = qwen_tokenizer()
    text = qwen.apply_chat_template([{"role": "user", "content": "a red cat"}], tokenize=False,
                                    add_generation_prompt=True, enable_thinking=False)
    assert text == ("<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n"
                    "<think>\n\n</think>\n\n")
    ids = qwen(text).input_ids
    assert qwen.convert_ids_to_tokens(ids)[:3] == ["<|im_start|>", "user", "Ċ"]
    assert qwen.decode(ids) == text
    mistral = mistral_tokenizer(max_length=512)
    conversation = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                    {"role": "user", "content": [{"type": "text", "text": "a red cat"}]}]
    out = mistral.apply_chat_template([conversation], tokenize=True, return_dict=True,
                                      padding="max_length", max_length=512, truncation=True)
    pieces = mistral.convert_ids_to_tokens(out["input_ids"][0])
    assert len(pieces) == 512 and pieces[:2] == ["<s>", "[SYSTEM_PROMPT]"]
    n = sum(out["attention_mask"][0])
    assert pieces[n - 5:n] == ["[INST]", "a", "Ġred", "Ġcat", "[/INST]"] and pieces[n] == "<pad>"
    assert mistral.convert_tokens_to_ids(["<s>", "[INST]", "[IMG]", "<pad>"]) == [1, 3, 10, 11]


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="flux2-klein"):
        random_pipeline("flux3")
    with pytest.raises(ValueError, match="variant"):
        random_pipeline("flux2-klein", variant="2b")
    with pytest.raises(ValueError, match="variant"):
        random_pipeline("chroma", variant="4b")
    with pytest.raises(ValueError, match="variant"):
        random_pipeline("qwen-image", variant="2511")
