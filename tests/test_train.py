import math

import pytest
import torch

from app.config import load_settings
from app.training.model import build_peft_model, load_tokenizer
from app.server_app import cosine_lr
from app.training.train import proximal_term, response_loss, train_round
from app.training.data import build_examples, load_partition_rows, round_batches


def test_cosine_lr_matches_flowertune():
    assert cosine_lr(0, 10, 5e-5, 1e-6) == pytest.approx(5e-5)
    assert cosine_lr(10, 10, 5e-5, 1e-6) == pytest.approx(1e-6)
    assert cosine_lr(5, 10, 5e-5, 1e-6) == pytest.approx((5e-5 + 1e-6) / 2)
    rates = [cosine_lr(r, 10, 5e-5, 1e-6) for r in range(1, 11)]
    assert rates == sorted(rates, reverse=True)


def test_proximal_term_value_and_gradient_match_finite_differences():
    torch.manual_seed(0)
    w = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64, requires_grad=True)]
    anchors = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    mu = 0.7
    value = proximal_term(w, anchors, mu)
    expected = 0.5 * mu * sum(((a - b) ** 2).sum() for a, b in zip(w, anchors))
    assert value.item() == pytest.approx(expected.item())
    value.backward()
    eps = 1e-6
    for p, a in zip(w, anchors):
        flat = p.detach().clone().view(-1)
        for i in range(flat.numel()):
            def f(delta):
                q = [x.detach().clone() for x in w]
                q[[id(x) for x in w].index(id(p))].view(-1)[i] += delta
                return proximal_term(q, anchors, mu).item()
            numeric = (f(eps) - f(-eps)) / (2 * eps)
            assert p.grad.view(-1)[i].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8)


@pytest.fixture(scope="module")
def tiny():
    settings = load_settings({"profile": "tiny", "model.lora.peft-lora-dropout": 0.0})
    tokenizer = load_tokenizer("tiny")
    rows = load_partition_rows("tiny", "", 0, 20)
    return settings, tokenizer, build_examples(rows, tokenizer, settings.train.seq_length)


def test_response_loss_equals_transformers_loss(tiny):
    settings, tokenizer, examples = tiny
    model = build_peft_model(settings.model, seed=0)
    batch = next(round_batches(examples, batch_size=4, steps=1, seed=0, pad_token_id=tokenizer.pad_token_id))
    ours = response_loss(model, batch)
    reference = model(**batch).loss
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_proximal_term_pulls_towards_the_global_adapter(tiny):
    settings, tokenizer, examples = tiny
    args = settings.train.training_arguments.model_copy(update={"max_steps": 4})
    distances = {}
    for mu in (0.0, 50.0):
        model = build_peft_model(settings.model, seed=0)
        start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        batches = round_batches(examples, batch_size=8, steps=4, seed=3, pad_token_id=tokenizer.pad_token_id)
        result = train_round(model, batches, args=args, lr=0.05, proximal_mu=mu)
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        distances[mu] = math.sqrt(sum(((a - b) ** 2).sum().item() for a, b in zip(after, start)))
        assert result.steps == 4 and math.isfinite(result.train_loss)
        assert (result.proximal > 0) == (mu > 0)
    assert distances[50.0] < distances[0.0]


def test_warmup_then_constant_lr(tiny, monkeypatch):
    settings, tokenizer, examples = tiny
    model = build_peft_model(settings.model, seed=0)
    seen = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    args = settings.train.training_arguments.model_copy(update={"max_steps": 6, "warmup_steps": 2})
    batches = round_batches(examples, batch_size=2, steps=6, seed=0, pad_token_id=tokenizer.pad_token_id)
    train_round(model, batches, args=args, lr=1e-3, proximal_mu=0.0)
    # transformers' constant_with_warmup, as FlowerTune's Trainer steps it: 0, 1/2, then full.
    assert seen == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3])


def test_fused_proximal_gradient_equals_autograd():
    from app.training.train import add_proximal_gradient

    torch.manual_seed(1)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(6, requires_grad=True)]
    anchors = [torch.randn(4, 3), torch.randn(6)]
    task = [torch.randn(4, 3), torch.randn(6)]
    for p, g in zip(params, task):
        p.grad = g.clone()
    value = add_proximal_gradient(params, anchors, 0.3)
    fused = [p.grad.clone() for p in params]
    for p, g in zip(params, task):
        p.grad = g.clone()
    reference = proximal_term(params, anchors, 0.3)
    reference.backward()
    assert value == pytest.approx(reference.item(), rel=1e-6)
    for f, p in zip(fused, params):
        assert torch.allclose(f, p.grad, atol=1e-6)


def test_a_node_given_a_gpu_it_cannot_see_refuses_to_load(monkeypatch):
    """No quiet fallback to an 8B model on the CPU: the reason names the variable and what to check."""
    from app.training.model import ModelLoadError, load_base_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("FEDTUNE_GPU", "3")
    with pytest.raises(ModelLoadError, match=r"given GPU 3 \(FEDTUNE_GPU\) but CUDA sees no device.*NVIDIA Container Toolkit"):
        load_base_model("tiny", quantization=0)
    monkeypatch.delenv("FEDTUNE_GPU")
    assert load_base_model("tiny", quantization=0) is not None  # CPU-only nodes are not asked for a GPU


def test_a_corrupt_model_cache_is_named_with_its_fix(tmp_path):
    import shutil

    from app.training.model import ModelLoadError, load_base_model
    from app.training.tiny import tiny_model_dir

    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(ModelLoadError, match=rf"could not be loaded from {broken}.*incomplete or corrupt.*model-cache"):
        load_base_model(str(broken), quantization=0)


def test_the_adapter_state_is_peft_s_own_state_dict_read_through_the_cached_parameter_map(tiny):
    """adapter_state / load_adapter_state skip PEFT's walk over the whole base model per call:
    they must still be exactly PEFT's names and values, and loading must reach the live weights."""
    from peft import get_peft_model_state_dict

    from app.training.model import adapter_state, load_adapter_state

    settings, _, _ = tiny
    model = build_peft_model(settings.model, seed=0)
    peft_state = get_peft_model_state_dict(model)
    ours = adapter_state(model)
    assert list(ours) == list(peft_state)
    assert all(torch.equal(ours[k], peft_state[k].cpu()) for k in ours)
    shifted = {k: v + 0.25 for k, v in ours.items()}
    load_adapter_state(model, shifted)
    assert all(torch.equal(v, shifted[k]) for k, v in get_peft_model_state_dict(model).items())
    assert all(torch.equal(v, shifted[k]) for k, v in adapter_state(model).items())


def test_an_adapter_of_another_shape_or_key_set_is_refused(tiny):
    from app.training.model import adapter_state, load_adapter_state

    settings, _, _ = tiny
    model = build_peft_model(settings.model, seed=0)
    state = adapter_state(model)
    key, last = next(iter(state)), list(state)[-1]
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(model, {**state, key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="shape"):  # only the last tensor wrong: the others must not load either
        load_adapter_state(model, {**{k: v + 1 for k, v in state.items()}, last: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state(model, {k: v for k, v in state.items() if k != key})
    assert all(torch.equal(v, state[k]) for k, v in adapter_state(model).items())  # nothing was half-loaded by the refused ones
