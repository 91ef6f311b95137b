"""Induction heads (Mamba, Gu & Dao 2023, §4.1; Olsson et al. 2022): train at one length, test at
longer ones.

A trigger token appears once in the first half of a random sequence, followed by a token X; at the
end the trigger appears again and the model must output X. The Mamba paper trains at length 256
and tests up to 2^20 to show which layers extrapolate; this script does the same in miniature.

    python examples/induction_heads.py                      # about 4 minutes on 2 CPU cores
    python examples/induction_heads.py --train-len 256 --test-lens 256,1024,4096,16384 \\
        --steps 2000 --device auto                          # closer to the paper's setting

At the default budget (300 steps) Mamba has not learned the task yet; with
`--models mamba --steps 600 --lr 1e-2` it reaches accuracy 1.0 up to length 128, 0.98 at 256 and
0.90 at 512 (measured on 2 CPU cores, about 2.5 minutes; docs/results/induction_heads_mamba_600_steps).
"""
from __future__ import annotations

import sys

from common import add_length_flags, base_parser, length_generalisation  # noqa: E402

from olssm.data import induction_heads


def main(argv=None) -> dict:
    p = base_parser("induction_heads", __doc__, steps=300, batch_size=64, lr=5e-3)
    add_length_flags(p, models="longhorn,mamba,deltanet,gated_deltanet", train_len=32,
                     test_lens="32,64,128,256,512")
    p.add_argument("--vocab", type=int, default=16, help="vocabulary (the last id is the trigger)")
    args = p.parse_args(argv)

    def task_kw(length):
        return dict(seq_len=length, vocab_size=args.vocab)

    # X is uniform over the vocab - 1 ordinary tokens
    return length_generalisation(args, "induction_heads", "Induction heads", induction_heads, task_kw,
                                 chance=1.0 / (args.vocab - 1), vocab_size=args.vocab)


if __name__ == "__main__":
    main()
    sys.exit(0)
