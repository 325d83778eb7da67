"""Answer extraction and greedy-generation accuracy."""

import pytest
import torch

from eval.math import extract_answer, math_accuracy


@pytest.mark.parametrize("text, answer", [
    ("Step 1.\n#### 42", "42"),
    ("#### 1,234", "1234"),
    ("#### -17", "-17"),
    ("#### 3.50", "3.5"),
    ("#### 12.0", "12"),
    ("first #### 5 then #### 6", "6"),
    ("####7", "7"),
    ("no marker here: 42", None),
    ("#### seven", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


LEARNED = {"prompt": "Maya has 3 apples and buys 4 more. How many apples?", "response": "3 + 4 = 7\n#### 7"}
OTHER = {"prompt": "Tom has 9 pens and loses 5. How many pens?", "response": "9 - 5 = 4\n#### 4"}


@pytest.fixture(scope="module")
def memorised(tokenizer):
    """A tiny model trained to continue LEARNED's prompt with its worked answer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    learned = LEARNED
    ids = tokenizer(learned["prompt"] + learned["response"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids + [tokenizer.eos_token_id]])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=128))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.e2e
def test_accuracy_of_a_model_that_memorised_one_answer(memorised, tokenizer):
    result = math_accuracy(memorised, tokenizer, [LEARNED, OTHER], max_new_tokens=24)
    assert result == {"accuracy": 0.5, "correct": 1, "total": 2, "answered": 2}


@pytest.mark.e2e
def test_lm_eval_harness_runs_the_local_task(memorised, tokenizer, tmp_path):
    """lm-eval scores the same model on the same two problems with the same answer: 1 of 2."""
    import json

    from eval.harness import DEMO_TASK, run_harness

    memorised.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in (LEARNED, OTHER)))
    results = run_harness(str(tmp_path / "model"), [DEMO_TASK], demo_data=str(data), max_new_tokens=24)
    assert results[DEMO_TASK]["exact_match,strict-match"] == pytest.approx(0.5)
