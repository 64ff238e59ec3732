"""``torch.compile`` runs every method and routing mode, forward and backward, with the eager results.

Graph breaks are allowed (routing decisions that pick Python-level experts or layers are data-dependent), recursion
and wrong results are not. Each case compiles with ``backend="aot_eager"`` (dynamo + AOT autograd, eager kernels:
the graph capture that goes wrong, without C++ compile times) and compares, against eager on the same weights and
batches: logits, the LM loss, every auxiliary loss, the gradients of every adapter parameter from the LM loss and from
the auxiliary losses separately, and ``routing_stats``. Two batches of the same shape with different contents run
through one compiled model, so that a routing decision baked into a graph (instead of guarded or broken on) shows up
as a wrong second result. One ``inductor`` test checks that real code generation works too.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from test_invariants import _left_padded, _perturb, adapted
from tiny_models import tiny_llama
from torch._dynamo.testing import CompileCounterWithBackend

import peft_depth

ATOL = 1e-5

# Tracing a custom autograd Function (MoD's chunked distillation), dynamo itself instantiates
# torch.autograd.Function inside ``warnings.catch_warnings(record=True)`` to silence this deprecation; the warning
# guard still sees it with our frame further up the stack. It is torch's call, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")

#: Every method and routing mode of the invariants' case builder (``test_invariants.adapted``). DLO's capacity
#: selection differs from dlo_mlp in eval only, so it runs in eval mode (gradients still flow).
CASES = [
    ("mola", "train"),
    ("molex_token", "train"),
    ("molex_batch_vote", "train"),
    ("molex_sequence", "train"),
    ("mod_token", "train"),
    ("mod_sequence", "train"),
    ("dlo_mlp", "train"),
    ("dlo_block", "train"),
    ("dlo_capacity", "eval"),
]


def _batches() -> list[dict[str, torch.Tensor]]:
    """Two left-padded batches of one shape (no recompilation for shape) with different tokens, hence routing."""
    return [_left_padded([7, 5], seed=1), _left_padded([7, 5], seed=2)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each case compiles from scratch; compiled backwards may be run with ``retain_graph`` (LM and aux gradients
    are taken separately, so that the small aux gradients are not hidden under the LM ones)."""
    torch._dynamo.reset()
    with torch._functorch.config.patch(donated_buffer=False):
        yield
    torch._dynamo.reset()


def _step(model: torch.nn.Module, call, batch: dict[str, torch.Tensor]) -> dict[str, object]:
    """One forward (through ``call``: the model or its compiled wrapper) and the gradients of its losses."""
    params = [param for param in model.parameters() if param.requires_grad]
    torch.manual_seed(0)
    out = call(**batch, labels=batch["input_ids"])
    aux = peft_depth.aux_losses(model)
    # every method has an auxiliary loss in training; an empty dict there means the forward recorded nothing
    assert aux or not model.training
    lm_grads = torch.autograd.grad(out.loss, params, retain_graph=bool(aux), allow_unused=True)
    aux_grads = torch.autograd.grad(sum(aux.values()), params, allow_unused=True) if aux else None
    return {
        "logits": out.logits.detach(),
        "loss": out.loss.detach(),
        "aux": {name: value.detach() for name, value in aux.items()},
        "lm_grads": lm_grads,
        "aux_grads": aux_grads,
        "routing_stats": peft_depth.routing_stats(model),
    }


def _assert_grads_equal(eager, compiled, names: list[str], what: str) -> None:
    assert (eager is None) == (compiled is None), f"{what}: gradient present in one run only"
    if eager is None:
        return
    for name, a, b in zip(names, eager, compiled):
        assert (a is None) == (b is None), f"{what} of {name}: reached the parameter in one run only"
        if a is not None:
            torch.testing.assert_close(b, a, atol=ATOL, rtol=1e-4, msg=lambda m, n=name: f"{what} of {n}: {m}")


def _assert_same_step(eager: dict[str, object], compiled: dict[str, object], names: list[str]) -> None:
    torch.testing.assert_close(compiled["logits"], eager["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(compiled["loss"], eager["loss"], atol=ATOL, rtol=0)
    assert compiled["aux"].keys() == eager["aux"].keys()
    for name in eager["aux"]:
        torch.testing.assert_close(compiled["aux"][name], eager["aux"][name], atol=ATOL, rtol=1e-5)
    _assert_grads_equal(eager["lm_grads"], compiled["lm_grads"], names, "LM-loss gradient")
    _assert_grads_equal(eager["aux_grads"], compiled["aux_grads"], names, "aux-loss gradient")
    _assert_close_structures(compiled["routing_stats"], eager["routing_stats"], "routing_stats")


def _assert_close_structures(got: object, expected: object, where: str) -> None:
    """Nested dicts / lists of numbers equal, floats up to 1e-6 (routing_stats)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            _assert_close_structures(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            _assert_close_structures(a, b, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-6, nan_ok=True), where
    else:
        assert got == expected, where


def _molex_mixes_other_layers(stats: dict[str, object]) -> bool:
    rows = stats["molex"]["default"]
    chosen = [row["chosen"] if isinstance(row["chosen"], list) else [row["chosen"]] for row in rows]
    return any(j != row["layer"] for row, js in zip(rows, chosen) for j in js)


@pytest.mark.parametrize("case, mode", CASES, ids=[case for case, _ in CASES])
def test_aot_eager_compile_equals_eager(case, mode):
    model = adapted(case, "llama").train(mode == "train")
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend)
    for batch in _batches():
        eager = _step(model, model, batch)
        if case.startswith("molex_"):
            # the case is only a test of the mixture if some layer takes another layer's output
            assert _molex_mixes_other_layers(eager["routing_stats"])
        _assert_same_step(eager, _step(model, compiled, batch), names)
    assert backend.frame_count > 0, "torch.compile captured no graph: the comparison ran eager against eager"


def _has_cpp_compiler() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _has_cpp_compiler(), reason="inductor needs a C++ compiler on CPU; none was found")
def test_inductor_compile_equals_eager_for_mola():
    # two layers: inductor's C++ compile time grows with the graph, and one routed block per depth suffices here
    model = get_peft_model(
        tiny_llama(num_layers=2),
        peft_depth.MoLAConfig(
            task_type="CAUSAL_LM", num_experts=[2, 3], top_k=2, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
        ),
    )
    _perturb(model)
    model.train()
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    compiled = torch.compile(model, backend="inductor")
    batch = _batches()[0]
    eager = _step(model, model, batch)
    # generated kernels reorder float arithmetic: equal up to float32 rounding, not bit for bit
    got = _step(model, compiled, batch)
    torch.testing.assert_close(got["logits"], eager["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["loss"], eager["loss"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["aux"]["routing"], eager["aux"]["routing"], atol=1e-4, rtol=1e-4)
    for what in ("lm_grads", "aux_grads"):
        for name, a, b in zip(names, eager[what], got[what]):
            assert (a is None) == (b is None), f"{what} of {name}"
            if a is not None:
                torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("case", ["mola", "mod_token", "molex_token"])
def test_a_model_compiled_before_its_first_call_follows_disable_adapter(case):
    """Two things a model compiled at once must do (DPO's reference forward runs inside disable_adapter()):

    - its first call may be the compiled one: the forward pre-hook registered a weakref finalizer at the model's
      first forward, and traced by dynamo that failed its own guard on the finalizer registry ("Guard failed on the
      same frame it was created");
    - disable_adapter() reaches the compiled graph: the tuner's disabled flag was absent from its __dict__ until the
      first disable, dynamo guards a key's value, not its absence, and MoD's ensemble and MoLEx's mixing kept running.
    """
    model = adapted(case, "llama").eval()
    batch = _batches()[0]
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        with_adapter = compiled(**batch).logits  # before any eager forward
        torch.testing.assert_close(with_adapter, model(**batch).logits, atol=ATOL, rtol=0)
        with model.disable_adapter():
            base_compiled = compiled(**batch).logits
            base_eager = model(**batch).logits
        again = compiled(**batch).logits
    assert (with_adapter - base_eager).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(base_compiled, base_eager, atol=ATOL, rtol=0)
    torch.testing.assert_close(again, with_adapter, atol=ATOL, rtol=0)


def test_dlo_training_does_not_recompile_as_capacity_anneals():
    """The router labels depend on the optimizer step, a Python int (static to dynamo): a traced label hook
    recompiled at every step until dynamo's recompile limit, then ran eager with a warning. After the first two steps
    (the first compile, then the capacity becoming a dynamic value) stepping the schedule recompiles nothing."""
    config = peft_depth.DLOConfig(expand_every=2, skip_mode="mlp", capacity=0.5, capacity_annealing_steps=20)
    model = get_peft_model(tiny_llama(), config).train()
    compiled = torch.compile(model, backend="aot_eager")
    batch = _left_padded([7, 5], seed=1)

    def step(number: int) -> None:
        model.base_model.set_dlo_step(number)
        out = compiled(**batch, labels=batch["input_ids"])
        (out.loss + sum(peft_depth.aux_losses(model).values())).backward()

    step(0)
    step(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for number in range(2, 8):  # capacity 0.95 .. 0.825
            step(number)
    assert model.base_model.dlo_annealed_capacity("default") == pytest.approx(0.825)
