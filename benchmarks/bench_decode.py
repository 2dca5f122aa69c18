"""Decode throughput on one GPU: batch 1 (256 tokens) and 64 concurrent requests (512 prompt / 256 output
tokens), the 64-way run with the batched decode attention off (per-sequence attention, as before it) and
on, in the same process; how many of the 64 answers agree between the two, and for how many tokens.

    python benchmarks/bench_decode.py --ckpt /tmp/bagel-full --out results.json
    python benchmarks/bench_decode.py --check --ckpt /tmp/bagel-full --out check.json   # float32 agreement only

With random weights the logits are nearly tied, so in bf16 any change of reduction order (this one, or
packing) soon flips a greedy token; `--check` runs 16 requests x 64 tokens in float32, where rounding is
~1e-7, to tell rounding from a logic error.
"""

from __future__ import annotations


from bench_serving import prompt_of
from common import header, parser, report, timed

from bagel_serve import Omni


def main() -> None:
    ap = parser("bench_decode.json")
    ap.add_argument("--check", action="store_true", help="float32, 16 requests x 64 tokens: agreement only")
    a = ap.parse_args()
    res = header()
    if a.check:
        omni = Omni(a.ckpt, dtype="float32")
        reqs = [{"modality": "text2text", "prompt": prompt_of(omni, 128, i), "max_tokens": 65, "seed": i}
                for i in range(16)]
        got = {}
        for batched in (False, True):
            omni.runner.packer.batch_decode = batched
            got[batched] = [o.token_ids for o in omni.generate(reqs)]
        agreement(res, "check_fp32", got)
        report(res, a.out)
        return
    omni = Omni(a.ckpt)
    # A text token reads the understanding expert, the embeddings and the LM head: not the generation expert.
    weights = sum(p.numel() * p.element_size() for n, p in omni.runner.model.named_parameters()
                  if n.startswith("language_model.") and "moe_gen" not in n)
    res["decode_weights_gb"] = weights / 1e9
    omni.generate([{"modality": "text2text", "prompt": "warm up", "max_tokens": 8}])
    one = {"modality": "text2text", "prompt": "Tell me a long story.", "max_tokens": 257, "seed": 0}
    (out,), t, _ = timed(lambda: omni.generate([one]))
    res["batch1_tok_s"] = (len(out.token_ids) - 1) / t
    reqs = [{"modality": "text2text", "prompt": prompt_of(omni, 512, i), "max_tokens": 257, "seed": i} for i in range(64)]
    answers = {}
    for batched in (False, True):
        omni.runner.packer.batch_decode = batched
        tag = "batched" if batched else "per_sequence"
        outs, t, peak = timed(lambda: omni.generate(reqs))
        toks = sum(len(o.token_ids) - 1 for o in outs)
        res.update({f"text64_{tag}_s": t, f"text64_{tag}_tok_s": toks / t, f"text64_{tag}_peak_gib": peak,
                    f"text64_{tag}_decode_s": omni.last_stats.phase_s.get("decode", 0.0)})
        answers[batched] = [o.token_ids for o in outs]
    agreement(res, "text64", answers)
    hbm = 3.0e12  # bytes/s, H100 SXM (bench_foundation measures 3.01-3.02 TB/s)
    res["batch1_ceiling_tok_s"] = hbm / weights
    res["text64_ceiling_tok_s"] = 64 * hbm / weights  # weights read once per step; KV reads not counted
    report(res, a.out)


def agreement(res: dict, tag: str, answers: dict[bool, list[list[int]]]) -> None:
    """How many answers are identical with and without batching, and the mean length of their common start."""
    pairs = list(zip(answers[False], answers[True]))
    res[f"{tag}_same_answers"] = f"{sum(x == y for x, y in pairs)}/{len(pairs)}"
    common = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))) for x, y in pairs]
    res[f"{tag}_mean_common_tokens"] = sum(common) / len(common)
    res[f"{tag}_mean_answer_tokens"] = sum(len(x) for x, _ in pairs) / len(pairs)




if __name__ == "__main__":
    main()
