"""Depth adapters on a bitsandbytes-quantized base (QLoRA): 4-bit NF4 / FP4 and 8-bit, on CPU (bitsandbytes >= 0.50).

Every method trains, saves, reloads and generates on each base, and its reload is held to what peft's LoRA does in
the same flow (measured here too); an adapter trained on a 4-bit base loads onto the bf16 base it was quantized
from; merging into a quantized base is refused; DLO's new layers are dequantized copies, kept in float32 on a
half-precision base as peft keeps adapter weights. Tests that need bitsandbytes skip cleanly without it.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from tiny_models import batch, tiny_llama
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peft_depth
from peft_depth.core.quantization import dequantized_linear, dequantized_weight, floating_dtype, is_quantized_linear
from peft_depth.trainer import set_training_step

REPOSITORY = Path(__file__).resolve().parent.parent
METHODS = ("lora", "mola", "molex", "mod", "dlo")
QUANTIZATIONS = ("nf4", "fp4", "int8")
#: bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 inputs: the tiny model must be at least that wide.
HIDDEN = 64


def quantization_config(kind: str) -> BitsAndBytesConfig:
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=kind == "nf4",  # QLoRA's setting
    )


def method_config(method: str, **overrides):
    """A small config of each method; the depth methods' LoRA parts target quantized linears too."""
    configs = {
        "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "mola": lambda: peft_depth.MoLAConfig(task_type="CAUSAL_LM", r=4, expert_pattern=[2, 4]),
        "molex": lambda: peft_depth.MoLExConfig(task_type="CAUSAL_LM", r=4, routing="token"),
        "mod": lambda: peft_depth.MoDConfig(
            task_type="CAUSAL_LM", num_late_layers=3, r=4, target_modules=["q_proj", "v_proj"]
        ),
        "dlo": lambda: peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2, r=4, capacity_annealing_steps=0),
    }
    config = configs[method]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def quantized_linears(model) -> set[int]:
    """The quantized linear modules of ``model``, by identity."""
    return {id(module) for module in model.modules() if is_quantized_linear(module)}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """A tiny Llama saved in float32, the checkpoint every base below is loaded (and quantized) from."""
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_llama(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN).save_pretrained(path)
    return str(path)


class Bases:
    """Loads the base checkpoint, quantized or not, the way QLoRA users do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def quantized(self, kind: str, *, prepared: bool = True):
        model = AutoModelForCausalLM.from_pretrained(
            self.path, quantization_config=quantization_config(kind), dtype=torch.bfloat16
        )
        if prepared:
            # norms and embeddings upcast to float32, checkpointing on (non-reentrant: reentrant checkpointing is
            # another matter, see tests of checkpointing)
            model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def plain(self, dtype: torch.dtype):
        return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).eval()


@pytest.fixture(scope="module")
def bases(base_dir) -> Bases:
    pytest.importorskip("bitsandbytes", minversion="0.50", reason="bitsandbytes >= 0.50 runs 4-bit/8-bit on CPU")
    return Bases(base_dir)


@dataclass
class Flow:
    """One method trained, saved and reloaded on one quantized base."""

    losses: list[float]
    gradients: dict[str, float]
    trainable_dtypes: set[torch.dtype]
    quantized_before: set[int]
    quantized_after: set[int]
    adapter_dir: str
    inputs: dict[str, torch.Tensor]
    before: torch.Tensor
    after: torch.Tensor
    reloaded: PeftModel

    @property
    def reload_delta(self) -> float:
        return float((self.before - self.after).abs().max())


class Flows:
    """Train / save / reload once per (method, quantization) and share the result between the tests below."""

    def __init__(self, bases: Bases, root) -> None:
        self.bases = bases
        self.root = root
        self.cache: dict[tuple[str, str], Flow] = {}

    def get(self, method: str, kind: str) -> Flow:
        if (method, kind) not in self.cache:
            self.cache[method, kind] = self._run(method, kind)
        return self.cache[method, kind]

    def _run(self, method: str, kind: str) -> Flow:
        torch.manual_seed(0)
        base = self.bases.quantized(kind)
        quantized_before = quantized_linears(base)
        model = get_peft_model(base, method_config(method))
        quantized_after = quantized_linears(model)
        inputs = batch(batch_size=2, seq_len=12, left_pad=0)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
        losses, gradients = [], {}
        model.train()
        for step in range(4):
            set_training_step(model, step)
            out = model(**inputs, labels=inputs["input_ids"])
            loss = out.loss + sum(peft_depth.aux_losses(model).values())
            loss.backward()
            for name, param in trainable:  # over all steps: LoRA's A only gets a gradient once B left zero
                norm = float(param.grad.norm()) if param.grad is not None else 0.0
                gradients[name] = max(gradients.get(name, 0.0), norm)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        model.eval()
        before = logits(model, inputs)
        adapter_dir = str(self.root / f"{method}-{kind}")
        model.save_pretrained(adapter_dir)
        # the same flow as training: a fresh quantized base, prepared the same way
        reloaded = PeftModel.from_pretrained(self.bases.quantized(kind), adapter_dir).eval()
        return Flow(
            losses=losses,
            gradients=gradients,
            trainable_dtypes={p.dtype for _, p in trainable},
            quantized_before=quantized_before,
            quantized_after=quantized_after,
            adapter_dir=adapter_dir,
            inputs=inputs,
            before=before,
            after=logits(reloaded, inputs),
            reloaded=reloaded,
        )


@pytest.fixture(scope="module")
def flows(bases, tmp_path_factory) -> Flows:
    return Flows(bases, tmp_path_factory.mktemp("adapters"))


# ---------------------------------------------------------------- train, save, reload, generate


@pytest.mark.parametrize("kind", QUANTIZATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_trains_on_a_quantized_base(flows, method, kind):
    flow = flows.get(method, kind)
    assert all(torch.isfinite(torch.tensor(flow.losses))), flow.losses
    assert flow.losses[-1] < flow.losses[0], flow.losses
    # gradients reach the adapter (every trainable tensor: the depth methods' routers, gates and new layers too)
    without = [name for name, norm in flow.gradients.items() if not norm > 0]
    assert not without, f"no gradient reached {without}"
    # adapter weights train in float32 on the bf16-compute base, as peft keeps LoRA's
    assert flow.trainable_dtypes == {torch.float32}
    # the base stays quantized: no method dequantizes an original linear (MoLEx calls other blocks' quantized
    # linears as they are; DLO's new layers are copies held apart)
    assert flow.quantized_after == flow.quantized_before
    assert len(flow.quantized_before) == 4 * 7


@pytest.mark.parametrize("kind", QUANTIZATIONS)
@pytest.mark.parametrize("method", METHODS[1:])
def test_reload_is_as_exact_as_lora(flows, method, kind):
    lora = flows.get("lora", kind).reload_delta
    flow = flows.get(method, kind)
    assert flow.reload_delta <= lora, f"{method} reload Δ {flow.reload_delta:.3g}, LoRA's {lora:.3g}"


@pytest.mark.parametrize("kind", QUANTIZATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_generates_on_a_quantized_base(flows, method, kind):
    flow = flows.get(method, kind)
    prompt = flow.inputs["input_ids"][:1, :6]
    with torch.no_grad():
        cached = flow.reloaded.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
        uncached = flow.reloaded.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, use_cache=False)
        first = flow.reloaded(input_ids=prompt).logits[0, -1].argmax()
    assert cached.shape == (1, 11)
    assert int(cached[0, 6]) == int(first)
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------- onto a full-precision base


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_adapter_trained_on_4bit_loads_onto_the_full_precision_base(flows, bases, method, dtype):
    flow = flows.get(method, "nf4")
    model = PeftModel.from_pretrained(bases.plain(dtype), flow.adapter_dir).eval()
    assert not quantized_linears(model)
    # every saved tensor is loaded as it was trained (float32 adapter weights, also on the bf16 base)
    saved = load_file(f"{flow.adapter_dir}/adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key
    # the adapter does to the full-precision base what it did to the 4-bit one (the bases differ by NF4's rounding)
    adapted = logits(model, flow.inputs)
    with model.disable_adapter():
        bare = logits(model, flow.inputs)
    with flow.reloaded.disable_adapter():
        bare_4bit = logits(flow.reloaded, flow.inputs)
    effect, effect_4bit = (adapted - bare).flatten(), (flow.after - bare_4bit).flatten()
    assert effect_4bit.abs().max() > 0.1  # the trained adapter changes the model
    assert torch.nn.functional.cosine_similarity(effect, effect_4bit, dim=0) > 0.9
    assert model.generate(input_ids=flow.inputs["input_ids"][:1, :6], max_new_tokens=3, do_sample=False).shape == (
        1,
        9,
    )


# ---------------------------------------------------------------- merging


MERGEABLE = {
    # one expert: its router always weighs it 1, a plain LoRA
    "mola-one-expert": lambda: peft_depth.MoLAConfig(
        task_type="CAUSAL_LM", r=4, num_experts=1, top_k=1, init_lora_weights=False
    ),
    # dense expansion (no routing) with LoRA on the original layers
    "dlo-dense": lambda: peft_depth.DLOConfig(
        task_type="CAUSAL_LM", expand_every=2, routed_layers="none", r=4, init_lora_weights=False, init="copy"
    ),
}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("name", sorted(MERGEABLE))
def test_merging_into_a_quantized_base_is_refused_and_changes_nothing(bases, tmp_path, name, kind):
    torch.manual_seed(0)
    model = get_peft_model(bases.quantized(kind, prepared=False).eval(), MERGEABLE[name]())
    inputs = batch(left_pad=0)
    before = logits(model, inputs)
    quantized = quantized_linears(model)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="quantized by bitsandbytes") as error:
            merge()
        assert "bf16 or fp32" in str(error.value)
    # ... and so is a tuner layer's own `merge()` (peft's per-layer API): it wrote into bitsandbytes storage, which
    # dropped the update on 8-bit while counting the layer as merged
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "get_delta_weight")]
    assert layers
    for layer in layers:
        with pytest.raises(ValueError, match="quantized by bitsandbytes"):
            layer.merge()
        assert not layer.merged
    assert quantized_linears(model) == quantized
    assert torch.equal(logits(model, inputs), before)
    # the way out the error names: the same adapter on the full-precision base merges exactly
    model.save_pretrained(tmp_path)
    full = PeftModel.from_pretrained(bases.plain(torch.float32), tmp_path).eval()
    unmerged = logits(full, inputs)
    merged = full.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs), unmerged, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- DLO's new layers


def dense_copies(base):
    """DLO with plain copies (init='copy', no routing): each new layer computes what its source layer computes."""
    return get_peft_model(
        base, peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2, routed_layers="none", init="copy")
    )


def new_layers(model):
    return model.base_model.dlo_new_layers["default"]


@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_dlo_new_layers_are_dequantized_copies(bases, kind):
    base = bases.quantized(kind, prepared=False)
    originals = list(base.model.layers)
    quantized = quantized_linears(base)
    model = dense_copies(base)
    assert quantized_linears(model) == quantized  # the originals stay quantized
    generator = torch.Generator().manual_seed(0)
    for position, layer in new_layers(model).items():
        # expand_every=2 on 4 layers: copies of layers 1 and 3, each right after its source (positions 2 and 5)
        source = originals[{"new2": 1, "new5": 3}[position]]
        assert not quantized_linears(layer)
        for name, linear in layer.named_modules():
            if isinstance(linear, torch.nn.Linear):
                original = source.get_submodule(name)
                assert is_quantized_linear(original)
                # trained in full, in float32 (peft's autocast of adapter weights), from the dequantized weights
                assert linear.weight.dtype == torch.float32 and linear.weight.requires_grad
                # exactly the dequantized weight, in the dtype the block computes in (int8's scales round there)
                computes_in = floating_dtype(source)
                assert torch.equal(linear.weight.detach(), dequantized_weight(original, computes_in).float())
                # the copy computes what the quantized linear computes (4-bit kernels in bf16: bf16 tolerance)
                original.train()  # bitsandbytes' CPU inference repacking is exercised separately below
                hidden = torch.randn(2, 5, linear.in_features, generator=generator).to(torch.bfloat16)
                torch.testing.assert_close(
                    linear(hidden.float()), original(hidden).float(), rtol=2e-2, atol=2e-2, msg=f"{position}.{name}"
                )


@pytest.mark.parametrize("init", ["copy", "zero_out", "mean"])
def test_dlo_dequantizes_each_copied_weight_once(bases, monkeypatch, init):
    """Building a new layer dequantized its source's linears for the copy and again for the state it loads, and the
    layout checks dequantized a layer only to read its tensor names: now each copy's weights are dequantized once (a
    'mean' copy reads its source and the layer before it)."""
    import peft_depth.core.quantization as quantization

    calls = []
    real = quantization.dequantize_module_weight
    monkeypatch.setattr(quantization, "dequantize_module_weight", lambda module: calls.append(module) or real(module))
    base = bases.quantized("nf4", prepared=False)
    originals = list(base.model.layers)  # before DLO puts its new layers into the stack
    config = peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2, routed_layers="none", init=init)
    model = get_peft_model(base, config)
    layers = new_layers(model)
    per_layer = sum(isinstance(m, torch.nn.Linear) for m in next(iter(layers.values())).modules())
    assert len(calls) == len(layers) * per_layer * (2 if init == "mean" else 1)
    # the one dequantization is what each copy holds (zero_out zeroes the output projections, not q_proj)
    for position, layer in layers.items():
        source = originals[{"new2": 1, "new5": 3}[position]]
        linear = layer.self_attn.q_proj
        expected = dequantized_weight(source.self_attn.q_proj, floating_dtype(source))
        if init == "mean":  # averaged in the dtype the block computes in
            before = originals[{"new2": 0, "new5": 2}[position]].self_attn.q_proj
            expected = (expected + dequantized_weight(before, floating_dtype(source))) / 2
        assert torch.equal(linear.weight.detach(), expected.float())


def test_a_4bit_layer_that_bitsandbytes_repacked_for_cpu_inference_is_copied_exactly(bases):
    fresh_base = bases.quantized("nf4", prepared=False)
    fresh = dense_copies(bases.quantized("nf4", prepared=False))
    base = bases.quantized("nf4", prepared=False).eval()
    with torch.no_grad():
        base(**batch(left_pad=0))  # the first no-grad eval forward repacks 4-bit weights for the CPU kernel
    linear = base.model.layers[1].self_attn.q_proj
    if not getattr(linear.weight.quant_state, "packing_format_for_cpu", False):
        # No AVX512-BF16 here, so bitsandbytes kept the standard layout. Repack with the function its forward calls
        # (pure torch), so that the case is tested on every machine and not only where the kernel exists.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu
        from bitsandbytes.nn import Linear4bit

        for module in base.modules():
            if isinstance(module, Linear4bit):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(
                    module.weight.data, module.weight.quant_state
                )
    # the repacking rounds the block scales to bf16: equal up to that rounding
    expected = dequantized_weight(fresh_base.model.layers[1].self_attn.q_proj, torch.float32)
    torch.testing.assert_close(dequantized_weight(linear, torch.float32), expected, rtol=1e-2, atol=1e-3)
    assert linear.weight.quant_state.packing_format_for_cpu  # the base is left as it was
    repacked = dense_copies(base)
    for position, layer in new_layers(repacked).items():
        for name, tensor in layer.state_dict().items():
            torch.testing.assert_close(tensor, new_layers(fresh)[position].state_dict()[name], rtol=1e-2, atol=1e-3)


def test_dlo_new_layers_stay_float32_on_a_bf16_base():
    """A new layer trained in full is an adapter weight: peft's autocast keeps it in float32 on a bf16 base, and the
    layer runs in float32 between bf16 layers, its output handed back in bf16 (as peft's LoRA layers do)."""
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2))
    parameters = dict(new_layers(model).named_parameters())
    assert {p.dtype for p in parameters.values()} == {torch.float32}
    assert {p.dtype for p in model.base_model.dlo_routers["default"].parameters()} == {torch.float32}
    inputs = batch()
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in parameters.values())
    # generation and a merge of a dense expansion work too: the merged layers are in the base's dtype
    model.eval()
    assert model.generate(**batch(batch_size=1, left_pad=0), max_new_tokens=3, do_sample=False).shape == (1, 10)
    dense = get_peft_model(tiny_llama().to(torch.bfloat16), peft_depth.DLOConfig(expand_every=2, routed_layers="none"))
    merged = dense.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert merged(**inputs).logits.dtype == torch.bfloat16


def test_dlo_new_layers_keep_the_base_dtype_without_autocast():
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(
        base, peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2), autocast_adapter_dtype=False
    )
    assert {p.dtype for p in new_layers(model).parameters()} == {torch.bfloat16}
    assert model(**batch()).logits.dtype == torch.bfloat16


# ---------------------------------------------------------------- the README's memory table


def test_readme_memory_table_is_the_computed_one(monkeypatch):
    """The README's QLoRA memory table is what ``benchmarks/qlora_memory.py`` computes from the current defaults."""
    spec = importlib.util.spec_from_file_location("qlora_memory", REPOSITORY / "benchmarks" / "qlora_memory.py")
    qlora_memory = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "qlora_memory", qlora_memory)  # its dataclass looks its module up
    spec.loader.exec_module(qlora_memory)
    rows = {row.method: row for row in qlora_memory.memory_rows()}
    # sanity of the computation: LoRA r=8 on q/v of Llama-2-7B, and DLO's eight full decoder layers
    assert rows["LoRA (peft, r=8 on q/v)"].trained_parameters == 32 * 2 * 8 * (4096 + 4096)
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    # a router (hidden -> 1) on each of the 8 new layers: frozen original layers are not routed by default
    assert rows["DLO (8 new layers, trained in full)"].trained_parameters == 8 * layer + 8 * 4096
    table = qlora_memory.markdown_table(list(rows.values()))
    assert table in (REPOSITORY / "README.md").read_text(), f"update the README's QLoRA table:\n{table}"


def test_mod_refuses_a_quantized_output_head_naming_the_way_out(bases):
    """A BitsAndBytesConfig with its own ``llm_int8_skip_modules`` quantizes the LM head too. MoD projects every late
    layer through that head: it crashed deep inside ("Only Tensors of floating point ... can require gradients")."""
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["embed_tokens"],
    )
    model = AutoModelForCausalLM.from_pretrained(bases.path, quantization_config=config, dtype=torch.bfloat16)
    assert quantized_linears(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"`lm_head` of this base is quantized .*llm_int8_skip_modules"):
        get_peft_model(model, peft_depth.MoDConfig(task_type="CAUSAL_LM", num_late_layers=2))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_copying_a_quantized_layer_leaves_the_random_state_alone(bases, kind):
    """A dequantized copy was built as an initialised nn.Linear: DLO's LoRA, initialised after the copies, then
    differed between a quantized base and its float twin at the same seed."""
    layer = next(m for m in bases.quantized(kind, prepared=False).modules() if is_quantized_linear(m))
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    dequantized_linear(layer, torch.float32)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("new_layer_training", ["full", "lora"])
def test_dlo_may_double_a_prepared_quantized_base_within_the_allocation_budget(
    bases, monkeypatch, kind, new_layer_training
):
    """The budget (2x the model) counted a quantized weight at its 16-bit size, while DLO's copies of a prepared base
    are float32 (and dequantizing allocates temporaries): doubling the depth, which the config allows, was refused as
    'absurd sizes' on a 7B QLoRA base. The 1 GiB floor is lifted here so the 2x rule decides, as on a real model."""
    import peft_depth.core.safety as safety

    monkeypatch.setattr(safety, "_MIN_BUDGET_BYTES", 0)
    model = get_peft_model(
        bases.quantized(kind),
        peft_depth.DLOConfig(
            task_type="CAUSAL_LM",
            expand_every=1,
            new_layer_training=new_layer_training,
            r=4 if new_layer_training == "lora" else 0,
        ),
    )
    assert len(new_layers(model)) == model.base_model.base_model_facts["num_layers"]
    # and the budget still counts: a quarter of it refuses the same doubling
    monkeypatch.setenv(safety.MAX_ADAPTER_BYTES_ENV, str(safety.adapter_allocation_limit(bases.quantized(kind)) // 4))
    with pytest.raises(ValueError, match="absurd sizes"):
        get_peft_model(bases.quantized(kind), peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=1))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("method", ["mola", "molex", "mod", "dlo"])
def test_low_cpu_mem_usage_loads_exactly_or_is_refused_by_name(bases, tmp_path, method, kind):
    # a meta-device build could not read packed 8-bit weights (every method: "Cannot copy out of meta tensor") nor,
    # for DLO's layer copies, 4-bit ones; plain LoRA loads on both
    get_peft_model(bases.quantized(kind), method_config(method)).save_pretrained(tmp_path)
    refused = kind == "int8" or method == "dlo"
    base = bases.quantized(kind)
    if refused:
        bits = "8bit" if kind == "int8" else "4bit"
        with pytest.raises(ValueError, match=rf"low_cpu_mem_usage=True is not supported on a bitsandbytes {bits}"):
            PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True)
        assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())  # refused before injecting
        return
    light = PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True)
    plain = PeftModel.from_pretrained(bases.quantized(kind), tmp_path)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(light(input_ids=ids).logits, plain(input_ids=ids).logits)
