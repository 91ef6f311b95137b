"""benchmarks/kernel_trace.py, the tool that finds the launch where compiled kernels depart from the interpreter:
under the interpreter, two runs of a case agree launch by launch, a wrong write is flagged at the launch that made
it and at no earlier one, the case agrees with the reference scan, and every setting and kernel it swapped is
restored afterwards."""
from triton_testing import DEVICE, benchmark_module  # (sets TRITON_INTERPRET first)

import pytest  # noqa: E402
import torch  # noqa: E402

from olssm.kernels.triton import chunked as tchunk  # noqa: E402


def _trace_module():
    return benchmark_module("kernel_trace")


@pytest.mark.skipif(DEVICE != "cpu", reason="records the interpreter's launches")
def test_trace_flags_the_launch_that_wrote_a_wrong_value():
    kt = _trace_module()
    kernel_before = tchunk.chunk_delta_state_kernel
    first, second = [], []
    o, f, g = kt.run_case("o32_untied", "cpu", first)   # Gated DeltaNet, untied input term, int32 offsets
    kt.run_case("o32_untied", "cpu", second)
    # restored: the case's settings and the kernels the trace stood in for
    assert tchunk.OFFSETS32 is False and tchunk.TIE_INPUT_TERM is True
    assert tchunk.chunk_delta_state_kernel is kernel_before
    # the case itself is right (the interpreter in fp32 against the reference scan: RTOL-sized)
    assert max(kt.reference_errors("o32_untied", o, f, g).values()) < 1e-5
    kernels = [e["kernel"] for e in first]
    # the decay's factors from their pre-pass (chunked.DECAY_FACTORS, on since session 22) before the state pass
    assert kernels[:4] == ["chunk_delta_prep_kernel", "chunk_decay_factors_kernel", "chunk_delta_state_kernel",
                           "chunk_delta_out_kernel"]
    assert not any(line.startswith("!!") for line in kt.compare_logs(second, first))
    # 5 % off in what the state pass wrote: flagged there, and nowhere else (later launches' records are unchanged)
    entry = second[2]
    name = next(n for n in entry["after"] if not torch.equal(entry["after"][n], entry["before"][n]))
    entry["after"][name] = entry["after"][name] * 1.05
    flagged = [line for line in kt.compare_logs(second, first) if line.startswith("!!")]
    assert len(flagged) == 1 and "chunk_delta_state_kernel" in flagged[0] and name in flagged[0]
