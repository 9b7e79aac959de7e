"""The host record: what ``hosts.jsonl`` says about the machine (the trainer's starts are
checked in test_train.py)."""

import json
import platform

from sasa_jax.train import host

X86 = """processor	: 0
model name	: Example CPU @ 2.00GHz
flags		: fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni
processor	: 1
model name	: Example CPU @ 2.00GHz
flags		: fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni
"""
ARM = """processor	: 0
BogoMIPS	: 50.00
Features	: fp asimd evtstrm aes sve
"""


def test_cpuinfo_reads_the_model_and_the_vector_features(tmp_path):
    (tmp_path / "x86").write_text(X86)
    (tmp_path / "arm").write_text(ARM)
    model, words = host.cpuinfo(tmp_path / "x86")
    assert model == "Example CPU @ 2.00GHz"
    assert {"avx2", "avx512f", "avx512_vnni"} <= words and "sve" not in words
    model, words = host.cpuinfo(tmp_path / "arm")
    assert model == platform.processor()  # Arm's cpuinfo names no model
    assert {"asimd", "sve"} <= words
    assert host.cpuinfo(tmp_path / "missing") == (platform.processor(), set())


def test_each_start_appends_a_line_with_its_step(tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text(X86)
    read = host.cpuinfo
    monkeypatch.setattr(host, "cpuinfo", lambda: read(fake))
    assert host.read_hosts(tmp_path) == []
    first = host.record_start(tmp_path, 0)
    host.record_start(tmp_path, 7)
    starts = host.read_hosts(tmp_path)
    assert [s["step"] for s in starts] == [0, 7]
    assert starts[0] == json.loads(json.dumps(first))
    features = ["avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl"]  # VECTOR_FEATURES' order
    assert starts[0]["cpu"]["features"] == features
    assert starts[0]["summary"].startswith("Example CPU @ 2.00GHz (")
    assert "avx512f" in starts[0]["summary"] and starts[0]["platform"] == "cpu"
