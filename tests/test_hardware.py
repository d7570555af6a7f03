"""``hf-plugins bench hw``: the machine's roofline, and the fraction of it a kernel figure reaches."""

import json

import pytest

from hf_plugins import cli, hardware


def test_roofline_fraction_takes_the_slower_of_memory_and_compute():
    roofline = hardware.Roofline(device="test", threads=1, matmul_tflops={"fp32": {"a": 0.5, "b": 2.0}},
                                 bandwidth_gbs={"copy": 30.0, "triad": 20.0})
    assert roofline.peak_tflops("fp32") == 2.0
    # 2 GB at 20 GB/s needs 0.1 s: done in 0.2 s is half the roofline.
    assert roofline.fraction(0.2, bytes_moved=2e9) == pytest.approx(0.5)
    # 4 TFLOP at 2 TFLOPS needs 2 s, longer than its 1 GB's 0.05 s: compute bound.
    assert roofline.fraction(4.0, bytes_moved=1e9, flops=4e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no matmul throughput measured for dtype 'bf16'"):
        roofline.fraction(1.0, flops=1.0, dtype="bf16")
    with pytest.raises(ValueError, match="seconds must be positive, got 0"):
        roofline.fraction(0, bytes_moved=1.0)


def test_cpu_measurement_has_every_figure_positive():
    roofline = hardware.measure_cpu(matmul_n=128, stream_floats=1 << 16, min_time_s=0.01)
    assert set(roofline.matmul_tflops) == {"fp32", "bf16", "int8"}
    assert all(value > 0 for routes in roofline.matmul_tflops.values() for value in routes.values())
    assert set(roofline.bandwidth_gbs) == {"copy", "triad"} and min(roofline.bandwidth_gbs.values()) > 0
    assert set(roofline.call_us) == {"nn.Linear", "dispatcher", "FastLinear"} and min(roofline.call_us.values()) > 0
    assert hardware.last_level_cache_bytes() > 0


def test_paper_figures_name_the_card_class():
    assert hardware.paper_figures("NVIDIA H200")["card"] == "H100 SXM"
    assert hardware.paper_figures("NVIDIA H100 80GB HBM3")["HBM GB/s"] == 3010
    assert hardware.paper_figures("NVIDIA A100-SXM4-80GB") == {}


@pytest.mark.usefixtures("one_thread")  # restores the thread count --threads sets
def test_cli_prints_and_writes_the_figures(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(hardware, "measure", lambda device: hardware.measure_cpu(128, 1 << 16, 0.01))
    out = tmp_path / "hw" / "roofline.json"
    assert cli.main(["bench", "hw", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 thread(s)" in printed and "matmul  fp32: torch.mm" in printed and "triad" in printed
    saved = json.loads(out.read_text())
    assert saved["threads"] == 1 and saved["bandwidth_gbs"]["triad"] > 0


@pytest.mark.usefixtures("one_thread")
def test_cli_refuses_bad_arguments(capsys):
    assert cli.main(["bench", "hw", "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        hardware.measure("tpu")
