"""The package's multiple-choice scorer (``peft_depth.tasks``), the main job's and the quality sweep's: its
predictions equal a one-example-at-a-time computation with full log-softmax, whatever the batching."""

from __future__ import annotations

import random

import torch
from tiny_models import tiny_llama, word_tokenizer
from tokenizers import processors

from peft_depth.tasks import (
    ChoiceExample,
    encode_answer_only,
    fit_examples,
    multiple_choice_accuracy,
    multiple_choice_predictions,
    special_prefix_length,
)


def _examples(count: int, seed: int) -> list[ChoiceExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        prompt = " ".join(f"w{rng.randrange(4, 128)}" for _ in range(rng.randint(2, 9)))
        width = rng.choice([1, 1, 2, 3])  # single-token choices are read off one forward; others run one each
        choices = tuple(
            " " + " ".join(f"w{rng.randrange(4, 128)}" for _ in range(width)) for _ in range(rng.choice([2, 4]))
        )
        out.append(ChoiceExample(prompt, choices, rng.randrange(len(choices))))
    return out


def _reference_predictions(model, tokenizer, examples: list[ChoiceExample]) -> list[int]:
    predictions = []
    with torch.no_grad():
        for ex in examples:
            prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
            scores = []
            for choice in ex.choices:
                ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
                log_probs = model(input_ids=torch.tensor([prompt + ids])).logits.float().log_softmax(-1)[0]
                scores.append(sum(float(log_probs[len(prompt) - 1 + k, token]) for k, token in enumerate(ids)))
            predictions.append(max(range(len(scores)), key=scores.__getitem__))
    return predictions


def test_predictions_equal_one_example_at_a_time_for_any_batch_size():
    model, tokenizer = tiny_llama().eval(), word_tokenizer()
    examples = _examples(40, seed=3)
    expected = _reference_predictions(model, tokenizer, examples)
    assert len(set(expected)) > 1  # the check can tell choices apart
    for batch_size in (1, 5, 64):
        assert multiple_choice_predictions(model, tokenizer, examples, batch_size).tolist() == expected
    labels = [ex.label for ex in examples]
    accuracy = sum(p == y for p, y in zip(expected, labels)) / len(labels)
    assert multiple_choice_accuracy(model, tokenizer, examples, batch_size=7) == accuracy


def test_scoring_keeps_the_model_mode_and_builds_no_graph():
    model, tokenizer = tiny_llama().train(), word_tokenizer()
    forwards = []  # (training, grad enabled, logits carry a graph) at every scoring forward
    model.register_forward_hook(
        lambda module, args, output: forwards.append(
            (module.training, torch.is_grad_enabled(), output.logits.requires_grad)
        )
    )
    multiple_choice_predictions(model, tokenizer, _examples(4, seed=1))
    assert forwards and all(seen == (False, False, False) for seen in forwards), forwards  # eval mode, no graph
    assert model.training  # the caller's mode is back


def test_rows_whose_answer_would_be_truncated_away_are_left_out():
    """TRL truncates a row longer than max_length from the end, which removes the answer (the only tokens with a
    loss); fit_examples keeps exactly the rows whose prompt + answer fit, with their lengths."""
    tokenizer = word_tokenizer()
    examples = [
        ChoiceExample(" ".join(f"w{4 + i}" for i in range(words)), (" w100", " w101"), 0) for words in (3, 7, 8, 12)
    ]
    kept, lengths = fit_examples(examples, tokenizer, max_length=8)  # answers are one token
    assert [len(ex.prompt.split()) for ex in kept] == [3, 7] and lengths == [4, 8]
    for example in kept:  # what TRL keeps of each row still ends with the answer
        row = encode_answer_only([example], tokenizer)[0]
        assert row["input_ids"][:8][-1] == tokenizer(example.answer, add_special_tokens=False)["input_ids"][-1]


def test_a_bos_the_tokenizer_adds_counts_against_max_length():
    """TRL tokenizes prompt + completion with the tokenizer's special tokens: a BOS in front took the place of the
    answer's last token in a row that fitted max_length exactly without it."""
    tokenizer = word_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    assert special_prefix_length(tokenizer) == 1 and special_prefix_length(word_tokenizer()) == 0
    examples = [ChoiceExample(" ".join(f"w{4 + i}" for i in range(words)), (" w100", " w101"), 0) for words in (6, 7)]
    kept, lengths = fit_examples(examples, tokenizer, max_length=8)
    assert [len(ex.prompt.split()) for ex in kept] == [6] and lengths == [7]
    for example in kept:  # as TRL tokenizes and truncates the row
        assert tokenizer(example.prompt + example.answer)["input_ids"][:8][-1] == tokenizer.convert_tokens_to_ids(
            "w100"
        )
