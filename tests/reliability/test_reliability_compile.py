"""torch.compile: a compiled model with adapters trains like the eager one
across reallocation rounds, and a round never triggers a recompilation.

Under compilation ElaLoRALinear uses all r_max slots with the `active` mask
(eager slices to the active rank), so a round changes buffer values and never
a shape or a guarded Python attribute. Measured on this package: after the
first step's compilations, dynamo's frame count stays constant through every
round (the tests assert it). Inductor compile time dominates, so the model is
tiny and inductor is exercised by one test; the others use aot_eager (dynamo
+ AOTAutograd, the same guards and graphs, no code generation).
"""
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from elalora import ElaLoRALinear, RankAllocator

import _reliability_util as U
from fixtures import small_config

STEPS = 12  # rounds at t = 5, 7 (total_steps=12, t_init=3, t_final=3, mask_interval=2)
RTOL, ATOL = 1e-4, 1e-5  # compiled vs eager float32; SGD keeps ULP differences from being amplified


def _train(backend: str | None, steps: int = STEPS):
    torch._dynamo.reset()
    config = small_config(total_steps=steps)
    model, _ = U.build(config)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    alloc = RankAllocator(model, config, opt)
    counter = CompileCounterWithBackend(backend) if backend else None
    run_model = torch.compile(model, backend=counter) if backend else model
    losses, frames = [], []
    for step in range(steps):
        x, y = U.batch(step)
        loss = U.loss_fn(run_model, x, y, alloc)
        loss.backward()
        opt.step()
        alloc.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        frames.append(counter.frame_count if counter else 0)
    return U.snapshot(model, opt, alloc), losses, frames


def _assert_matches_eager(backend: str):
    eager, eager_losses, _ = _train(None)
    comp, comp_losses, frames = _train(backend)
    assert len(eager["history"]) >= 2 and any(h[2] for h in eager["history"]), "no round moved a rank"
    assert comp["history"] == eager["history"], "compiled run took different decisions"
    assert comp["ranks"] == eager["ranks"]
    assert all(torch.equal(comp[k], eager[k]) for k in comp if k.endswith(".active"))
    torch.testing.assert_close(torch.tensor(comp_losses), torch.tensor(eager_losses), rtol=RTOL, atol=ATOL)
    for key in eager:
        if isinstance(eager[key], torch.Tensor) and eager[key].is_floating_point() and not key.startswith("opt."):
            torch.testing.assert_close(comp[key], eager[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")
    # Every compilation happens at the first step; the rounds (t = 5, 7) add none.
    assert frames[0] > 0 and frames[-1] == frames[0], f"recompiled during training: frame counts {frames}"


def test_compiled_training_matches_eager_across_rounds_aot_eager():
    _assert_matches_eager("aot_eager")


@pytest.mark.slow  # inductor compiles C++: tens of seconds
def test_compiled_training_matches_eager_across_rounds_inductor():
    _assert_matches_eager("inductor")


def test_round_does_not_recompile_single_layer():
    """The layer alone: a rank change (up and down) and a state load reuse the compiled graphs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = ElaLoRALinear(8, 6, r=2, r_max=4)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter)
    x = torch.randn(5, 8)
    with torch.no_grad():
        layer.lora_lam.normal_()
    for rank in (2, 4, 1, 3):
        layer.set_active_rank(rank)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)
    layer.load_state_dict(layer.state_dict())
    compiled(x).sum().backward()
    assert counter.frame_count >= 1
    first = counter.frame_count
    for rank in (4, 2):
        layer.set_active_rank(rank)
        compiled(x)
    assert counter.frame_count == first, "a rank change recompiled the layer"


def test_inactive_slots_get_zero_grad_when_compiled():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = ElaLoRALinear(8, 6, r=2, r_max=4)
    with torch.no_grad():  # every factor non-zero, whichever start: each active slot's factors get a gradient
        layer.lora_P.normal_()
        layer.lora_lam.normal_()
    compiled = torch.compile(layer, backend="aot_eager")
    compiled(torch.randn(5, 8)).pow(2).sum().backward()
    assert torch.count_nonzero(layer.lora_lam.grad[2:]) == 0
    assert torch.count_nonzero(layer.lora_P.grad[:, 2:]) == 0
    assert torch.count_nonzero(layer.lora_Q.grad[2:]) == 0
    assert torch.count_nonzero(layer.lora_Q.grad[:2]) > 0


def test_compiles_without_graph_breaks():
    """fullgraph=True: the layer alone and the whole adapted model each trace as one graph."""
    torch._dynamo.reset()
    layer = ElaLoRALinear(8, 6, r=2, r_max=4)
    torch.compile(layer, backend="aot_eager", fullgraph=True)(torch.randn(5, 8)).sum().backward()
    model, _ = U.build()
    x, _ = U.batch(0)
    torch.compile(model, backend="aot_eager", fullgraph=True)(x).sum().backward()


def test_the_no_allocator_warning_firing_does_not_recompile(monkeypatch):
    """A model trained without an allocator warns once, from an eager backward; a compiled forward must not be
    guarded on that flag, or the warning recompiles every compiled adapter (it once did, in test order)."""
    import elalora.layer

    monkeypatch.setattr(elalora.layer, "_warned_no_allocator", False)
    torch._dynamo.reset()
    layer = ElaLoRALinear(8, 6, r=2, r_max=4)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    x = torch.randn(5, 8)
    compiled(x).sum().backward()
    with pytest.warns(elalora.NoAllocatorWarning):
        layer(x).sum().backward()  # eager: the hook fires and sets the flag
    assert elalora.layer._warned_no_allocator
    compiled(x).sum().backward()
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
