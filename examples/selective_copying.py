"""Selective copying (Mamba, Gu & Dao 2023, §4.1): train at one length, test at longer ones.

A sequence holds a few data tokens scattered among noise tokens; after a separator the model must
reproduce the data tokens in order, ignoring the noise. Solving it needs content-dependent
(selective) memory: a time-invariant recurrence cannot tell data from noise. Each model is trained
at --train-len and its copying accuracy is measured at every --test-lens length (more noise between
the data tokens), as a table and a plot.

    python examples/selective_copying.py                    # about 5 minutes on 2 CPU cores
    python examples/selective_copying.py --train-len 256 --test-lens 256,512,1024,2048 \\
        --num-tokens 16 --steps 2000 --device auto          # closer to the paper's setting
"""
from __future__ import annotations

import sys

from common import add_length_flags, base_parser, length_generalisation  # noqa: E402

from olssm.data import selective_copying


def main(argv=None) -> dict:
    p = base_parser("selective_copying", __doc__, steps=300, batch_size=64, lr=5e-3)
    add_length_flags(p, models="longhorn,mamba,deltanet,gated_deltanet", train_len=32,
                     test_lens="32,64,128,256")
    p.add_argument("--vocab", type=int, default=16, help="vocabulary (3 special tokens: noise, separator, blank)")
    p.add_argument("--num-tokens", type=int, default=4, help="data tokens to copy")
    args = p.parse_args(argv)

    def task_kw(length):
        return dict(seq_len=length, num_tokens_to_copy=args.num_tokens, vocab_size=args.vocab)

    # data tokens are drawn uniformly from vocab - 3 ids
    return length_generalisation(args, "selective_copying", "Selective copying", selective_copying, task_kw,
                                 chance=1.0 / (args.vocab - 3), vocab_size=args.vocab)


if __name__ == "__main__":
    main()
    sys.exit(0)
