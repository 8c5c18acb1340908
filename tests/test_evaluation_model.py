"""`fedtune eval` with the tiny model on CPU: known accuracies, and the fast path against the reference path."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from app.evaluation.benchmarks import load_questions
from app.evaluation.runner import FastOptions, chat_prompt, generate_answers

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
NAMES = ("pubmedqa", "medmcqa", "medqa", "careqa")


@pytest.fixture(scope="module")
def tiny():
    from app.evaluation.cli import load_model

    return load_model("tiny", None, 0)


def scripted_model_dir(directory: Path, answer: str) -> Path:
    """The tiny model rewired to answer `answer` to every prompt of the chat template.

    With attention and MLP outputs zeroed, the final hidden state depends on the current
    token alone; each LM-head row in the script points at the normalised hidden state of
    the token that must precede it (a unit vector scaled by 10), so greedy decoding walks
    prompt end -> answer tokens whatever the question.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    from app.training.tiny import tiny_model_dir

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir())
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    keys = [tokenizer(chat_prompt("any question"))["input_ids"][-1], *answer_ids[:-1]]
    assert len(set(keys)) == len(keys) and len(set(answer_ids)) == len(answer_ids)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hidden = model.model.norm(model.model.embed_tokens.weight[keys])
        model.lm_head.weight.zero_()
        for key_hidden, target in zip(hidden, answer_ids):
            model.lm_head.weight[target] = 10 * key_hidden / key_hidden.norm()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_cli(*argv: str) -> int:
    from app.cli import main

    return main(["eval", "--quantization", "0", *argv])


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_known_accuracies_through_the_cli(tmp_path, exact):
    model_dir = scripted_model_dir(tmp_path / "always-a", "A")
    out = tmp_path / "out"
    extra = ["--exact"] if exact else []
    code = run_cli("--base-model", str(model_dir), "--data-dir", str(FIXTURES), "--output-dir", str(out),
                   "--datasets", "medmcqa,medqa,careqa", "--run-name", "t", *extra)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    # Golds: medmcqa A,C,A,B; medqa A,B,C,D; careqa A,A,A,C.
    assert summary["accuracies"] == {"medmcqa": 0.5, "medqa": 0.25, "careqa": 0.75}
    assert summary["average"] == pytest.approx(0.5)
    assert summary["mode"] == ("exact" if exact else "fast")
    assert (out / "acc_careqa_t.txt").read_text() == "Accuracy: 0.75. "
    rows = [json.loads(line) for line in (out / "generation_medqa_t.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == ["A"] * 4
    assert [r["correct"] for r in rows] == [True, False, False, False]
    assert rows[0]["prompt"] == load_questions("medqa", FIXTURES)[0].prompt


@pytest.mark.parametrize(
    "answer, batch_size, expected",
    [
        ("yes", 16, 0.5),  # golds yes, no, maybe, yes
        # "maybe" scores only as the whole generation. With one chunk of 16 every answer gets
        # as many tokens as the first gold ("yes"), too few for "maybe"; chunks of one give
        # the "maybe" question its own length.
        ("maybe", 16, 0.0),
        ("maybe", 1, 0.25),
    ],
)
def test_pubmedqa_answer_lengths_follow_the_reference(tmp_path, answer, batch_size, expected):
    model_dir = scripted_model_dir(tmp_path / "scripted", answer)
    out = tmp_path / "out"
    code = run_cli("--base-model", str(model_dir), "--data-dir", str(FIXTURES), "--output-dir", str(out),
                   "--datasets", "pubmedqa", "--batch-size", str(batch_size))
    assert code == 0
    assert json.loads((out / "summary.json").read_text())["accuracies"] == {"pubmedqa": expected}


def _prompts() -> list[str]:
    """The fixtures, a repeated prompt, and varied-length prompts sharing a long instruction."""
    prompts = [q.prompt for name in NAMES for q in load_questions(name, FIXTURES)]
    rng = random.Random(0)
    words = "the of patient fever liver heart dose acute chronic renal failure a an in with".split()
    for _ in range(40):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(1, 80)))
        prompts.append(f"Shared instruction for every synthetic question here.\n{body}\nThe answer is:\n")
    return prompts + prompts[:3]


@pytest.mark.parametrize("min_prefix", [8, 10_000], ids=["prefix-cache", "no-prefix"])
def test_fast_path_matches_one_at_a_time(tiny, min_prefix):
    model, tokenizer = tiny
    prompts = _prompts()
    rng = random.Random(1)
    new_tokens = [rng.choice([1, 1, 2, 3]) for _ in prompts]
    reference = generate_answers(model, tokenizer, prompts, new_tokens, exact=True)
    options = FastOptions(batch_tokens=3000, min_prefix=min_prefix, recheck_margin=0.0)
    fast = generate_answers(model, tokenizer, prompts, new_tokens, exact=False, options=options)
    assert options.stats["batches"] > 3  # several length-sorted, padded batches
    assert (options.stats["prefix_tokens"] > 0) == (min_prefix == 8)
    assert options.stats["rechecked"] == 0
    assert [a.token_ids for a in fast] == [a.token_ids for a in reference]
    assert [a.output for a in fast] == [a.output for a in reference]
    assert any(len(a.token_ids) > 1 for a in fast)  # the decode steps after the prefill ran
    assert all(a.margin is not None and a.margin >= 0 for a in fast)


def test_recheck_replaces_uncertain_answers_with_reference_ones(tiny):
    model, tokenizer = tiny
    prompts = _prompts()[:12]
    new_tokens = [2] * len(prompts)
    reference = generate_answers(model, tokenizer, prompts, new_tokens, exact=True)
    options = FastOptions(recheck_margin=float("inf"))
    fast = generate_answers(model, tokenizer, prompts, new_tokens, exact=False, options=options)
    assert options.stats["rechecked"] == len(prompts)
    assert all(a.rechecked for a in fast)
    assert [a.token_ids for a in fast] == [a.token_ids for a in reference]


def test_batched_recheck_recomputes_in_float32(tiny):
    model, tokenizer = tiny
    prompts = _prompts()[:12]
    new_tokens = [2] * len(prompts)
    reference = generate_answers(model, tokenizer, prompts, new_tokens, exact=True)
    options = FastOptions(recheck_margin=float("inf"), recheck_batched=True)
    fast = generate_answers(model, tokenizer, prompts, new_tokens, exact=False, options=options)
    assert options.stats["rechecked"] == len(prompts) and options.stats["recheck_seconds"] >= 0
    assert all(a.rechecked for a in fast)
    assert [a.token_ids for a in fast] == [a.token_ids for a in reference]


def test_sdpa_backends_are_restricted_then_restored():
    from app.evaluation.runner import _sdpa_backends

    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    with _sdpa_backends(("flash", "efficient")):
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == before
    with _sdpa_backends(None):
        assert torch.backends.cuda.math_sdp_enabled() == before[1]


def test_dora_adapter_fast_equals_exact_through_the_cli(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from app.training.tiny import tiny_model_dir

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir()),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a non-trivial adapter (PEFT starts B at zero)
    model.save_pretrained(tmp_path / "adapter")
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)

    outputs = {}
    for mode in ("fast", "exact"):
        out = tmp_path / mode
        argv = ["--base-model", "tiny", "--peft-path", str(tmp_path / "adapter"), "--data-dir", str(data),
                "--output-dir", str(out)]
        assert run_cli(*argv, *(["--exact"] if mode == "exact" else [])) == 0
        outputs[mode] = {name: [json.loads(line)["output"] for line in
                                (out / f"generation_{name}_fl.jsonl").read_text().splitlines()] for name in NAMES}
    assert outputs["fast"] == outputs["exact"]

    assert run_cli("--base-model", "tiny", "--data-dir", str(data), "--output-dir", str(tmp_path / "base")) == 0
    base = {name: [json.loads(line)["output"] for line in
                   (tmp_path / "base" / f"generation_{name}_fl.jsonl").read_text().splitlines()] for name in NAMES}
    assert base != outputs["exact"]  # the adapter was applied


def test_half_blocks_run_attention_and_mlp_in_low_precision_then_restore(tiny):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from app.evaluation.runner import _half_blocks

    model, tokenizer = tiny
    ids = torch.tensor([tokenizer(chat_prompt(load_questions("medqa", FIXTURES)[0].prompt))["input_ids"]])
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    mlp = model.model.layers[0].mlp
    seen = []
    hook = mlp.down_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.inference_mode():
        reference = model(ids).logits[0, -1]
        # On CUDA the 4-bit layers take any input type; plain CPU layers need autocast for that.
        with _half_blocks(model, torch.bfloat16), torch.autocast("cpu", dtype=torch.bfloat16):
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa
            low = model(ids).logits[0, -1].float()
        again = model(ids).logits[0, -1]
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16, torch.float32]
    assert not torch.equal(low, reference)
    assert torch.allclose(low, reference, atol=0.05)
    assert torch.equal(again, reference)  # everything restored
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa and "forward" not in vars(mlp)
