"""NonFiniteTrace names where a non-finite value first appears: forward (first module output, call order, with the
state of its inputs) and backward (first output gradient, named after the outermost module returning the tensor)."""
import torch
from torch import nn

from fewstep.engine.nonfinite_trace import NonFiniteTrace


class Blowup(nn.Module):
    """Multiplies by inf while `armed`: finite inputs, non-finite output."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        return x * float("inf") if self.armed else x


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), Blowup(), nn.Linear(4, 4), nn.Tanh())


def test_first_non_finite_forward_output_and_its_pass():
    model = _model()
    trace = NonFiniteTrace(model)
    x = torch.randn(3, 4) + 0.5
    model(x)
    assert trace.forward is None and "every module output finite" in trace.report()
    model[1].armed = True
    model(x)  # the step's second pass: the Blowup is first, not the Linear after it (inputs already non-finite)
    assert trace.forward == "1 (Blowup) output in forward pass 2, inputs finite"
    model[1].armed = False
    trace.reset()
    model(torch.full((3, 4), float("nan")))  # the data itself: the first module sees non-finite inputs
    assert trace.forward == "0 (Linear) output in forward pass 1, inputs already non-finite"


def test_first_non_finite_gradient_is_named_after_the_outermost_owner():
    model = _model()
    trace = NonFiniteTrace(model)
    out = model(torch.randn(3, 4) + 0.5)
    (out - out.detach()).sqrt().sum().backward()  # finite forward; d sqrt(u)/du at u = 0 is inf: the loss's backward
    assert trace.forward is None
    assert trace.backward == "the output of (model) (Sequential)"  # the Tanh's output is the model's own
    assert trace.report().endswith("backward: first non-finite gradient at the output of (model) (Sequential)")


class PlusSqrtOfZero(nn.Module):
    """x + sqrt(0 * x): the forward is x, the backward inf * 0 = NaN."""

    def forward(self, x):
        return x + (0 * x).sqrt()


def test_non_finite_backward_of_an_inner_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), PlusSqrtOfZero(), nn.Linear(4, 4), nn.Tanh())
    trace = NonFiniteTrace(model)
    model(torch.randn(8, 4)).sum().backward()
    assert trace.forward is None
    assert trace.backward == "the output of 0 (Linear)"  # the gradient leaving PlusSqrtOfZero's backward
    trace.reset()
    assert trace.backward is None and trace.report().endswith("backward: every gradient finite")


def test_remove_takes_every_hook_off():
    model = _model()
    trace = NonFiniteTrace(model)
    trace.remove()
    model[1].armed = True
    model(torch.randn(2, 4))
    assert trace.forward is None
