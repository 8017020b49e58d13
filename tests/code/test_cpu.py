import json
import os
import subprocess
import sys

import pytest

from imgclf.stages.cpu import CPU_ISA_ENV, CPU_ISA_VARIABLES, cap_cpu_isa
from tests.conftest import REPO, tool_env

# A child that caps the kernels, then imports torch and runs a convolution (oneDNN): what it chose.
CHILD = """
import json, sys
from imgclf.stages.cpu import cap_cpu_isa
cap_cpu_isa(sys.argv[1])
import torch
torch.nn.Conv2d(1, 8, 3)(torch.zeros(16, 1, 28, 28))
print(json.dumps({"aten": torch.backends.cpu.get_cpu_capability()}))
"""


def capped_child(isa: str, **user_env: str) -> tuple[dict, str]:
    """What torch reports in a fresh process capped at `isa`, and oneDNN's log of what it ran."""
    env = (
        {k: v for k, v in tool_env(REPO).items() if k not in CPU_ISA_VARIABLES}
        | user_env
        | {"ONEDNN_VERBOSE": "1"}
    )
    done = subprocess.run(
        [sys.executable, "-c", CHILD, isa], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    lines = done.stdout.splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def native_capability() -> str:
    done = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env={k: v for k, v in tool_env(REPO).items() if k not in CPU_ISA_VARIABLES},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_cap_sets_every_library_variable_when_unset():
    environ = {"PATH": "/bin"}
    assert cap_cpu_isa("avx2", environ) == CPU_ISA_ENV["avx2"]
    assert environ == {
        "PATH": "/bin",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_CBWR": "AVX2",
    }


def test_cap_leaves_the_users_own_setting_alone():
    environ = {"MKL_CBWR": "COMPATIBLE"}
    assert cap_cpu_isa("avx512", environ) == {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
    }
    assert environ["MKL_CBWR"] == "COMPATIBLE"


def test_native_sets_nothing():
    environ: dict[str, str] = {}
    assert cap_cpu_isa("native", environ) == {}
    assert environ == {}


def test_an_unknown_isa_names_the_choices():
    with pytest.raises(ValueError, match=r"'avx3'.*native, portable, avx2, avx512, compatible"):
        cap_cpu_isa("avx3", {})


def test_capping_this_process_after_torch_is_imported_is_refused(monkeypatch):
    import torch  # noqa: F401  (the stages import it after the cap; this is the mistake)

    for name in CPU_ISA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="before importing torch"):
        cap_cpu_isa("avx2")
    assert not any(name in os.environ for name in CPU_ISA_VARIABLES)


def test_under_the_avx2_cap_torch_and_onednn_run_avx2_kernels():
    if native_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    reported, onednn_log = capped_child("avx2")
    assert reported["aten"] == "AVX2"
    assert "isa:Intel AVX2" in onednn_log
    assert "jit:avx512" not in onednn_log  # no convolution took a wider path


def test_a_users_variable_wins_over_the_cap():
    reported, _ = capped_child("avx2", ATEN_CPU_CAPABILITY="default")
    assert reported["aten"] == "DEFAULT"


def test_the_configs_choices_are_the_caps_there_are():
    from typing import get_args

    from imgclf.config.pipeline import TrainerConfig

    assert set(get_args(TrainerConfig.model_fields["cpu_isa"].annotation)) == set(CPU_ISA_ENV)
