"""The ``FFTConv`` module (``hf_plugins.attention.fftconv``): the issue's calls against the float64 oracles,
gradients through the module, the cached spectrum of a frozen filter in eval, and its argument checks."""

import pytest
import torch
from torch import nn

from hf_plugins.attention.fftconv import FFTConv
from hf_plugins.kernels.fftconv import SPECTRUM_CACHE, fft_conv_direct_reference, fft_conv_spectral_reference
from tests.kernels.test_fftconv_reference import conv_inputs
from tests.tolerances import FLOAT_KERNEL_RTOL, assert_close_kernel, max_rel_error

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_issue_calls_match_their_oracles():
    # the issue's module; a 2048-token sequence keeps the float64 oracle fast (seq may be shorter than seq_len)
    conv = FFTConv(seq_len=16384, channels=768)
    inputs = conv_inputs(1, 768, 2048, 2048, seed=0)
    u, k = inputs["u"].float(), inputs["k"].float()
    assert_close_kernel(conv(u, k), fft_conv_spectral_reference(u, k), torch.float32)
    assert_close_kernel(conv(u, k, kernel_len=1024), fft_conv_spectral_reference(u, k, 1024), torch.float32)
    assert_close_kernel(conv(u, k, keep_frequencies=0.25), fft_conv_spectral_reference(u, k, None, 0.25),
                        torch.float32)
    x0, x1 = torch.randn(2, *u.shape, generator=torch.Generator().manual_seed(1))
    assert_close_kernel(conv(u, k, pre_gate=x1, post_gate=x0), x0 * fft_conv_spectral_reference(x1 * u, k),
                        torch.float32)


@pytest.mark.parametrize("seq", [1, 300, 512], ids=lambda n: f"N{n}")
def test_full_length_and_shorter_sequences(seq):
    conv = FFTConv(seq_len=512, channels=4)
    inputs = conv_inputs(2, 4, seq, 512, seed=seq)
    u, k = inputs["u"].float(), inputs["k"].float()
    assert_close_kernel(conv(u, k), fft_conv_direct_reference(u, k), torch.float32)


def test_gradients_flow_through_the_module_to_u_and_a_filter_parameter():
    conv = FFTConv(seq_len=256, channels=3)
    inputs = conv_inputs(2, 3, 200, 256, seed=1)
    filt = nn.Parameter(inputs["k"].float())
    u = inputs["u"].float().requires_grad_()
    (conv(u, filt, kernel_len=150).double() * inputs["dy"]).sum().backward()
    u64 = inputs["u"].clone().requires_grad_()
    k64 = inputs["k"].clone().requires_grad_()
    (fft_conv_direct_reference(u64, k64, 150) * inputs["dy"]).sum().backward()
    assert max_rel_error(u.grad, u64.grad) <= FLOAT_KERNEL_RTOL[torch.float32]
    assert max_rel_error(filt.grad, k64.grad) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_eval_reuses_the_spectrum_of_an_unchanged_parameter():
    conv = FFTConv(seq_len=1024, channels=4).eval()
    filt = nn.Parameter(torch.randn(4, 1024))
    u = torch.randn(1, 4, 1024)
    with torch.no_grad():
        first = conv(u, filt)
        hits = SPECTRUM_CACHE.hits
        second = conv(u, filt)
        assert SPECTRUM_CACHE.hits == hits + 1 and torch.equal(first, second)
        filt.copy_(torch.randn(4, 1024))  # e.g. load_state_dict: the stale spectrum must not be used
        third = conv(u, filt)
    assert_close_kernel(third, fft_conv_direct_reference(u, filt.detach()), torch.float32)


def test_module_has_no_parameters_and_a_readable_repr():
    conv = FFTConv(seq_len=16384, channels=768)
    assert list(conv.parameters()) == [] and conv.state_dict() == {}
    assert "seq_len=16384, channels=768" in repr(conv)


@pytest.mark.parametrize(("shape", "message"), [
    ((1, 4, 65), r"u has 65 positions but this module was built for seq_len=64"),
    ((1, 5, 64), r"u must be \[batch, channels=4, seq\], got shape \(1, 5, 64\)"),
    ((1, 64, 4), r"u must be \[batch, channels=4, seq\], got shape \(1, 64, 4\)"),
], ids=["too_long", "channels", "seq_first"])
def test_bad_inputs_raise_clear_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        FFTConv(seq_len=64, channels=4)(torch.randn(shape), torch.randn(4, 64))


def test_op_errors_pass_through():
    with pytest.raises(ValueError, match=r"keep_frequencies must be in \(0, 1\]"):
        FFTConv(seq_len=64, channels=4)(torch.randn(1, 4, 64), torch.randn(4, 64), keep_frequencies=2.0)
    with pytest.raises(ValueError, match=r"\(3 != 4 channels\)"):
        FFTConv(seq_len=64, channels=4)(torch.randn(1, 4, 64), torch.randn(3, 64))


@pytest.mark.parametrize(("kwargs", "message"), [({"seq_len": 0, "channels": 4}, "seq_len must be a positive int"),
                                                 ({"seq_len": 8, "channels": 2.0}, "channels must be a positive int")])
def test_bad_construction_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FFTConv(**kwargs)
