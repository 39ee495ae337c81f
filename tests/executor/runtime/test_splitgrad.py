"""Split backward: I then W gives every gradient of a full backward, and defers what the doc says."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from executor.runtime.splitgrad import WeightGrads, deferring
from executor.workloads.models import build_model, lm_loss

RTOL, ATOL = 1e-5, 1e-6  # float32

LossOf = Callable[[nn.Module, Tensor], Tensor]


@pytest.fixture(autouse=True)
def _torch_seed() -> None:
    torch.manual_seed(0)


def _sum_sq(model: nn.Module, x: Tensor) -> Tensor:
    out: Tensor = model(x)
    return out.square().sum()


def _grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _assert_close(got: dict[str, Tensor | None], want: dict[str, Tensor | None],
                  rtol: float = RTOL) -> None:
    assert got.keys() == want.keys()
    for name, g in got.items():
        w = want[name]
        assert (g is None) == (w is None), name
        if g is not None and w is not None:
            assert g.dtype == w.dtype and g.shape == w.shape, name
            try:
                torch.testing.assert_close(g, w, rtol=rtol, atol=ATOL)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None


def split_matches_full(model: nn.Module, x: Tensor, deferred: set[str],
                       loss_of: LossOf = _sum_sq, within: bool | None = None) -> WeightGrads:
    """F under deferral, I, W on ``model`` vs a full backward on a copy: after I exactly the
    ``deferred`` parameters lack their gradient and the input gradient is already the full
    one; after W every gradient is. Returns the (empty) store. ``within``: the forward runs
    under ``deferring(store, model)``, and must (True) or must not (False) do so without the
    mode; None: ``deferring(store)``."""
    assert all(p.grad is None for p in model.parameters())
    plain = copy.deepcopy(model)
    x_plain = x.detach().clone().requires_grad_(x.requires_grad)
    torch.autograd.backward(loss_of(plain, x_plain))
    want = _grads(plain)

    store = WeightGrads()
    own_forwards = [m for m in model.modules() if "forward" in vars(m)]
    with deferring(store, None if within is None else model):
        moded = torch._C._is_torch_function_mode_enabled()
        loss = loss_of(model, x)
    assert moded == (within is not True)
    assert [m for m in model.modules() if "forward" in vars(m)] == own_forwards  # restored
    torch.autograd.backward(loss)  # I
    after_i = _grads(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trained if after_i[n] is None} == deferred
    _assert_close({n: g for n, g in after_i.items() if n not in deferred},
                  {n: g for n, g in want.items() if n not in deferred})
    if x.requires_grad:
        assert x.grad is not None and x_plain.grad is not None
        torch.testing.assert_close(x.grad, x_plain.grad, rtol=RTOL, atol=ATOL)
    assert (len(store) > 0) == bool(deferred)
    store.run()  # W
    assert len(store) == 0
    _assert_close(_grads(model), want)
    return store


def _linear_params(model: nn.Module, kind: type[nn.Module] = nn.Linear) -> set[str]:
    return {f"{m}.{p}" if m else p for m, mod in model.named_modules() if isinstance(mod, kind)
            for p, _ in mod.named_parameters(recurse=False)}


def mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16, bias=False), nn.Tanh(),
                         nn.Linear(16, 3)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp_with_leading_dims(dtype: torch.dtype) -> None:
    model = mlp(dtype)
    x = torch.randn(2, 5, 6, dtype=dtype, requires_grad=True)  # (batch, seq, in)
    split_matches_full(model, x, {"0.weight", "0.bias", "2.weight", "4.weight", "4.bias"})


def test_store_keeps_only_inputs_and_output_gradients() -> None:
    model, store = mlp(), WeightGrads()
    with deferring(store):
        loss = _sum_sq(model, torch.randn(4, 6))
    assert len(store) == 0 and store.nbytes == 0  # F records nothing
    torch.autograd.backward(loss)
    assert len(store) == 3
    rows = 4 * 4  # float32 bytes per value, 4 rows
    assert store.nbytes == rows * ((6 + 16) + (16 + 16) + (16 + 3))  # (x, dL/dy) per linear
    assert store.run() == 3 and store.run() == 0 and len(store) == 0  # a second W: nothing


def test_gpt_tiny_block_and_whole_model() -> None:
    work = build_model("gpt-tiny", batch=2)
    block = work.model[1]
    h = torch.randn(2, 32, 64, requires_grad=True)
    split_matches_full(block, h, _linear_params(block))  # LayerNorm: grads during I
    model = build_model("gpt-tiny", batch=2).model  # embeddings, 4 blocks, bias-free LM head

    def lm(m: nn.Module, tokens: Tensor) -> Tensor:
        return lm_loss(m(tokens), work.target)
    split_matches_full(model, work.sample, _linear_params(model), lm)


def test_conv_net_convolutions_are_not_deferred() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    split_matches_full(model, x, {"4.weight", "4.bias"})


@pytest.mark.parametrize("order", ["run 1 then 2", "run 2 then 1", "W 1 before I 2"])
def test_micro_batches_accumulate_onto_existing_grads(order: str) -> None:
    model, xs = mlp(), [torch.randn(3, 6), torch.randn(5, 6)]
    plain = copy.deepcopy(model)  # (a deep copy leaves .grad out)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        p.grad = torch.randn_like(p)  # the gradient of an earlier step, never zeroed
        q.grad = p.grad.clone()
    for x in xs:
        torch.autograd.backward(_sum_sq(plain, x))

    stores = [WeightGrads(), WeightGrads()]
    losses = []
    for store, x in zip(stores, xs, strict=True):
        with deferring(store):
            losses.append(_sum_sq(model, x))
    torch.autograd.backward(losses[0])
    if order == "W 1 before I 2":
        stores[0].run()
    torch.autograd.backward(losses[1])
    for k in (1, 0) if order == "run 2 then 1" else (0, 1):
        stores[k].run()
    _assert_close(_grads(model), _grads(plain))


def test_a_layer_used_twice_defers_both_uses() -> None:
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    store = split_matches_full(model, torch.randn(3, 4, requires_grad=True),
                               {"0.weight", "0.bias"})
    assert len(store) == 0


class FunctionalNet(nn.Module):
    """F.linear with a parameter, a computed weight (2 W: not deferred), a frozen bias."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 4))
        self.w2 = nn.Parameter(torch.randn(8, 8))
        self.b2 = nn.Parameter(torch.randn(8), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(F.linear(x, self.w1))
        return F.linear(h, 2 * self.w2, bias=self.b2)


def test_functional_linear_computed_weight_and_frozen_bias() -> None:
    model = FunctionalNet()
    split_matches_full(model, torch.randn(3, 4), {"w1"})
    assert model.b2.grad is None


def test_fx_traced_modules_are_deferred() -> None:
    traced = torch.fx.symbolic_trace(mlp())
    assert any(n.op == "call_module" for n in traced.graph.nodes)  # nn.Linear kept as a call
    split_matches_full(traced, torch.randn(4, 6, requires_grad=True), _linear_params(mlp()))
    functional = torch.fx.symbolic_trace(FunctionalNet())
    assert any(n.target is F.linear for n in functional.graph.nodes)
    split_matches_full(functional, torch.randn(3, 4), {"w1"})


def test_exported_modules_defer_aten_linear_but_not_decomposed_addmm() -> None:
    x = torch.randn(4, 6, requires_grad=True)
    exported = torch.export.export(mlp(), (x,), strict=False)
    module = exported.module()
    assert any(n.target is torch.ops.aten.linear.default for n in module.graph.nodes)
    deferred = {n for n, _ in module.named_parameters()}
    split_matches_full(module, x, deferred)
    module.zero_grad()  # the decomposed module shares these parameters
    x.grad = None
    decomposed = exported.run_decompositions().module()  # addmm(b, x, permute(W)): W computed
    assert any(n.target is torch.ops.aten.addmm.default for n in decomposed.graph.nodes)
    split_matches_full(decomposed, x, set())


@pytest.mark.parametrize("within", [None, True])  # True: Conv1D's forward swapped, no mode
def test_transformers_gpt2_conv1d_is_deferred(within: bool | None) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                     n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, attn_implementation="eager")
    model = transformers.GPT2Model(config)
    conv1d = transformers.pytorch_utils.Conv1D
    deferred = _linear_params(model, conv1d)
    assert len(deferred) == 2 * 4 * 2  # layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x 2

    def hidden(m: nn.Module, ids: Tensor) -> Tensor:
        return m(input_ids=ids).last_hidden_state.square().mean()  # type: ignore[no-any-return]
    split_matches_full(model, torch.randint(64, (2, 16)), deferred, hidden, within=within)


def test_recompute_reruns_the_forward_inside_i() -> None:
    model, x = mlp(), torch.randn(4, 6, requires_grad=True)
    plain = copy.deepcopy(model)
    torch.autograd.backward(_sum_sq(plain, x))
    x_grad, x.grad = x.grad, None

    store = WeightGrads()
    with torch.no_grad(), deferring(store):  # F keeps only the input
        assert model(x).grad_fn is None
    with torch.enable_grad(), deferring(store):  # I: re-materialise, then backward
        loss = _sum_sq(model, x)
    torch.autograd.backward(loss)
    assert all(p.grad is None for p in model.parameters()) and len(store) == 3
    assert store.run() == 3
    _assert_close(_grads(model), _grads(plain))
    assert x.grad is not None and x_grad is not None
    torch.testing.assert_close(x.grad, x_grad, rtol=RTOL, atol=ATOL)


def test_outside_the_block_nothing_is_deferred() -> None:
    model, store = mlp(), WeightGrads()
    with deferring(store):
        pass
    torch.autograd.backward(_sum_sq(model, torch.randn(2, 6)))
    assert len(store) == 0 and all(p.grad is not None for p in model.parameters())


def test_hooks_on_a_deferred_parameter_fire_in_w_only() -> None:
    fired: list[str] = []

    def hooked(name: str) -> nn.Linear:
        layer = nn.Linear(3, 2)
        layer.weight.register_hook(  # type: ignore[no-untyped-call]
            lambda g: 2 * g)  # called with None, it would fail
        layer.weight.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
            lambda p: fired.append(name))
        return layer
    plain, layer, store = hooked("plain"), hooked("split"), WeightGrads()
    torch.autograd.backward(plain(torch.ones(2, 3)).sum())
    with deferring(store):
        loss = layer(torch.ones(2, 3)).sum()
    torch.autograd.backward(loss)
    assert fired == ["plain"] and layer.weight.grad is None  # I: not yet
    store.run()
    assert fired == ["plain", "split"] and layer.weight.grad is not None
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    torch.testing.assert_close(layer.weight.grad, torch.full((2, 3), 4.0))  # 2 dL/dW


def test_autocast_bfloat16_matches_a_plain_autocast_backward() -> None:
    model, x = mlp(), torch.randn(8, 6, requires_grad=True)

    def loss_of(m: nn.Module, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out: Tensor = m(x)
        assert out.dtype == torch.bfloat16
        return out.float().square().sum()
    split_matches_full(model, x, _linear_params(model), loss_of)


def _mha() -> nn.Module:
    return nn.MultiheadAttention(8, 2, batch_first=True)


@pytest.mark.parametrize("case", ["mlp", "gpt-tiny", "conv", "twice", "fx", "functional",
                                  "mha", "exported"])
def test_within_its_modules_the_fast_way_defers_the_same(case: str) -> None:
    """With the forward's modules, nn.Linear-only models swap the linears' forwards (no mode)
    and defer the same parameters; anything with another matrix parameter keeps the mode."""
    x = torch.randn(4, 6, requires_grad=True)
    if case == "mlp":
        split_matches_full(mlp(), x, _linear_params(mlp()), within=True)
    elif case == "gpt-tiny":  # embeddings (not linears) allowed; LayerNorm: grads during I
        work = build_model("gpt-tiny", batch=2)
        model = work.model

        def lm(m: nn.Module, tokens: Tensor) -> Tensor:
            return lm_loss(m(tokens), work.target)
        split_matches_full(model, work.sample, _linear_params(model), lm, within=True)
    elif case == "conv":
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(8 * 4 * 4, 5))
        split_matches_full(model, torch.randn(2, 3, 4, 4), {"3.weight", "3.bias"}, within=True)
    elif case == "twice":
        layer = nn.Linear(6, 6)
        split_matches_full(nn.Sequential(layer, nn.Tanh(), layer), x, {"0.weight", "0.bias"},
                           within=True)
    elif case == "fx":
        split_matches_full(torch.fx.symbolic_trace(mlp()), x, _linear_params(mlp()),
                           within=True)
    elif case == "functional":  # its matrices are its own: only the mode sees F.linear
        split_matches_full(FunctionalNet(), torch.randn(3, 4), {"w1"}, within=False)
    elif case == "mha":  # the mode sees multi_head_attention_forward whole: nothing deferred
        model = _mha()

        def attend(m: nn.Module, h: Tensor) -> Tensor:
            return m(h, h, h, need_weights=False)[0].square().sum()  # type: ignore[no-any-return]
        split_matches_full(model, torch.randn(2, 5, 8, requires_grad=True), set(), attend,
                           within=False)
    else:  # torch.export: the parameters sit on the graph module, linear is an aten call
        module = torch.export.export(mlp(), (x,), strict=False).module()
        split_matches_full(module, x, {n for n, _ in module.named_parameters()}, within=False)


def test_within_an_error_restores_the_forwards() -> None:
    model = mlp()
    with pytest.raises(RuntimeError, match="mat1 and mat2"), deferring(WeightGrads(), model):
        model(torch.randn(2, 5))  # 5 inputs for a 6-input linear
    assert not any("forward" in vars(m) for m in model.modules())
    assert model(torch.randn(2, 6)).requires_grad  # the plain forward again


def test_double_backward_and_a_wrong_store_are_errors() -> None:
    layer, store = nn.Linear(3, 2), WeightGrads()
    x = torch.randn(2, 3, requires_grad=True)
    with deferring(store):
        loss = layer(x).square().sum()
    with pytest.raises(RuntimeError, match=r"create_graph=True .* outside deferring"):
        torch.autograd.grad(loss, x, create_graph=True)
    with (pytest.raises(TypeError, match="needs the micro-batch's WeightGrads store, got list"),
          deferring([])):  # type: ignore[arg-type]
        pass
