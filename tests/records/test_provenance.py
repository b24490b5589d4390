"""The device a record names: for a CPU, its model and the ISA torch uses on it."""
import torch

from linbench.records import provenance

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC   7B13 64-Core Processor
flags\t\t: fpu avx2

processor\t: 1
model name\t: AMD EPYC   7B13 64-Core Processor
"""


def test_cpu_model_comes_from_cpuinfo_with_spaces_collapsed(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert provenance.cpu_model(str(info)) == "AMD EPYC 7B13 64-Core Processor"


def test_cpu_model_without_cpuinfo_falls_back_to_platform(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance.platform, "processor", lambda: "")
    monkeypatch.setattr(provenance.platform, "machine", lambda: "aarch64")
    assert provenance.cpu_model(str(tmp_path / "absent")) == "aarch64"
    (tmp_path / "no-model").write_text("processor\t: 0\nflags\t: avx2\n")
    assert provenance.cpu_model(str(tmp_path / "no-model")) == "aarch64"


def test_cpu_device_names_model_isa_and_threads(monkeypatch):
    monkeypatch.setattr(provenance, "cpu_model", lambda: "Some CPU")
    isa = torch.backends.cpu.get_cpu_capability()
    assert provenance.device_name("cpu") == (
        f"cpu: Some CPU ({isa}) x{torch.get_num_threads()} threads")
    monkeypatch.setattr(provenance, "cpu_model", lambda: "Other CPU")
    assert provenance.device_name("cpu") != f"cpu: Some CPU ({isa}) x{torch.get_num_threads()} threads"
